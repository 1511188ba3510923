"""The servers bench/serve_peers.py measures: how each starts (own venv, own session, CPU 0, loopback), answers
one request before the load, pauses while another is measured, and stops: always its whole process tree
(LitServe runs an API server and an inference worker, BentoML's circus arbiter puts each worker in a session of
its own).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import _grpc_load as grpcload
from serve import DISTML_PY, KSERVE_SERVER, SERVER_CPU, _free_port, _get, _tail

REPO = Path(__file__).resolve().parents[1]
PEERS = REPO / "bench" / "peers"
START_TIMEOUT_S = 120.0


# -- starting and stopping one server ----------------------------------------------------------------------------
def _processes() -> dict[int, tuple[int, float]]:
    """Every process: pid -> (parent pid, utime + stime in seconds), from /proc."""
    out: dict[int, tuple[int, float]] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        out[int(stat.parent.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    return out


class Running:
    """A server this script started (in a session of its own), its ports and log."""

    def __init__(self, name: str, proc: subprocess.Popen[bytes], base: str, grpc: str | None, log: Path) -> None:
        self.name, self.proc, self.base, self.grpc, self.log = name, proc, base, grpc, log

    def tree(self, table: dict[int, tuple[int, float]] | None = None) -> list[int]:
        """The server's process and all its descendants (found by parent pid: BentoML's workers are in sessions
        of their own, so neither the process group nor the session finds them)."""
        table = _processes() if table is None else table
        found, frontier = [self.proc.pid], [self.proc.pid]
        while frontier:
            frontier = [pid for pid, (ppid, _) in table.items() if ppid in frontier]
            found += frontier
        return found

    def cpu_seconds(self) -> float:
        """utime + stime of the server's processes (all their threads), its workers included."""
        table = _processes()
        return sum(table[pid][1] for pid in self.tree(table) if pid in table)

    def signal(self, sig: signal.Signals) -> None:
        """Send ``sig`` to every process of the server (``SIGSTOP``: it takes no CPU while another is measured;
        ``SIGCONT``: it runs again, warm)."""
        for pid in self.tree():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def stop(self) -> None:
        """SIGTERM to the server's processes, SIGKILL to those left after 20 s; only those this script started."""
        pids = self.tree()
        for sig, wait_s in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 10.0)):
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                self.proc.poll()  # reap the leader; the others are reaped by their parents or init
                pids = [pid for pid in pids if Path(f"/proc/{pid}").exists() and not _zombie(pid)]
                if not pids:
                    return
                time.sleep(0.2)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def command(
    name: str, model_dir: Path, port: int, grpc_port: int | None, pythons: dict[str, str], tmp: Path
) -> tuple[list[str], dict[str, str]]:
    """The server's command line and environment: loopback, ``port`` (and distml's gRPC on ``grpc_port``)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if name == "distml":
        grpc = [] if grpc_port is None else ["--grpc-port", str(grpc_port)]
        return [
            str(DISTML_PY),
            "-m",
            "distml",
            "--home",
            str(tmp / "home"),
            "serve",
            str(model_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            *grpc,
        ], env
    if name == "kserve":
        return [
            pythons["kserve"],
            str(KSERVE_SERVER),
            "--model-dir",
            str(model_dir),
            "--port",
            str(port),
            "--workers",
            "1",
        ], env
    if name.startswith("litserve"):
        batch = ["--max-batch-size", "32", "--batch-timeout", "0.002"] if name.endswith("-batch") else []
        return [
            pythons["litserve"],
            str(PEERS / "litserve_app.py"),
            "--model-dir",
            str(model_dir),
            "--port",
            str(port),
            *batch,
        ], env
    bento_batch = "32" if name.endswith("-batch") else ""
    env |= {"DISTML_BENCH_MODEL_DIR": str(model_dir), "DISTML_BENCH_BENTO_BATCH": bento_batch}
    bentoml = str(Path(pythons["bentoml"]).with_name("bentoml"))
    return [
        bentoml,
        "serve",
        "bentoml_service:Classifier",
        "--working-dir",
        str(PEERS),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ], env


def ready_path(name: str, model: str) -> str:
    if name.startswith("litserve"):
        return "/health"
    if name.startswith("bentoml"):
        return "/readyz"
    return f"/v2/models/{model}/ready"


def _listening(address: str | None, wait_s: float = 5.0) -> str | None:
    """``address`` once it accepts a connection (within ``wait_s``), else None: a distml whose serve takes
    --grpc-port but does not serve gRPC yet gives no gRPC column rather than a failed run."""
    if address is None:
        return None
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
            return address
        except OSError:
            time.sleep(0.1)
    print(f"note: nothing listens on the gRPC port {address}: no gRPC column", flush=True)
    return None


def start(name: str, model_dir: Path, model: str, tmp: Path, pythons: dict[str, str], grpc: bool) -> Running:
    """Start one server on CPU 0 in its own session, its output to a file; return once it answers ready."""
    port, grpc_port = _free_port(), (_free_port() if grpc and name == "distml" else None)
    cmd, env = command(name, model_dir, port, grpc_port, pythons, tmp)
    log = tmp / f"{name}.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            ["taskset", "-c", str(SERVER_CPU), *cmd],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,
            start_new_session=True,
        )
    address = None if grpc_port is None else f"127.0.0.1:{grpc_port}"
    server = Running(name, proc, f"http://127.0.0.1:{port}", address, log)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            server.stop()
            raise RuntimeError(f"{name} exited with {proc.returncode} while starting:\n{_tail(log)}")
        try:
            if _get(server.base, ready_path(name, model)) == 200:
                server.grpc = _listening(server.grpc)
                return server
        except OSError:
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"{name} was not ready after {START_TIMEOUT_S:.0f} s:\n{_tail(log)}")


# -- one request before the load, then the points ----------------------------------------------------------------
def url(server: Running, kind: str, model: str) -> str:
    if kind == "v1":
        return f"{server.base}/v1/models/{model}:predict"
    if server.name.startswith("litserve"):
        return f"{server.base}/predict"
    if server.name.startswith("bentoml"):
        return f"{server.base}/infer"
    return f"{server.base}/v2/models/{model}/infer"


def check(server: Running, kind: str, model: str, bodies: dict[str, bytes], pixels: bytes) -> dict[str, Any]:
    """One request of ``kind``: it must answer 200; returns its class (every server must agree)."""
    if kind in ("grpc", "grpc-stream"):
        assert server.grpc is not None
        one = grpcload.grpc_class if kind == "grpc" else grpcload.grpc_stream_class
        return one(server.grpc, model, pixels)
    request = urllib.request.Request(
        url(server, kind, model), data=bodies[kind], method="POST", headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:  # raises on a non-2xx answer
        doc = json.loads(response.read())
    if kind == "v1":
        class_id = doc["predictions"][0]["class_id"]
    elif isinstance(doc, list):  # BentoML: one entry per image
        class_id = doc[0]["class_id"]
    elif "class_id" in doc:  # LitServe
        class_id = doc["class_id"]
    else:
        probs = next(o for o in doc["outputs"] if o["name"] == "probabilities")["data"]
        class_id = max(range(len(probs)), key=lambda i: probs[i])
    return {"status": 200, "class_id": int(class_id)}
