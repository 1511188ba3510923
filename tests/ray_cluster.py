"""A real multi-node Ray cluster on this machine, for the Ray tests: every address on loopback, token auth on.

Each node is one ``ray start --block`` process (the head first), started in its own session with the node IP
127.0.0.1; every process of a node (raylet, GCS, agents, the workers it forks) descends from it, so a node is
stopped or killed by the pids of that process tree, never by name (other clusters may run on this host). The
dashboard is off and every fixed default port is replaced by a free one, so clusters of parallel test runs do
not collide; each cluster has its own temp folder, so ``ray start``'s "current cluster" file of the default
folder is left alone.

Tests talk to a cluster as users do: ``distml ... --ray <address>`` in a subprocess whose environment includes
:attr:`LocalRayCluster.env` (the token, the auth mode). Use one cluster per test module::

    from ray_cluster import ray_cluster  # noqa: F401  (the module-scoped fixture)
"""

from __future__ import annotations

import contextlib
import importlib.util
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
from dataclasses import dataclass, field
from pathlib import Path

import pytest

START_TIMEOUT_S = 60.0
_RAY = str(Path(sys.executable).with_name("ray"))


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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (ended, not yet reaped) counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


@dataclass
class LocalRayCluster:
    """A running local cluster: its head's address and what a client process needs in its environment."""

    address: str  # "127.0.0.1:PORT": the head's GCS
    env: dict[str, str]  # RAY_AUTH_MODE=token, RAY_AUTH_TOKEN, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
    cpus_per_node: int = 1
    temp_dir: Path = field(default_factory=Path)
    _nodes: list[subprocess.Popen[str]] = field(default_factory=list)
    _logs: list[list[str]] = field(default_factory=list)

    def client_env(self, **extra: str) -> dict[str, str]:
        """``os.environ`` with this cluster's settings (and ``extra``): for a ``distml`` subprocess."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        return {**env, **self.env, **extra}

    def node_pids(self, index: int) -> list[int]:
        """The live processes of node ``index`` (0 = the head): its ``ray start`` and everything below it."""
        root = self._nodes[index].pid
        return [pid for pid in _descendants(root) if _alive(pid)]

    def kill_node(self, index: int) -> None:
        """SIGKILL every process of worker node ``index`` (not the head: the cluster would be gone)."""
        if index == 0:
            raise ValueError("node 0 is the head; kill a worker node (1 or more)")
        self._signal(index, signal.SIGKILL)
        self._nodes[index].wait(timeout=10)

    def add_node(self, cpus: int | None = None, *, wrap: list[str] | None = None) -> int:
        """Start one more worker node (``wrap``: a command that runs ``ray start``, e.g. ``unshare``); its index."""
        self._start_node(head=False, cpus=cpus or self.cpus_per_node, wrap=wrap or [])
        return len(self._nodes) - 1

    def stop(self) -> None:
        """Every process of every node, by pid: SIGTERM, then SIGKILL what is left after a few seconds."""
        for index in reversed(range(len(self._nodes))):
            self._signal(index, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for index in range(len(self._nodes)):
            while self.node_pids(index) and time.monotonic() < deadline:
                time.sleep(0.2)
            self._signal(index, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._nodes[index].wait(timeout=5)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def log(self, index: int) -> str:
        """What node ``index``'s ``ray start`` printed (for a failing test's message)."""
        return "".join(self._logs[index])

    def _signal(self, index: int, sig: signal.Signals) -> None:
        for pid in self.node_pids(index):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def _start_node(self, *, head: bool, cpus: int, wrap: list[str]) -> None:
        args = [
            _RAY,
            "start",
            "--block",
            "--disable-usage-stats",
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={cpus}",
            "--num-gpus=0",
            f"--dashboard-agent-listen-port={_free_port()}",
            "--object-store-memory=100000000",
        ]
        if head:
            port = self.address.rpartition(":")[2]
            args += [
                "--head",
                f"--port={port}",
                "--include-dashboard=false",
                f"--ray-client-server-port={_free_port()}",
                f"--temp-dir={self.temp_dir}",
            ]
        else:
            args += [f"--address={self.address}"]
        proc = subprocess.Popen(
            [*wrap, *args],
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
                if "Ray runtime started" in line:
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
    }
    # Short: Ray puts unix sockets under it, and their paths must stay under 108 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    cluster = LocalRayCluster(f"127.0.0.1:{_free_port()}", env, cpus_per_node, temp_dir)
    cluster._start_node(head=True, cpus=cpus_per_node, wrap=[])
    for _ in range(nodes - 1):
        cluster.add_node()
    return cluster


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[LocalRayCluster]:
    """A two-node local cluster (1 CPU each) for the whole test module; skipped when Ray is not installed."""
    if importlib.util.find_spec("ray") is None:  # not imported here: the tests' own process stays Ray-free
        pytest.skip("Ray is an optional extra: pip install 'distml[ray]'")
    cluster = start_local_cluster()
    try:
        yield cluster
    finally:
        cluster.stop()
