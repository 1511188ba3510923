"""A real multi-node Ray cluster on this machine, for the Ray tests: every address on loopback, token auth on.

Each node is one Python process that starts a Ray node (the head first) the way ``ray.cluster_utils.Cluster``
does, in its own session, with the node IP 127.0.0.1 and Ray's loopback-only mode; every process of a node
(raylet, GCS, agents, the workers it forks) descends from it, so a node is
stopped or killed by the pids of that process tree, never by name (other clusters may run on this host). The
dashboard is off and every fixed default port is replaced by a free one, so clusters of parallel test runs do
not collide; each cluster has its own temp folder, and none writes the "current cluster" file that ``--ray auto``
reads.

Tests talk to a cluster as users do: ``distml ... --ray <address>`` in a subprocess whose environment includes
:attr:`LocalRayCluster.env` (the token, the auth mode). Use one cluster per test module::

    from ray_cluster import ray_cluster  # noqa: F401  (the module-scoped fixture)
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from distml._proc import pid_alive

START_TIMEOUT_S = 60.0
_STARTED = "distml-test-node-started"
# One node, as ray.cluster_utils.Cluster starts them (its Node class, in a process of its own), then waits until it
# is signalled: `ray start` would refuse a worker node in Ray's loopback-only mode. Every process of the node is a
# child of this one.
_NODE = f"""
import json, sys, time
from ray._private.node import Node
from ray._private.parameter import RayParams

s = json.loads(sys.argv[1])
params = RayParams(
    node_ip_address="127.0.0.1", num_cpus=s["cpus"], num_gpus=0, object_store_memory=100 * 1024 * 1024,
    min_worker_port=0, max_worker_port=0, dashboard_agent_listen_port=s["agent_port"], temp_dir=s["temp_dir"],
)
if s["head"]:
    # The dashboard off: Ray then runs only its minimal API server (no UI), on a free port; no Ray Client server.
    params.update(gcs_server_port=s["port"], include_dashboard=False, dashboard_port=s["api_port"])
else:
    params.update(gcs_address=s["gcs_address"], include_log_monitor=False, node_manager_port=0)
node = Node(params, head=s["head"], shutdown_at_exit=True, spawn_reaper=True)
print("{_STARTED}", node.node_id, flush=True)
while True:
    time.sleep(3600)
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _children() -> dict[int, list[int]]:
    """Every process's children, from /proc (ppid is field 4 of /proc/PID/stat, after the command in parens)."""
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue  # ended meanwhile
        ppid = int(stat.rpartition(")")[2].split()[1])
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def _descendants(pid: int) -> list[int]:
    """``pid`` and every process below it, parents first."""
    tree, found, todo = _children(), [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(tree.get(current, []))
    return found


def _send(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


@dataclass
class LocalRayCluster:
    """A running local cluster: its head's address and what a client process needs in its environment."""

    address: str  # "127.0.0.1:PORT": the head's GCS
    env: dict[str, str]  # RAY_AUTH_MODE=token, RAY_AUTH_TOKEN, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, RAY_ADDRESS
    cpus_per_node: int = 1
    temp_dir: Path = field(default_factory=Path)
    _nodes: list[subprocess.Popen[str]] = field(default_factory=list)
    _logs: list[list[str]] = field(default_factory=list)

    def client_env(self, **extra: str) -> dict[str, str]:
        """``os.environ`` with this cluster's settings (and ``extra``): for a ``distml`` subprocess."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        return {**env, **self.env, **extra}

    def node_pids(self, index: int) -> list[int]:
        """The live processes of node ``index`` (0 = the head): its node process and everything below it."""
        root = self._nodes[index].pid
        return [pid for pid in _descendants(root) if pid_alive(pid)]

    def worker_nodes(self) -> list[int]:
        """The indexes of the worker nodes still running, oldest first (the head, 0, is not one)."""
        return [i for i in range(1, len(self._nodes)) if self._nodes[i].poll() is None]

    def kill_node(self, index: int) -> None:
        """SIGKILL every process of worker node ``index`` (not the head: the cluster would be gone)."""
        if index == 0:
            raise ValueError("node 0 is the head; kill a worker node (1 or more)")
        self._signal(index, signal.SIGKILL)
        self._nodes[index].wait(timeout=10)

    def add_node(self, cpus: int | None = None, *, wrap: list[str] | None = None) -> int:
        """Start one more worker node; its index. ``wrap``: a command that runs the node process (``unshare`` ...)."""
        self._start_node(head=False, cpus=cpus or self.cpus_per_node, wrap=wrap or [])
        return len(self._nodes) - 1

    def stop(self) -> None:
        """Every process of every node, by pid: SIGTERM, then SIGKILL what is left after half a second.

        The pids are read once, first: a process whose parent has ended is no longer below the node's root.
        Half a second, not more: with the head's GCS gone, a worker node's raylet keeps retrying it and outlived
        a 10 s grace (every module's teardown waited the whole grace); nothing of a test cluster needs to outlive
        it (its temp folder is removed below).
        """
        pids = [pid for index in range(len(self._nodes)) for pid in self.node_pids(index)]
        _send(pids, signal.SIGTERM)
        deadline = time.monotonic() + 0.5
        while any(pid_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        _send([pid for pid in pids if pid_alive(pid)], signal.SIGKILL)
        for proc in self._nodes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def log(self, index: int) -> str:
        """What node ``index``'s process printed (for a failing test's message)."""
        return "".join(self._logs[index])

    def _signal(self, index: int, sig: signal.Signals) -> None:
        _send(self.node_pids(index), sig)

    def _start_node(self, *, head: bool, cpus: int, wrap: list[str]) -> None:
        settings = {
            "head": head,
            "gcs_address": self.address,
            "port": int(self.address.rpartition(":")[2]),
            "cpus": cpus,
            "temp_dir": str(self.temp_dir),
            "agent_port": _free_port(),
            "api_port": _free_port(),
        }
        proc = subprocess.Popen(
            [*wrap, sys.executable, "-c", _NODE, json.dumps(settings)],
            env=self.client_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # a Ctrl-C of the test run reaches the node through stop(), by pid
        )
        self._nodes.append(proc)
        lines: list[str] = []
        self._logs.append(lines)
        started = threading.Event()

        def read() -> None:  # keeps the pipe drained for the node's whole life
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line)
                if line.startswith(_STARTED):
                    started.set()

        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not started.wait(0.2):
            if proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"ray node did not start (exit {proc.poll()}):\n{''.join(lines)[-3000:]}")


def start_local_cluster(nodes: int = 2, cpus_per_node: int = 1) -> LocalRayCluster:
    """A cluster of ``nodes`` nodes (the head is node 0), each with ``cpus_per_node`` CPUs and no GPU."""
    env = {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(16),
        # "No clusters" mode (Ray's default on Windows and macOS): Ray then takes 127.0.0.1 as this host's address
        # everywhere, so an address of 127.0.0.1 is not rewritten to the host's routable one, and the
        # workers' MASTER_ADDR is loopback too.
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        # A killed node is declared dead after 3 failed health checks 0.5 s apart (Ray's default: 5 checks 3 s
        # apart, 15 s), so a node-loss test's job learns of it within seconds; read by the head's GCS.
        "RAY_health_check_period_ms": "500",
        "RAY_health_check_failure_threshold": "3",
    }
    # Short: Ray puts unix sockets under it, and their paths must stay under 108 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    address = f"127.0.0.1:{_free_port()}"
    # Ray's own actors look up "the" cluster (address None or auto) when they talk to it, and find every cluster
    # running on this host (other test runs'): this one's address, for them and for every process it starts.
    env["RAY_ADDRESS"] = address
    cluster = LocalRayCluster(address, env, cpus_per_node, temp_dir)
    cluster._start_node(head=True, cpus=cpus_per_node, wrap=[])
    for _ in range(nodes - 1):
        cluster.add_node()
    return cluster


def _require_ray() -> None:
    if importlib.util.find_spec("ray") is None:  # not imported here: the tests' own process stays Ray-free
        pytest.skip("Ray is an optional extra: pip install 'distml[ray]'")


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[LocalRayCluster]:
    """A two-node local cluster (1 CPU each) for the whole test module; skipped when Ray is not installed."""
    _require_ray()
    cluster = start_local_cluster()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def ray_cluster_starting() -> Iterator[Future[LocalRayCluster]]:
    """:func:`ray_cluster`, starting in a thread: ask for it first, build the module's data meanwhile, then
    ``.result()`` (a node mostly waits for its processes to come up, so the two overlap)."""
    _require_ray()
    with ThreadPoolExecutor(max_workers=1) as pool:
        starting = pool.submit(start_local_cluster)
        try:
            yield starting
        finally:
            if starting.exception() is None:
                starting.result().stop()
