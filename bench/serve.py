"""Benchmark the model server: ``distml serve`` (batching on and off) against KServe's server, same ONNX model.

Three servers, one after the other, each alone on the machine while it is measured:

- ``distml``: ``distml serve MODEL`` with its defaults (dynamic batching, 1 worker, 1 ONNX Runtime thread);
- ``distml-nobatch``: the same with ``--max-batch-size 1``;
- ``kserve``: KServe 0.21's own Python server (``bench/_kserve_server.py``, 1 worker, from ``.venv-kserve``),
  the baseline "a KServe user would write". It logs four lines per request at its default INFO level (uvicorn's
  access line and three ``kserve.trace`` lines); they go to a file, as they would go to a container's log, and
  writing them is part of what a KServe request costs here.

Two single-image request kinds, each against every server:

- ``V1 b64-PNG``: ``POST /v1/models/NAME:predict`` with ``{"instances": [{"b64": "<PNG>"}]}``, a 28x28 grayscale
  PNG (the first Fashion-MNIST test image when the dataset copy is there);
- ``V2 UINT8``: ``POST /v2/models/NAME/infer`` with one ``images`` UINT8 tensor ``[1, 28, 28, 1]`` as 784 JSON
  integers, and an ``id``.

For each: closed-loop capacity (``wrk``, one thread, concurrency 1, 8 and 64 connections, req/s), then latency at
fixed arrival rates (``hey`` rate-limited, p50/p99): the ``--rates`` that every server gets, and half of that
server's own peak (its best closed-loop req/s for that request kind). Every point checks its answers: wrk's
``Non-2xx or 3xx responses`` and ``Socket errors`` lines must be absent, hey's status codes must be only [200]
with no error lines; a point with errors is printed and recorded as such (``E``), never counted as good, and is
not used as a peak. Before loading a server, one request of each kind is sent and its answer checked.

CPU pinning. The machine has 2 cores. Each server process runs on CPU 0 (``taskset -c 0``, all of its threads),
the load generator on CPU 1 (``taskset -c 1``; wrk with 1 thread, hey with ``-cpus 1``), and this script itself
moves to CPU 1 once the model is built. Unpinned, the generator and the server fight for the same two cores and
the numbers mostly measure the scheduler (and whichever of them happened to win); pinned, each server gets one
whole core and the generator the other, the same for all three. The server's CPU time per request (from
/proc) and the generator's CPU use are recorded, so a point where the generator, not the server, was the limit
shows (generator near 100% of its core). Another process on the machine still shares those cores: the load
average before and after each server is recorded.

About hey's rate limit: ``-q`` is per worker and each worker waits for its answer before sending the next, so
``-c`` workers at ``-q R/c`` give R req/s only while latency stays under the worker's interval (c/R s); the
achieved rate is recorded and marked ``~`` when it falls under 90% of the target. The worker count is chosen
so that each worker sends one request every ``--worker-interval-ms`` (default 10 ms, half the 20 ms p99
target). hey's workers tick in phase, so the load arrives in bursts of ``c`` requests every ``c/R`` seconds
rather than evenly spread; a batching server can merge such a burst, an unbatched one answers it in turn.

The model: ``--model DIR`` (a distml artifact folder, model.onnx + model.json), or by default a seed ``cnn``
trained for one epoch on the real Fashion-MNIST (``../shared/datasets/fashion-mnist``), exported, and cached in
bench/.cache/serve-model (the weights do not change the speed).

Batching on vs off at concurrency 1 differs by a few percent at most, less than this machine drifts between
two runs minutes apart; so both distml servers are then started together (both on CPU 0, one idle while the
other is measured) and measured in turn (ABBA order), ``--ab-rounds`` times 4 s each, and that target
compares the medians.

Overload (``distml`` only, V2 UINT8, right after that server's capacity points, so the same run), in
``--overload-rounds`` rounds (default 3), each a c=64 capacity point then the overload point: ``hey`` closed
loop at ``--overload-concurrency`` (default 1,000) connections, each sending until the time is up (``-z``): a
1 s ramp then ``--overload-duration`` s (default 10), every request's status and latency written by hey (``-o
csv``). Goodput is the 200s answered per second of that window (the fewest requests in flight during it is
recorded: every connection stays busy); the target compares it with the c=64 capacity (wrk) measured just before
it, and takes the median share over the rounds (the other overload targets take the worst round; p99 is of the
200s of the window, the whole run's is recorded beside it). hey's CSV leaves out requests that got no answer,
so the server's own ``distml_requests_total`` (every status) is compared with hey's rows, and the kernel's
listen-queue overflows and drops (``/proc/net/netstat``) are recorded beside it. The server's RSS is read before
and after. Until 2026-11-30 the point sent a fixed count per connection (``-n``); see :func:`run_overload` for
why that measured the generator draining rather than the server.

Targets, printed as pass/fail rows: distml req/s >= 2x KServe's at concurrency 64 (both request kinds); distml
p99 <= 20 ms at half of its own peak; batching on costs nothing at concurrency 1 (>= 0.95x batching off) and
gains at concurrency 64 (> 1.0x); under overload (c=1,000) goodput >= 70% of the c=64 capacity, only 200 and
503 answers and no unanswered request, p99 of the accepted (200) requests <= 250 ms, RSS growth <= 100 MB.

Usage: python bench/serve.py [--duration 5] [--warmup 1] [--rates 100,500] [--only v1,v2]
                             [--servers distml,distml-nobatch,kserve] [--model DIR] [--quick] [--out FILE]
                             [--overload-concurrency 1000] [--overload-duration 10] [--overload-rounds 3]
                             [--overload-only]
"""

from __future__ import annotations

import argparse
import base64
import gzip
import http.client
import io
import json
import math
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO.parent / "shared" / "datasets" / "fashion-mnist"
CACHE = REPO / "bench" / ".cache" / "serve-model"
DISTML_PY = REPO / ".venv" / "bin" / "python"
KSERVE_SERVER = REPO / "bench" / "_kserve_server.py"
KSERVE_ENV = REPO / "bench" / "_kserve_env.sh"
WRK, HEY = "/usr/bin/wrk", "/usr/bin/hey"
SERVER_CPU, LOAD_CPU = 0, 1
CONCURRENCY = (1, 8, 64)
RATES = (100.0, 500.0)
SERVERS = ("distml", "distml-nobatch", "kserve")
PROTOCOLS = {"v1": "V1 b64-PNG", "v2": "V2 UINT8"}
P99_TARGET_MS = 20.0
OVERLOAD_GOODPUT = 0.70  # goodput at the overload point, as a share of the c=64 capacity
OVERLOAD_P99_MS = 250.0
OVERLOAD_RSS_MB = 100.0
SUSTAINED = 0.9  # an open-loop point whose achieved rate is under this share of the target is marked "~"
START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 20.0
OVERLOAD_RAMP_S = 1  # the overload point's first second (1,000 connections opening): not in its goodput
RUN_SLACK_S = 30.0  # a load run's subprocess timeout is its duration plus this
LUA = """local f = assert(io.open({body}, "rb"))
wrk.body = f:read("*a")
f:close()
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
"""


# -- the model and the request bodies ----------------------------------------------------------------------
def build_model(source: Path, cache: Path) -> Path:
    """The cached artifact folder, or ingest + train (seed cnn, 1 epoch, 1 worker) + export one into ``cache``."""
    if (cache / "model.onnx").is_file() and (cache / "model.json").is_file():
        print(f"model: {cache} (cached)", flush=True)
        return cache
    if not source.is_dir():
        sys.exit(f"error: no Fashion-MNIST copy in {source}; pass --source DIR or --model DIR")
    print(f"model: building a 1-epoch seed cnn from {source} into {cache} ...", flush=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="distml-bench-serve-model-") as tmp:
        home = Path(tmp) / "home"

        def distml(*args: str) -> None:
            cmd = [str(DISTML_PY), "-m", "distml", "--home", str(home), *args]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
            if done.returncode != 0:
                sys.exit(f"error: {' '.join(cmd)} failed ({done.returncode}):\n{done.stdout}{done.stderr}")

        distml("data", "ingest", "fashion-mnist", "--source", str(source))
        distml("train", "--model", "cnn", "--workers", "1", "--epochs", "1", "--run-name", "bench-serve")
        distml("models", "export", "bench-serve", "--out", str(Path(tmp) / "model"))
        staging = cache.with_name(cache.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(Path(tmp) / "model", staging)
        shutil.rmtree(cache, ignore_errors=True)
        staging.rename(cache)
    print(f"model: built in {time.perf_counter() - started:.0f} s", flush=True)
    return cache


def sample_image(source: Path) -> tuple[bytes, str]:
    """784 grayscale pixels: the first Fashion-MNIST test image if the copy is there, else fixed noise."""
    images = source / "t10k-images-idx3-ubyte.gz"
    if images.is_file():
        with gzip.open(images, "rb") as f:
            pixels = f.read(16 + 784)[16:]
        if len(pixels) == 784:
            return pixels, f"{images.name}[0]"
    return bytes((i * 2654435761 >> 13) & 0xFF for i in range(784)), "fixed pseudo-random pixels"


def request_bodies(pixels: bytes) -> dict[str, bytes]:
    buf = io.BytesIO()
    Image.frombytes("L", (28, 28), pixels).save(buf, format="PNG")
    v1 = {"instances": [{"b64": base64.b64encode(buf.getvalue()).decode()}]}
    v2 = {"id": "bench-1", "inputs": [{"name": "images", "shape": [1, 28, 28, 1], "datatype": "UINT8",
                                       "data": list(pixels)}]}  # fmt: skip
    return {"v1": json.dumps(v1).encode(), "v2": json.dumps(v2).encode()}


def endpoint(protocol: str, model: str) -> str:
    return f"/v1/models/{model}:predict" if protocol == "v1" else f"/v2/models/{model}/infer"


# -- the servers -------------------------------------------------------------------------------------------
@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    base: str
    log: Path
    cmd: list[str]


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after STOP_TIMEOUT_S; only this process, by its pid."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _get(base: str, path: str, timeout: float = 5) -> int:
    host, port = base.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start_server(name: str, model_dir: Path, model: str, tmp: Path, kserve_py: str | None) -> Server:
    """Start one server on CPU 0, its output to a file; return once its model answers ready."""
    log = tmp / f"{name}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    pin = ["taskset", "-c", str(SERVER_CPU)]
    if name == "kserve":
        assert kserve_py is not None
        port = _free_port()
        cmd = [*pin, kserve_py, str(KSERVE_SERVER), "--model-dir", str(model_dir), "--port", str(port),
               "--workers", "1"]  # fmt: skip
        base: str | None = f"http://127.0.0.1:{port}"
    else:
        nobatch = ["--max-batch-size", "1"] if name == "distml-nobatch" else []
        cmd = [*pin, str(DISTML_PY), "-m", "distml", "--home", str(tmp / "home"), "serve", str(model_dir),
               "--host", "127.0.0.1", "--port", "0", *nobatch]  # fmt: skip
        base = None  # from its "listening on URL" line, as tests/serve_support.py reads it
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode} while starting:\n{_tail(log)}")
            if base is None:
                line = next((ln for ln in _tail(log, 200).splitlines() if ln.startswith("listening on ")), None)
                base = line.split()[-1] if line else None
            if base is not None:
                try:
                    if _get(base, f"/v2/models/{model}/ready") == 200:
                        return Server(name, proc, base, log, cmd)
                except OSError:
                    pass
            time.sleep(0.1)
        raise RuntimeError(f"{name} was not ready after {START_TIMEOUT_S:.0f} s:\n{_tail(log)}")
    except BaseException:
        stop(proc)
        raise


def check_answer(server: Server, protocol: str, model: str, body: bytes) -> dict[str, Any]:
    """One request before the load: it must be 200 with one prediction; returns its class id."""
    host, port = server.base.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("POST", endpoint(protocol, model), body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        status, raw = response.status, response.read()
    finally:
        conn.close()
    if status != 200:
        raise RuntimeError(f"{server.name} {protocol}: HTTP {status}: {raw[:500]!r}")
    doc = json.loads(raw)
    if protocol == "v1":
        class_id = int(doc["predictions"][0]["class_id"])
    else:
        probs = next(o for o in doc["outputs"] if o["name"] == "probabilities")["data"]
        class_id = max(range(len(probs)), key=lambda i: probs[i])
    return {"status": status, "class_id": class_id, "response_bytes": len(raw)}


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpus_allowed(pid: int) -> str:
    status = Path(f"/proc/{pid}/status").read_text()
    return next((ln.split(":", 1)[1].strip() for ln in status.splitlines() if ln.startswith("Cpus_allowed_list")), "?")


# -- the load generators -----------------------------------------------------------------------------------
def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _generate(cmd: list[str], duration: int, server: Server) -> tuple[str, float, float, float]:
    """Run a load generator on CPU 1; returns (its output, wall s, its CPU share, server CPU s)."""
    server_before, gen_before, started = cpu_seconds(server.proc.pid), _children_cpu(), time.perf_counter()
    done = subprocess.run(
        ["taskset", "-c", str(LOAD_CPU), *cmd], capture_output=True, text=True, timeout=duration + RUN_SLACK_S
    )
    wall = time.perf_counter() - started
    server_cpu = cpu_seconds(server.proc.pid) - server_before
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    if server.proc.poll() is not None:
        raise RuntimeError(f"{server.name} died during the load:\n{_tail(server.log)}")
    return done.stdout, wall, (_children_cpu() - gen_before) / wall, server_cpu


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip()).groups()  # type: ignore[union-attr]
    return float(value) * _UNITS[unit]


def parse_wrk(out: str) -> dict[str, Any]:
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.M)
    total = re.search(r"^\s*(\d+) requests in ([\d.]+\w+)", out, re.M)
    if rps is None or total is None:
        raise RuntimeError(f"cannot read wrk's output:\n{out}")
    latency = {m[0]: _ms(m[1]) for m in re.findall(r"^\s+(50|75|90|99)%\s+(\S+)$", out, re.M)}
    errors: dict[str, int] = {}
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    if non2xx:
        errors["non_2xx_3xx"] = int(non2xx[1])
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if sock:
        errors.update({k: int(v) for k, v in zip(("connect", "read", "write", "timeout"), sock.groups(), strict=True)})
    errors = {k: v for k, v in errors.items() if v}
    return {"req_per_s": float(rps[1]), "requests": int(total[1]), "p50_ms": latency.get("50"),
            "p99_ms": latency.get("99"), "errors": errors, "ok": not errors}  # fmt: skip


def run_wrk(server: Server, url: str, script: Path, conns: int, duration: int) -> dict[str, Any]:
    cmd = [WRK, "-t1", f"-c{conns}", f"-d{duration}s", "--latency", "-s", str(script), url]
    out, wall, gen_cpu, server_cpu = _generate(cmd, duration, server)
    result = parse_wrk(out)
    result.update(concurrency=conns, seconds=round(wall, 2), generator_cpu_share=round(gen_cpu, 3),
                  server_cpu_share=round(server_cpu / wall, 3),
                  server_cpu_ms_per_req=round(1e3 * server_cpu / max(result["requests"], 1), 4))  # fmt: skip
    return result


def parse_hey(out: str) -> dict[str, Any]:
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if rps is None:
        raise RuntimeError(f"cannot read hey's output:\n{out}")
    latency = {m[0]: 1e3 * float(m[1]) for m in re.findall(r"^\s+(\d+)% in ([\d.]+) secs", out, re.M)}
    codes_text = out.split("Status code distribution:", 1)[1] if "Status code distribution:" in out else ""
    codes_text = codes_text.split("Error distribution:", 1)[0]
    codes = {m[0]: int(m[1]) for m in re.findall(r"\[(\d+)\]\s+(\d+) responses", codes_text)}
    errors_text = out.split("Error distribution:", 1)[1] if "Error distribution:" in out else ""
    errors = [ln.strip() for ln in errors_text.splitlines() if ln.strip()]
    ok = set(codes) == {"200"} and not errors
    return {"achieved_req_per_s": float(rps[1]), "requests": sum(codes.values()), "p50_ms": latency.get("50"),
            "p99_ms": latency.get("99"), "status_codes": codes, "errors": errors, "ok": ok}  # fmt: skip


def run_hey(server: Server, url: str, body: Path, rate: float, duration: int, interval_s: float) -> dict[str, Any]:
    workers = max(1, math.ceil(rate * interval_s))
    per_worker = rate / workers
    cmd = [HEY, "-z", f"{duration}s", "-c", str(workers), "-q", f"{per_worker:.6g}", "-m", "POST",
           "-T", "application/json", "-D", str(body), "-cpus", "1", url]  # fmt: skip
    out, wall, gen_cpu, server_cpu = _generate(cmd, duration, server)
    result = parse_hey(out)
    result.update(rate=rate, workers=workers, per_worker_qps=per_worker, seconds=round(wall, 2),
                  sustained=result["achieved_req_per_s"] >= SUSTAINED * rate,
                  generator_cpu_share=round(gen_cpu, 3), server_cpu_share=round(server_cpu / wall, 3))  # fmt: skip
    return result


# -- overload: far more clients than the server can answer -------------------------------------------------
def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("VmRSS:"))) / 1024


def listen_drops() -> dict[str, int]:
    """The kernel's counters of connections its listen queues could not take (TcpExt in /proc/net/netstat)."""
    lines = [ln.split() for ln in Path("/proc/net/netstat").read_text().splitlines() if ln.startswith("TcpExt:")]
    table = dict(zip(lines[0][1:], map(int, lines[1][1:]), strict=True))
    return {k: table.get(k, 0) for k in ("ListenOverflows", "ListenDrops")}


def served_by_status(base: str) -> dict[str, float]:
    """``distml_requests_total`` summed by status, from the server's own /metrics."""
    host, port = base.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    out: dict[str, float] = {}
    for m in re.finditer(r'^distml_requests_total\{[^}]*status="(\d+)"[^}]*\} ([\d.e+]+)$', text, re.M):
        out[m[1]] = out.get(m[1], 0.0) + float(m[2])
    return out


def run_overload(server: Server, url: str, body: Path, conns: int, duration: int) -> dict[str, Any]:
    """hey closed loop at ``conns`` connections for ``OVERLOAD_RAMP_S + duration`` s; statuses and latencies per
    request, goodput counted over the last ``duration`` s, while every connection is still sending.

    Why by time (``-z``) and not by count (``-n``): with a fixed count per connection, connections whose requests
    were accepted (~70 ms each) finish their share in about a second and leave, while those that were refused
    (held ~2 s each) go on; the offered load fell from 1,000 connections to under 100 within the run (measured:
    in flight 946 at 1 s, 534 at 7 s, 6 at 10 s), so the last seconds measured the generator draining, with
    the server's core idle, not the server under overload. With ``-z`` every connection sends until the time is
    up; hey then waits for the requests in flight (their answers are in its CSV).

    hey's CSV leaves out requests that got no answer (connection errors, its 20 s timeout), so they are counted
    from the server's side: its ``distml_requests_total`` over the run, every status, less the rows hey wrote, is
    the number of answers that never reached a client (a request the server never saw shows in the kernel's
    listen-queue counters, recorded beside it). Goodput and the accepted latencies are of the requests answered
    in the window after the first ``OVERLOAD_RAMP_S`` s, while 1,000 connections open at once (their first
    requests' latencies include the connection: the whole run's p99 is recorded beside them).
    """
    cmd = [HEY, "-z", f"{OVERLOAD_RAMP_S + duration}s", "-c", str(conns), "-m", "POST", "-T", "application/json",
           "-D", str(body), "-cpus", "1", "-o", "csv", url]  # fmt: skip
    before, drops_before, rss_before = served_by_status(server.base), listen_drops(), rss_mb(server.proc.pid)
    out, wall, gen_cpu, server_cpu = _generate(cmd, OVERLOAD_RAMP_S + duration + 30, server)
    rss_after, drops_after = rss_mb(server.proc.pid), listen_drops()
    after = served_by_status(server.base)
    statuses: dict[str, int] = {}
    accepted: list[float] = []  # every 200's latency, ms
    steady: list[float] = []  # those answered within the goodput window
    ramp_and_window = 0  # 200s answered before the window ended, the ramp's included
    window_end = OVERLOAD_RAMP_S + duration
    spans: list[tuple[float, int]] = []  # (time, +1 request sent / -1 answered), for the connections in flight
    for row in out.splitlines()[1:]:
        fields = row.split(",")
        if len(fields) < 8:
            continue
        seconds, status, offset = float(fields[0]), fields[6], float(fields[7])
        statuses[status] = statuses.get(status, 0) + 1
        spans += [(offset, 1), (offset + seconds, -1)]
        if status == "200":
            accepted.append(seconds * 1e3)
            if OVERLOAD_RAMP_S <= offset + seconds < window_end:
                steady.append(seconds * 1e3)
            ramp_and_window += offset + seconds < window_end
    accepted.sort()
    steady.sort()
    answered = sum(statuses.values())
    server_side = {k: int(after.get(k, 0) - before.get(k, 0)) for k in after if after.get(k, 0) - before.get(k, 0)}
    drops = {k: drops_after[k] - drops_before[k] for k in drops_after}
    unanswered = max(0, sum(server_side.values()) - answered)

    def pct(q: float, values: list[float]) -> float | None:
        return values[min(len(values) - 1, int(q * len(values)))] if values else None

    in_flight, least = 0, conns  # the fewest requests in flight at any moment of the goodput window
    for t, step in sorted(spans):
        in_flight += step
        if OVERLOAD_RAMP_S <= t < window_end:
            least = min(least, in_flight)
    ok = set(statuses) <= {"200", "503"} and set(server_side) <= {"200", "503"} and unanswered == 0
    return {"concurrency": conns, "seconds": round(wall, 2), "window_s": [OVERLOAD_RAMP_S, window_end],
            "status_codes": statuses, "goodput_req_per_s": len(steady) / duration,
            "goodput_with_ramp_req_per_s": ramp_and_window / window_end, "answered_req_per_s": answered / wall,
            "least_in_flight": least, "accepted_p50_ms": pct(0.50, steady), "accepted_p99_ms": pct(0.99, steady),
            "accepted_p99_ms_whole_run": pct(0.99, accepted),
            "server_side_status_codes": server_side, "listen_queue": drops, "unanswered": unanswered,
            "rss_mb_before": round(rss_before, 1), "rss_mb_after": round(rss_after, 1),
            "generator_cpu_share": round(gen_cpu, 3), "server_cpu_share": round(server_cpu / wall, 3),
            "ok": ok}  # fmt: skip


def overload_rounds(
    server: Server, url: str, script: Path, body: Path, c64: dict[str, Any], args: argparse.Namespace, label: str
) -> dict[str, Any]:
    """``--overload-rounds`` overload points, each right after a c=64 capacity point of its own (the first reuses
    the capacity point just measured), so each goodput is compared with the capacity of the same minute.

    On a shared machine the c=64 capacity alone moved 1,443-1,750 req/s between runs; one capacity against one
    overload point then says as much about the neighbours as about the server. The summary takes the median of
    the rounds' goodput/capacity shares, and the worst round for the other targets (p99, RSS, status codes).
    """
    rounds: list[dict[str, Any]] = []
    for i in range(args.overload_rounds):
        capacity = c64 if i == 0 else run_wrk(server, url, script, 64, args.duration)
        r = run_overload(server, url, body, args.overload_concurrency, args.overload_duration)
        r["capacity_req_per_s"] = capacity["req_per_s"]
        r["share"] = r["goodput_req_per_s"] / capacity["req_per_s"]
        print(f"{label} round {i + 1}: c=64 capacity {capacity['req_per_s']:,.0f} req/s", flush=True)
        print_overload(label, r)
        rounds.append(r)
    shares = [r["share"] for r in rounds]
    p99s = [r["accepted_p99_ms"] for r in rounds]
    worst_rss = max(rounds, key=lambda r: r["rss_mb_after"] - r["rss_mb_before"])
    median_round = sorted(rounds, key=lambda r: r["share"])[len(rounds) // 2]
    return {
        **median_round,  # the figures of the median round; the targets below use all rounds
        "rounds": rounds,
        "share_median": statistics.median(shares),
        "accepted_p99_ms_worst": None if None in p99s else max(p for p in p99s if p is not None),
        "rss_growth_mb_worst": worst_rss["rss_mb_after"] - worst_rss["rss_mb_before"],
        "ok_all": all(r["ok"] for r in rounds),
        "status_codes_all": {k: sum(r["status_codes"].get(k, 0) for r in rounds) for k in
                             sorted({k for r in rounds for k in r["status_codes"]})},
        "unanswered_all": sum(r["unanswered"] for r in rounds),
    }  # fmt: skip


def print_overload(label: str, r: dict[str, Any]) -> None:
    print(f"{label} overload c={r['concurrency']}: goodput {r['goodput_req_per_s']:,.0f}/s (with the ramp "
          f"{r['goodput_with_ramp_req_per_s']:,.0f}/s, fewest in flight {r['least_in_flight']}) of "
          f"{r['answered_req_per_s']:,.0f}/s answered, codes {r['status_codes']}, accepted p50 "
          f"{r['accepted_p50_ms'] or float('nan'):.1f} ms p99 {r['accepted_p99_ms'] or float('nan'):.1f} ms "
          f"(whole run {r.get('accepted_p99_ms_whole_run') or float('nan'):.0f} ms), "
          f"RSS {r['rss_mb_before']:.0f} -> {r['rss_mb_after']:.0f} MB, unanswered {r['unanswered']}, "
          f"server cpu {r['server_cpu_share']:.0%}, hey cpu {r['generator_cpu_share']:.0%}", flush=True)  # fmt: skip


# -- one server, one protocol ------------------------------------------------------------------------------
def measure(
    server: Server, protocol: str, url: str, script: Path, body: Path, args: argparse.Namespace
) -> dict[str, Any]:
    label = f"{PROTOCOLS[protocol]:<10} {server.name:<15}"
    warm = run_wrk(server, url, script, 8, args.warmup)
    closed = []
    for c in CONCURRENCY:
        closed.append(run_wrk(server, url, script, c, args.duration))
        r = closed[-1]
        print(f"{label} c={c:<3} {r['req_per_s']:>9,.0f} req/s  p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms"
              f"  server cpu {r['server_cpu_share']:.0%}  wrk cpu {r['generator_cpu_share']:.0%}"
              f"{'' if r['ok'] else '  ERRORS ' + json.dumps(r['errors'])}", flush=True)  # fmt: skip
    overload = None
    if server.name == "distml" and protocol == "v2" and args.overload_concurrency:
        c64 = next((r for r in closed if r["concurrency"] == 64), closed[-1])
        overload = overload_rounds(server, url, script, body, c64, args, label)
    good = [r["req_per_s"] for r in closed if r["ok"]]
    peak = max(good) if good else None
    rates = [(float(rate), "fixed") for rate in args.rates]
    if peak is not None and not args.overload_only:
        rates.append((float(round(peak / 2)), "half-peak"))
    opened = []
    for rate, kind in rates:
        r = run_hey(server, url, body, rate, args.duration, args.worker_interval_ms / 1000)
        r["kind"] = kind
        opened.append(r)
        flags = ("" if r["sustained"] else "  NOT SUSTAINED") + (
            "" if r["ok"] else f"  ERRORS codes {r['status_codes']} {r['errors'][:3]}"
        )
        print(f"{label} {kind:>9} {rate:>7,.0f}/s: achieved {r['achieved_req_per_s']:,.0f}/s  "
              f"p50 {r['p50_ms'] or float('nan'):.2f} ms  p99 {r['p99_ms'] or float('nan'):.2f} ms  "
              f"({r['workers']} workers){flags}", flush=True)  # fmt: skip
    return {"protocol": protocol, "server": server.name, "warmup": warm, "closed": closed, "peak_req_per_s": peak,
            "open": opened, "overload": overload}  # fmt: skip


def interleaved_c1(
    model_dir: Path, model: str, tmp: Path, protocols: list[str], files: dict[str, tuple[Path, Path]], rounds: int
) -> dict[str, Any]:
    """Batching on vs off at concurrency 1, both servers up at once (both on CPU 0) and measured in turn.

    The difference at c=1 is a few percent at most, under this machine's drift between two runs minutes apart;
    alternating short runs of the two servers and comparing medians takes the drift out.
    """
    names = ("distml", "distml-nobatch")
    (tmp / "ab").mkdir(exist_ok=True)
    servers = {n: start_server(n, model_dir, model, tmp / "ab", None) for n in names}
    out: dict[str, Any] = {"rounds": rounds, "seconds": 4}
    try:
        for p in protocols:
            script = files[p][0]
            runs: dict[str, list[float]] = {n: [] for n in names}
            for s in servers.values():
                run_wrk(s, s.base + endpoint(p, model), script, 1, 1)  # warm-up
            for i in range(rounds):  # ABBA order, so neither server is always the one measured first
                for n, s in list(servers.items())[:: 1 if i % 2 == 0 else -1]:
                    r = run_wrk(s, s.base + endpoint(p, model), script, 1, 4)
                    if r["ok"]:
                        runs[n].append(r["req_per_s"])
            out[p] = {n: {"median": statistics.median(v) if v else None, "min": min(v, default=None),
                          "max": max(v, default=None), "runs": v} for n, v in runs.items()}  # fmt: skip
            a, b = out[p]["distml"], out[p]["distml-nobatch"]
            print(f"{PROTOCOLS[p]:<10} c=1 interleaved x{rounds}: batching on {a['median']:,.0f} "
                  f"({a['min']:,.0f}-{a['max']:,.0f}), off {b['median']:,.0f} ({b['min']:,.0f}-{b['max']:,.0f}) "
                  "req/s", flush=True)  # fmt: skip
    finally:
        for s in servers.values():
            stop(s.proc)
    return out


# -- the report --------------------------------------------------------------------------------------------
def _find(results: list[dict[str, Any]], protocol: str, server: str) -> dict[str, Any] | None:
    return next((r for r in results if r["protocol"] == protocol and r["server"] == server), None)


def _closed(results: list[dict[str, Any]], protocol: str, server: str, c: int) -> dict[str, Any] | None:
    entry = _find(results, protocol, server)
    return next((r for r in entry["closed"] if r["concurrency"] == c), None) if entry else None


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else "PASS" if ok else "FAIL"


def targets(results: list[dict[str, Any]], ab: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []

    def ratio_row(
        protocol: str, target: str, a: tuple[str, int], b: tuple[str, int], least: float, strict: bool
    ) -> None:
        ra, rb = _closed(results, protocol, *a), _closed(results, protocol, *b)
        if ra is None or rb is None:
            rows.append({"protocol": protocol, "target": target, "value": "not measured", "verdict": "n/a"})
            return
        ratio = ra["req_per_s"] / rb["req_per_s"]
        value = f"{ratio:.2f}x ({ra['req_per_s']:,.0f} / {rb['req_per_s']:,.0f} req/s)"
        errors = not (ra["ok"] and rb["ok"])
        passed = (ratio > least if strict else ratio >= least) and not errors
        rows.append({"protocol": protocol, "target": target, "ratio": ratio,
                     "value": value + (" with errors" if errors else ""), "verdict": _verdict(passed)})  # fmt: skip

    for protocol in PROTOCOLS:
        name = PROTOCOLS[protocol]
        ratio_row(protocol, f"{name}: distml req/s >= 2x KServe at c=64", ("distml", 64), ("kserve", 64), 2.0, False)
        entry = _find(results, protocol, "distml")
        half = next((r for r in entry["open"] if r["kind"] == "half-peak"), None) if entry else None
        target = f"{name}: distml p99 <= {P99_TARGET_MS:g} ms at half its peak"
        if half is None or half["p99_ms"] is None:
            rows.append({"protocol": protocol, "target": target, "value": "not measured", "verdict": "n/a"})
        else:
            value = (f"p99 {half['p99_ms']:.2f} ms at {half['rate']:,.0f} req/s "
                     f"(achieved {half['achieved_req_per_s']:,.0f})")  # fmt: skip
            value += "" if half["ok"] else " with errors"
            rows.append({"protocol": protocol, "target": target, "p99_ms": half["p99_ms"], "value": value,
                         "verdict": _verdict(half["p99_ms"] <= P99_TARGET_MS and half["ok"])})  # fmt: skip
        target = f"{name}: batching on/off at c=1 >= 0.95 (no loss)"
        pair = ab.get(protocol) if ab else None
        if ab and pair and pair["distml"]["median"] and pair["distml-nobatch"]["median"]:
            on, off = pair["distml"]["median"], pair["distml-nobatch"]["median"]
            verdict = _verdict(on >= 0.95 * off)
            rows.append({"protocol": protocol, "target": target, "ratio": on / off, "verdict": verdict,
                         "value": f"{on / off:.2f}x (medians of {ab['rounds']} interleaved runs: {on:,.0f} / "
                                  f"{off:,.0f} req/s)"})  # fmt: skip
        else:
            ratio_row(protocol, target, ("distml", 1), ("distml-nobatch", 1), 0.95, False)
        ratio_row(protocol, f"{name}: batching on/off at c=64 > 1.0 (a gain)", ("distml", 64),
                  ("distml-nobatch", 64), 1.0, True)  # fmt: skip
        rows.extend(overload_rows(results, protocol))
    return rows


def overload_rows(results: list[dict[str, Any]], protocol: str) -> list[dict[str, Any]]:
    entry, capacity = _find(results, protocol, "distml"), _closed(results, protocol, "distml", 64)
    r = entry.get("overload") if entry else None
    if r is None or capacity is None:
        return []
    name, c, n = PROTOCOLS[protocol], r["concurrency"], len(r.get("rounds", [r]))
    if "rounds" in r:  # the median share over rounds, each against the capacity measured just before it
        share, p99, growth = r["share_median"], r["accepted_p99_ms_worst"], r["rss_growth_mb_worst"]
        shares = ", ".join(f"{x['share']:.0%}" for x in r["rounds"])
        share_text = f"median {share:.0%} of {n} rounds ({shares})"
        ok, codes, unanswered = r["ok_all"], r["status_codes_all"], r["unanswered_all"]
    else:  # results written before rounds: one overload point against the run's one c=64 capacity
        share = r["goodput_req_per_s"] / capacity["req_per_s"]
        p99, growth = r["accepted_p99_ms"], r["rss_mb_after"] - r["rss_mb_before"]
        share_text = f"{share:.0%} ({r['goodput_req_per_s']:,.0f} / {capacity['req_per_s']:,.0f} req/s)"
        ok, codes, unanswered = r["ok"], r["status_codes"], r["unanswered"]
    worst = f" (worst of {n})" if n > 1 else ""
    return [
        {"protocol": protocol, "target": f"{name}: goodput at c={c} >= {OVERLOAD_GOODPUT:.0%} of c=64 capacity",
         "ratio": share, "verdict": _verdict(share >= OVERLOAD_GOODPUT), "value": share_text},
        {"protocol": protocol, "target": f"{name}: at c={c} only 200/503 answers, none unanswered",
         "verdict": _verdict(ok), "value": f"{codes}, unanswered {unanswered}"},
        {"protocol": protocol, "target": f"{name}: at c={c} p99 of accepted <= {OVERLOAD_P99_MS:g} ms",
         "verdict": _verdict(p99 is not None and p99 <= OVERLOAD_P99_MS),
         "value": "no accepted request" if p99 is None else f"p99 {p99:.1f} ms{worst}"},
        {"protocol": protocol, "target": f"{name}: at c={c} RSS growth <= {OVERLOAD_RSS_MB:g} MB",
         "verdict": _verdict(growth <= OVERLOAD_RSS_MB), "value": f"{growth:+.0f} MB{worst}"},
    ]  # fmt: skip


def print_table(results: list[dict[str, Any]], rates: list[float], rows: list[dict[str, Any]]) -> None:
    def lat(r: dict[str, Any] | None, with_rate: bool = False) -> str:
        if r is None or r["p50_ms"] is None:
            return "-"
        text = f"{r['p50_ms']:.1f}/{r['p99_ms']:.1f}"
        text = (f"{r['rate']:,.0f}: " if with_rate else "") + text
        return text + ("" if r["sustained"] else "~") + ("" if r["ok"] else " E")

    heads = ["protocol", "server", *(f"c={c} req/s" for c in CONCURRENCY),
             *(f"@{rate:,.0f}/s p50/p99 ms" for rate in rates), "@half peak: p50/p99 ms"]  # fmt: skip
    table = [heads]
    for entry in results:
        cells = [PROTOCOLS[entry["protocol"]], entry["server"]]
        for r in entry["closed"]:
            cells.append(f"{r['req_per_s']:,.0f}" + ("" if r["ok"] else " E"))
        fixed = [r for r in entry["open"] if r["kind"] == "fixed"]
        cells.extend(lat(r) for r in fixed)
        cells.append(lat(next((r for r in entry["open"] if r["kind"] == "half-peak"), None), with_rate=True))
        table.append(cells)
    widths = [max(len(row[i]) for row in table) for i in range(len(heads))]
    for i, row in enumerate(table):
        print(
            "  ".join(
                cell.ljust(w) if j < 2 else cell.rjust(w) for j, (cell, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print("E: the point had errors (non-2xx or socket errors); ~: achieved rate under 90% of the target rate\n")
    width = max(len(r["target"]) for r in rows)
    for r in rows:
        print(f"{r['target']:<{width}}  {r['verdict']:<4}  {r['value']}")


# -- machine and versions ----------------------------------------------------------------------------------
def versions(python: str, packages: list[str]) -> dict[str, str | None]:
    code = (
        "import importlib.metadata as m, json, sys\n"
        "def v(p):\n"
        "    try:\n"
        "        return m.version(p)\n"
        "    except m.PackageNotFoundError:\n"
        "        return None\n"
        "print(json.dumps({p: v(p) for p in sys.argv[1:]}))"
    )
    done = subprocess.run([python, "-c", code, *packages], capture_output=True, text=True, timeout=60, check=True)
    found: dict[str, str | None] = json.loads(done.stdout)
    return found


def machine(kserve_py: str | None) -> dict[str, Any]:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())  # fmt: skip
    wrk = subprocess.run([WRK, "-v"], capture_output=True, text=True, timeout=10, check=False)
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "distml_venv": versions(
            str(DISTML_PY), ["distml", "uvicorn", "uvloop", "httptools", "onnxruntime", "numpy", "orjson", "pillow"]
        ),
        "kserve_venv": versions(kserve_py, ["kserve", "uvicorn", "fastapi", "onnxruntime", "numpy", "pillow"])
        if kserve_py
        else None,
        "wrk": (wrk.stdout + wrk.stderr).splitlines()[0] if (wrk.stdout + wrk.stderr) else WRK,
        "hey": HEY,
    }


def _kserve_python() -> str:
    done = subprocess.run([str(KSERVE_ENV)], capture_output=True, text=True, timeout=1800, check=False)
    if done.returncode != 0:
        sys.exit(f"error: {KSERVE_ENV} failed ({done.returncode}):\n{done.stderr}")
    return done.stdout.strip().splitlines()[-1]


def _on_sigterm(_sig: int, _frame: Any) -> NoReturn:
    raise SystemExit(143)  # so the finally blocks stop the servers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=5, help="seconds per measured point (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="seconds of load before each server's points")
    parser.add_argument("--rates", default=",".join(f"{r:g}" for r in RATES),
                        help="fixed arrival rates, req/s, comma-separated (half of each peak is added)")  # fmt: skip
    parser.add_argument("--only", default="v1,v2", help="request kinds: v1 (b64 PNG), v2 (UINT8 tensor)")
    parser.add_argument("--servers", default=",".join(SERVERS), help="comma-separated: " + ", ".join(SERVERS))
    parser.add_argument("--worker-interval-ms", type=float, default=10.0,
                        help="hey: one request per worker per this interval (sets the worker count)")  # fmt: skip
    parser.add_argument("--ab-rounds", type=int, default=6,
                        help="interleaved c=1 runs of batching on/off, both servers up (0: skip)")  # fmt: skip
    parser.add_argument("--model", type=Path, default=None, help="artifact folder (model.onnx + model.json)")
    parser.add_argument("--source", type=Path, default=SOURCE, help="folder with the Fashion-MNIST .gz files")
    parser.add_argument("--overload-concurrency", type=int, default=1000,
                        help="distml V2: connections of the overload point (0: skip it)")  # fmt: skip
    parser.add_argument("--overload-duration", type=int, default=10, help="seconds of the overload point")
    parser.add_argument(
        "--overload-rounds",
        type=int,
        default=3,
        help="overload points, each after its own c=64 capacity point; the goodput target takes the median share",
    )
    parser.add_argument("--overload-only", action="store_true",
                        help="distml V2 only: the c=1,8,64 capacity points and the overload point")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="1 s points: a smoke test, not a measurement")
    parser.add_argument("--out", type=Path, default=None,
                        help="results JSON (default bench/results/serve.json; --overload-only: "
                             "serve-overload-latest.json; --quick: a temp file)")  # fmt: skip
    args = parser.parse_args()
    protocols = [p for p in args.only.split(",") if p]
    servers = [s for s in args.servers.split(",") if s]
    if set(protocols) - set(PROTOCOLS) or not protocols:
        parser.error(f"--only takes v1, v2; got {args.only!r}")
    if set(servers) - set(SERVERS) or not servers:
        parser.error(f"--servers takes {', '.join(SERVERS)}; got {args.servers!r}")
    try:
        args.rates = [float(r) for r in args.rates.split(",") if r]
    except ValueError:
        parser.error(f"--rates takes numbers, e.g. 100,500; got {args.rates!r}")
    if any(r <= 0 for r in args.rates):
        parser.error("--rates must be positive")
    if args.overload_only:
        args.only, args.servers, args.ab_rounds, args.rates = "v2", "distml", 0, []
        protocols, servers = ["v2"], ["distml"]
    if args.quick:
        args.duration, args.warmup, args.ab_rounds = 1, 1, min(args.ab_rounds, 1)
        args.overload_duration = min(args.overload_duration, 2)
    if args.overload_rounds < 1:
        parser.error("--overload-rounds must be at least 1")
    if args.quick:
        args.overload_rounds = 1
    if args.duration < 1 or args.warmup < 1:
        parser.error("--duration and --warmup are whole seconds, at least 1")
    if args.out is None:
        smoke = Path(tempfile.gettempdir()) / "distml-bench-serve-quick.json"
        # an overload-only run does not replace the full comparison in serve.json
        name = "serve-overload-latest.json" if args.overload_only else "serve.json"
        args.out = smoke if args.quick else REPO / "bench" / "results" / name
    if not {SERVER_CPU, LOAD_CPU} <= os.sched_getaffinity(0):
        sys.exit(f"error: needs CPUs {SERVER_CPU} and {LOAD_CPU} (server and load generator); have "
                 f"{sorted(os.sched_getaffinity(0))}")  # fmt: skip
    for tool in (WRK, HEY, shutil.which("taskset")):
        if not tool or not os.access(tool, os.X_OK):
            sys.exit(f"error: {tool or 'taskset'} is not installed")
    signal.signal(signal.SIGTERM, _on_sigterm)

    model_dir = (args.model or build_model(args.source, CACHE)).resolve()
    card = json.loads((model_dir / "model.json").read_text())
    model = card["name"]
    kserve_py = _kserve_python() if "kserve" in servers else None
    os.sched_setaffinity(0, {LOAD_CPU})  # from here on this script stays off the servers' core
    pixels, image_from = sample_image(args.source)
    bodies = request_bodies(pixels)
    doc: dict[str, Any] = {
        "machine": machine(kserve_py),
        "settings": {
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "quick": args.quick,
            "concurrency": list(CONCURRENCY),
            "rates": args.rates,
            "worker_interval_ms": args.worker_interval_ms,
            "server_cpu": SERVER_CPU,
            "load_cpu": LOAD_CPU,
            "model_dir": str(model_dir),
            "model": model,
            "image": image_from,
            "request_bytes": {p: len(bodies[p]) for p in protocols},
            "wrk": "wrk -t1 -cC -dDs --latency -s SCRIPT URL",
            "hey": "hey -z Ds -c W -q RATE/W -m POST -T application/json -D BODY -cpus 1 URL",
            "overload_rounds": args.overload_rounds,
            "overload": f"hey -z {OVERLOAD_RAMP_S + args.overload_duration}s -c {args.overload_concurrency} -m POST "
            f"-T application/json -D BODY -cpus 1 -o csv URL (goodput over the last {args.overload_duration} s)",
        },
        "servers": {},
        "results": [],
    }
    print(f"\nmodel {model} ({model_dir}); servers on CPU {SERVER_CPU}, load on CPU {LOAD_CPU}; {args.duration} s "
          f"per point\n", flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="distml-bench-serve-") as tmp_name:
        tmp = Path(tmp_name)
        files: dict[str, tuple[Path, Path]] = {}
        for p in protocols:
            body = tmp / f"{p}.json"
            body.write_bytes(bodies[p])
            script = tmp / f"{p}.lua"
            script.write_text(LUA.format(body=json.dumps(str(body))))
            files[p] = (script, body)
        for name in servers:
            load_before = os.getloadavg()
            server = start_server(name, model_dir, model, tmp, kserve_py)
            try:
                info: dict[str, Any] = {"command": server.cmd, "cpus_allowed": cpus_allowed(server.proc.pid),
                                        "loadavg_before": load_before, "answers": {}}  # fmt: skip
                doc["servers"][name] = info
                for p in protocols:
                    info["answers"][p] = check_answer(server, p, model, bodies[p])
                for p in protocols:
                    url = server.base + endpoint(p, model)
                    doc["results"].append(measure(server, p, url, *files[p], args))
            finally:
                stop(server.proc)
            info["loadavg_after"] = os.getloadavg()
            info["exit_code"] = server.proc.returncode
            text = server.log.read_bytes()
            info["log_lines"], info["log_bytes"] = text.count(b"\n"), len(text)
        if {"distml", "distml-nobatch"} <= set(servers) and args.ab_rounds:
            doc["interleaved_c1"] = interleaved_c1(model_dir, model, tmp, protocols, files, args.ab_rounds)
    doc["results"].sort(key=lambda r: (protocols.index(r["protocol"]), servers.index(r["server"])))
    doc["targets"] = targets(doc["results"], doc.get("interleaved_c1"))
    m = doc["machine"]
    note = " (--quick: a smoke test, not a measurement)" if args.quick else ""
    print(f"\n{m['cpu']} ({m['cores']} cores), server on CPU {SERVER_CPU}, load on CPU {LOAD_CPU}; "
          f"{args.duration} s per point{note}\n")  # fmt: skip
    print_table(doc["results"], args.rates, doc["targets"])
    classes = {f"{s} {p}": a["class_id"] for s, i in doc["servers"].items() for p, a in i["answers"].items()}
    if len(set(classes.values())) > 1:
        print(f"\nwarning: the servers disagree on the sample image's class: {classes}")
    if "kserve" in doc["servers"]:
        k = doc["servers"]["kserve"]
        print(f"\nkserve wrote {k['log_lines']:,} log lines ({k['log_bytes'] / 1e6:.1f} MB) during the run")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
