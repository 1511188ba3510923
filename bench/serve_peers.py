"""distml serve side by side with the Python model servers a team would otherwise pick, on the same ONNX model.

Servers (each its own venv but distml's, the same ``model.onnx``, one worker, every process on CPU 0, the load
generator on CPU 1, as bench/serve.py does for KServe):

- ``distml``: ``distml serve MODEL --grpc-port P`` with its defaults (dynamic batching, 1 worker, 1 thread);
- ``kserve``: KServe 0.21's Python server (bench/_kserve_server.py, .venv-kserve);
- ``litserve`` / ``litserve-batch``: LitServe 0.2.19 (bench/peers/litserve_app.py), its defaults
  (``max_batch_size=1``), then its batching on (``max_batch_size=32, batch_timeout=2 ms``, distml's own
  batch size and delay);
- ``bentoml`` / ``bentoml-batch``: BentoML 1.4.40 (bench/peers/bentoml_service.py), its defaults, then its
  adaptive batching (``batchable=True, max_batch_size=32``, its default latency budget).

Request kinds, all one 28x28 image (the first Fashion-MNIST test image): ``v1`` (V1 b64 PNG, distml and
KServe), ``v2`` (the V2 UINT8 JSON body, 784 integers; the very same bytes to distml, KServe, LitServe and
BentoML: the peers' endpoints read that body's ``inputs``), ``grpc`` (distml's gRPC V2 ModelInfer, the image
as raw contents, sent by h2load: see bench/_grpc_load.py). Closed loop at 1, 8 and 64 connections (wrk for
REST, h2load for gRPC: C generators both, one connection per request in flight).

The machine is shared (other jobs run on both cores while this runs), so the configurations are interleaved:
every server is started once and then paused (SIGSTOP: a paused server takes no CPU; LitServe's batching loop
polls at ~20% of a core when idle), and ``--rounds`` rounds each measure all of them at c=1, then all at c=8,
then all at c=64, resuming only the one being measured (1 s of warm-up first), in an order rotated by one each
round: the points compared with each other are seconds apart, not minutes. Each figure is the median over the
rounds (each round's values are kept); the targets compare medians and print the per-round ratios. Every
point checks its answers (wrk's non-2xx and socket errors; h2load's failures plus the server's own gRPC status
counts); a point with errors is marked and never counted. Each point records the load average, the CPU the
server used, the load generator's, and what other processes took of the server's core
(``others_on_server_cpu_share``); a point where the server got under a quarter of its core (another job held
it) is marked ``starved`` and not counted either.

Targets: distml REST V2 >= 3x LitServe and >= 2x BentoML at c=64 (each peer's better configuration), distml
>= 2x KServe at c=64 (V1 and V2, as bench/serve.py), gRPC V2 >= 1.2x REST V2 at c=64.

Usage: python bench/serve_peers.py [--rounds 3] [--duration 3] [--servers ...] [--quick] [--out FILE]
Needs: wrk, h2load (apt-get install nghttp2-client), taskset; the venvs are created on first use.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _grpc_load as grpcload
import _perf_analyzer as perfanalyzer
from _peer_servers import Running, check, start, url
from serve import (
    CACHE,
    DISTML_PY,
    LOAD_CPU,
    LUA,
    SERVER_CPU,
    SOURCE,
    WRK,
    _free_port,
    _kserve_python,
    _tail,
    build_model,
    machine,
    parse_wrk,
    request_bodies,
    sample_image,
    versions,
)

REPO = Path(__file__).resolve().parents[1]
PEER_ENV = REPO / "bench" / "_peer_env.sh"
SERVERS = ("distml", "kserve", "litserve", "litserve-batch", "bentoml", "bentoml-batch")
KINDS = {"distml": ("v1", "v2", "grpc", "grpc-stream"), "kserve": ("v1", "v2")}  # the peers: v2 only
GRPC_KINDS = ("grpc", "grpc-stream")
CONCURRENCY = (1, 8, 64)
WRK_TIMEOUT_S = 10
STARVED = 0.25  # a point whose server got under this share of its core is not counted (shared machine)


def grpc_statuses(base: str) -> dict[str, float]:
    """The server's own count of gRPC calls by (HTTP-equivalent) status, from /metrics."""
    import urllib.request

    with urllib.request.urlopen(base + "/metrics", timeout=30) as response:
        text = response.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("distml_requests_total{") and 'protocol="grpc"' in line:
            status = re.search(r'status="(\d+)"', line)
            if status:
                out[status[1]] = out.get(status[1], 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def _cpu_busy(cpu: int) -> float:
    """Seconds CPU ``cpu`` has been busy (not idle or waiting on I/O) since boot, every process together."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{cpu} "):
            ticks = [int(x) for x in line.split()[1:]]
            return (sum(ticks[:8]) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
    return 0.0


def _children_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def point(
    server: Running, kind: str, target: str, files: dict[str, Path], conns: int, seconds: int, model: str
) -> dict[str, Any]:
    """One closed-loop point on CPU 1: wrk (REST), h2load (unary gRPC) or perf_analyzer (gRPC streams), with
    both sides' CPU and the load average."""
    log, env = files["h2load_log"], None
    if kind in GRPC_KINDS:
        before = grpc_statuses(server.base)
    if kind == "grpc":
        cmd = grpcload.h2load_command(target, files["grpc"], conns, seconds, log)
    elif kind == "grpc-stream":
        cmd = perfanalyzer.command(target, model, files["pa_input"], conns, seconds, streaming=True)
        env = perfanalyzer.env()
    else:
        # --timeout: wrk counts an answer slower than its 2 s default as a socket timeout, and the slower peers
        # take longer than that at c=64 while the shared machine is busy; slow is what the figures show, not an error.
        script = str(files[f"{kind}.lua"])
        cmd = [
            WRK,
            "-t1",
            f"-c{conns}",
            f"-d{seconds}s",
            f"--timeout={WRK_TIMEOUT_S}s",
            "--latency",
            "-s",
            script,
            target,
        ]
    load, cpu, gen, busy0 = os.getloadavg()[0], server.cpu_seconds(), _children_cpu(), _cpu_busy(SERVER_CPU)
    started = time.perf_counter()
    done = subprocess.run(
        ["taskset", "-c", str(LOAD_CPU), *cmd],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=False,
        env=env,
    )
    wall = time.perf_counter() - started
    server_cpu, gen_cpu = server.cpu_seconds() - cpu, _children_cpu() - gen
    others = max(0.0, _cpu_busy(SERVER_CPU) - busy0 - server_cpu)  # what other processes ran on the server's core
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    if server.proc.poll() is not None:
        raise RuntimeError(f"{server.name} died during the load:\n{_tail(server.log)}")
    if kind == "grpc":
        r = grpcload.parse_h2load(done.stdout, log)
    elif kind == "grpc-stream":
        r = perfanalyzer.parse(done.stdout)
    else:
        r = parse_wrk(done.stdout)
    if kind in GRPC_KINDS:  # a gRPC error is an HTTP 200 to h2load: the server's own counts say
        after = grpc_statuses(server.base)
        statuses = {k: int(v - before.get(k, 0.0)) for k, v in after.items() if v - before.get(k, 0.0)}
        r["server_statuses"] = statuses
        # h2load (perf_analyzer) stops at the deadline by resetting the calls (streams) still in flight: the
        # server counts each as cancelled (499). Up to one per request in flight is that ending, not an error.
        r["cancelled_at_end"] = statuses.get("499", 0)
        if set(statuses) - {"200", "499"} or r["cancelled_at_end"] > conns:
            r["errors"]["server_statuses"], r["ok"] = statuses, False
    if server_cpu / wall < STARVED:  # the server barely ran: a point about the neighbours, not about it
        r["errors"]["starved"], r["ok"] = round(server_cpu / wall, 3), False
    r.update(
        others_on_server_cpu_share=round(others / wall, 3),
        concurrency=conns,
        seconds=round(wall, 2),
        loadavg_1m_before=round(load, 2),
        loadavg_1m_after=round(os.getloadavg()[0], 2),
        server_cpu_share=round(server_cpu / wall, 3),
        generator_cpu_share=round(gen_cpu / wall, 3),
    )
    return r


def generator_ceiling(files: dict[str, Path], seconds: int, tmp: Path) -> dict[str, Any]:
    """h2load at c=64 against a trivial servicer (no model, a fixed answer) on CPU 0: a floor under what h2load
    itself can send here (the trivial Python server may be the limit: see its CPU share)."""
    port = _free_port()
    log = tmp / "trivial.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                "taskset",
                "-c",
                str(SERVER_CPU),
                str(DISTML_PY),
                str(Path(grpcload.__file__)),
                "--trivial-server",
                str(port),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = Running("trivial-grpc", proc, "", f"127.0.0.1:{port}", log)
    try:
        deadline = time.monotonic() + 60
        while "listening on" not in _tail(log) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        cmd = grpcload.h2load_command(f"http://127.0.0.1:{port}", files["grpc"], 64, seconds, files["h2load_log"])
        gen, started = _children_cpu(), time.perf_counter()
        done = subprocess.run(
            ["taskset", "-c", str(LOAD_CPU), *cmd], capture_output=True, text=True, timeout=seconds + 30, check=False
        )
        wall = time.perf_counter() - started
        r = grpcload.parse_h2load(done.stdout, files["h2load_log"])
        r["generator_cpu_share"] = round((_children_cpu() - gen) / wall, 3)
        return r
    finally:
        server.stop()


# -- the summary -------------------------------------------------------------------------------------------------
def medians(points: dict[str, dict[str, dict[int, list[dict[str, Any]]]]]) -> dict[str, Any]:
    """server -> kind -> c -> the median req/s (and p99) over the rounds' good points."""
    out: dict[str, Any] = {}
    for name, kinds in points.items():
        for kind, by_c in kinds.items():
            for c, runs in by_c.items():
                good = [r for r in runs if r["ok"]]
                p99s = [r["p99_ms"] for r in good if r["p99_ms"] is not None]
                out.setdefault(name, {}).setdefault(kind, {})[str(c)] = {
                    "req_per_s": statistics.median(r["req_per_s"] for r in good) if good else None,
                    "p99_ms": statistics.median(p99s) if p99s else None,
                    "rounds": [round(r["req_per_s"]) if r["ok"] else None for r in runs],
                }
    return out


def targets(m: dict[str, Any]) -> list[dict[str, Any]]:
    def at64(name: str, kind: str) -> dict[str, Any] | None:
        entry: dict[str, Any] | None = m.get(name, {}).get(kind, {}).get("64")
        return entry if entry and entry["req_per_s"] else None

    def row(target: str, a: tuple[str, str], b: list[tuple[str, str]], least: float) -> dict[str, Any]:
        """``a`` over the best of ``b`` (medians over the rounds), and the same ratio in each round."""
        mine, theirs = at64(*a), {f"{n} {k}": e for n, k in b if (e := at64(n, k))}
        if mine is None or not theirs:
            return {"target": target, "verdict": "n/a", "value": "not measured"}
        who, top = max(theirs.items(), key=lambda item: float(item[1]["req_per_s"]))
        ratio = mine["req_per_s"] / top["req_per_s"]
        per_round = []
        for i, x in enumerate(mine["rounds"]):
            ys = [e["rounds"][i] for e in theirs.values() if i < len(e["rounds"]) and e["rounds"][i]]
            if x and ys:
                per_round.append(x / max(ys))
        value = (
            f"{ratio:.2f}x ({mine['req_per_s']:,.0f} / {top['req_per_s']:,.0f} req/s, {who}); by round: "
            + ", ".join(f"{x:.2f}x" for x in per_round)
        )
        return {
            "target": target,
            "ratio": ratio,
            "per_round": per_round,
            "value": value,
            "verdict": "PASS" if ratio >= least else "FAIL",
        }

    lit = [("litserve", "v2"), ("litserve-batch", "v2")]
    bento = [("bentoml", "v2"), ("bentoml-batch", "v2")]
    return [
        row("distml REST V2 >= 3x LitServe at c=64 (its better config)", ("distml", "v2"), lit, 3.0),
        row("distml REST V2 >= 2x BentoML at c=64 (its better config)", ("distml", "v2"), bento, 2.0),
        row("distml REST V1 >= 2x KServe V1 at c=64", ("distml", "v1"), [("kserve", "v1")], 2.0),
        row("distml REST V2 >= 2x KServe V2 at c=64", ("distml", "v2"), [("kserve", "v2")], 2.0),
        row("distml gRPC V2 unary >= 1.2x REST V2 at c=64", ("distml", "grpc"), [("distml", "v2")], 1.2),
        row("distml gRPC V2 stream >= 1.2x REST V2 at c=64", ("distml", "grpc-stream"), [("distml", "v2")], 1.2),
    ]


LABELS = {
    "v1": "REST V1 b64-PNG",
    "v2": "REST V2 UINT8 JSON",
    "grpc": "gRPC V2 raw UINT8",
    "grpc-stream": "gRPC V2 stream raw",
}


def print_table(m: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    print(
        f"\n{'request':<19} {'server':<15}"
        + "".join(f"{'c=' + str(c) + ' req/s':>13}" for c in CONCURRENCY)
        + f"{'c=64 p99 ms':>13}"
    )
    for kind in LABELS:
        for name in SERVERS:
            entry = m.get(name, {}).get(kind)
            if entry is None:
                continue
            cells = [entry[str(c)]["req_per_s"] for c in CONCURRENCY]
            p99 = entry["64"]["p99_ms"]
            print(
                f"{LABELS[kind]:<19} {name:<15}"
                + "".join(f"{'E' if v is None else f'{v:,.0f}':>13}" for v in cells)
                + f"{'-' if p99 is None else f'{p99:.1f}':>13}"
            )
    print("\nc=64 side by side (req/s, median of rounds):")
    cols = [
        ("KServe V2", "kserve", "v2"),
        ("LitServe", "litserve", "v2"),
        ("LitServe+batch", "litserve-batch", "v2"),
        ("BentoML", "bentoml", "v2"),
        ("BentoML+batch", "bentoml-batch", "v2"),
        ("distml REST V1", "distml", "v1"),
        ("distml REST V2", "distml", "v2"),
        ("distml gRPC V2", "distml", "grpc"),
        ("distml gRPC V2 stream", "distml", "grpc-stream"),
    ]
    values = [m.get(n, {}).get(k, {}).get("64", {}).get("req_per_s") for _, n, k in cols]
    print(" | ".join(f"{h}: {'-' if v is None else f'{v:,.0f}'}" for (h, _, _), v in zip(cols, values, strict=True)))
    print()
    width = max(len(r["target"]) for r in rows)
    for r in rows:
        print(f"{r['target']:<{width}}  {r['verdict']:<4}  {r['value']}")


# -- the run -----------------------------------------------------------------------------------------------------
def _peer_python(peer: str) -> str:
    done = subprocess.run([str(PEER_ENV), peer], capture_output=True, text=True, timeout=1800, check=False)
    if done.returncode != 0:
        sys.exit(f"error: {PEER_ENV} {peer} failed ({done.returncode}):\n{done.stderr}")
    return str(Path(done.stdout.strip().splitlines()[-1]) / "python")


def _distml_has_grpc() -> bool:
    done = subprocess.run(
        [str(DISTML_PY), "-m", "distml", "serve", "--help"], capture_output=True, text=True, timeout=120, check=False
    )
    return "--grpc-port" in done.stdout


def run_rounds(args: argparse.Namespace, servers: list[str], ctx: dict[str, Any]) -> dict[str, Any]:
    """Every server started once (each checked with one request of each kind), then paused (SIGSTOP); each round
    measures every (server, kind) at c=1, then all at c=8, then all at c=64, resuming only the one measured (1 s
    of warm-up first) in an order rotated by one each round."""
    points: dict[str, dict[str, dict[int, list[dict[str, Any]]]]] = {}
    answers: dict[str, dict[str, Any]] = {}
    up: dict[str, Running] = {}
    try:
        for name in servers:
            server = up[name] = start(name, ctx["model_dir"], ctx["model"], ctx["tmp"], ctx["pythons"], ctx["grpc"])
            for kind in KINDS.get(name, ("v2",)):
                if kind not in GRPC_KINDS or (server.grpc and kind in ctx["grpc_kinds"]):
                    answers.setdefault(name, {})[kind] = check(server, kind, ctx["model"], ctx["bodies"], ctx["pixels"])
            server.signal(signal.SIGSTOP)
            print(f"{name} started and checked: {answers[name]}", flush=True)
        pairs = [(name, kind) for name in servers for kind in answers[name]]
        for rnd in range(args.rounds):
            order = pairs[rnd % len(pairs) :] + pairs[: rnd % len(pairs)]
            print(f"\nround {rnd + 1}/{args.rounds}", flush=True)
            for c in CONCURRENCY:
                for name, kind in order:
                    server = up[name]
                    target = {"grpc": f"http://{server.grpc}", "grpc-stream": str(server.grpc)}.get(kind) or url(
                        server, kind, ctx["model"]
                    )
                    server.signal(signal.SIGCONT)
                    try:
                        point(server, kind, target, ctx["files"], 8, 1, ctx["model"])  # warm-up, not kept
                        r = point(server, kind, target, ctx["files"], c, args.duration, ctx["model"])
                    finally:
                        server.signal(signal.SIGSTOP)
                    points.setdefault(name, {}).setdefault(kind, {}).setdefault(c, []).append(r)
                    print(
                        f"  {name:<15} {LABELS[kind]:<19} c={c:<3} {r['req_per_s']:>8,.0f} req/s  p99 "
                        f"{r['p99_ms'] or float('nan'):6.1f} ms  server cpu {r['server_cpu_share']:.0%}  load "
                        f"cpu {r['generator_cpu_share']:.0%}  others on its core {r['others_on_server_cpu_share']:.0%}"
                        + ("" if r["ok"] else f"  ERRORS {json.dumps(r['errors'])}"),
                        flush=True,
                    )
    finally:
        for server in up.values():
            server.signal(signal.SIGCONT)  # a stopped process would not act on SIGTERM
            server.stop()
    by_c = {n: {k: {str(c): v for c, v in cs.items()} for k, cs in kinds.items()} for n, kinds in points.items()}
    return {"points": by_c, "medians": medians(points), "answers": answers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each starting every server afresh")
    parser.add_argument("--duration", type=int, default=3, help="seconds per measured point")
    parser.add_argument("--servers", default=",".join(SERVERS), help="comma-separated: " + ", ".join(SERVERS))
    parser.add_argument("--model", type=Path, default=None, help="artifact folder (model.onnx + model.json)")
    parser.add_argument("--source", type=Path, default=SOURCE, help="folder with the Fashion-MNIST .gz files")
    parser.add_argument("--quick", action="store_true", help="1 round of 1 s points: a smoke test")
    parser.add_argument("--out", type=Path, default=None, help="default bench/results/serve-peers.json")
    args = parser.parse_args()
    servers = [s for s in args.servers.split(",") if s]
    if set(servers) - set(SERVERS) or not servers:
        parser.error(f"--servers takes {', '.join(SERVERS)}; got {args.servers!r}")
    if args.quick:
        args.rounds, args.duration = 1, 1
    if args.rounds < 1 or args.duration < 1:
        parser.error("--rounds and --duration are at least 1")
    out = args.out or (
        Path(tempfile.gettempdir()) / "distml-bench-serve-peers-quick.json"
        if args.quick
        else REPO / "bench" / "results" / "serve-peers.json"
    )
    if not {SERVER_CPU, LOAD_CPU} <= os.sched_getaffinity(0):
        sys.exit(f"error: needs CPUs {SERVER_CPU} and {LOAD_CPU}; have {sorted(os.sched_getaffinity(0))}")
    for tool in (WRK, shutil.which("taskset")):
        if not tool or not os.access(tool, os.X_OK):
            sys.exit(f"error: {tool or 'taskset'} is not installed")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the finally blocks stop the servers

    model_dir = (args.model or build_model(args.source, CACHE)).resolve()
    model = json.loads((model_dir / "model.json").read_text())["name"]
    pythons = {"kserve": _kserve_python()} if "kserve" in servers else {}
    pythons |= {p: _peer_python(p) for p in ("litserve", "bentoml") if any(s.startswith(p) for s in servers)}
    grpc_kinds: tuple[str, ...] = ()
    if "distml" in servers and _distml_has_grpc():
        grpc_kinds = ("grpc",) * (grpcload.H2LOAD is not None) + ("grpc-stream",) * (perfanalyzer.ensure() is not None)
    grpc = bool(grpc_kinds)
    if "distml" in servers and "grpc" not in grpc_kinds:
        print("note: no unary gRPC column (distml serve has no --grpc-port, or h2load is not installed)", flush=True)
    os.sched_setaffinity(0, {LOAD_CPU})  # this script stays off the servers' core
    pixels, image = sample_image(args.source)
    bodies = request_bodies(pixels)
    started = time.time()
    doc: dict[str, Any] = {
        "machine": machine(pythons.get("kserve"))
        | {
            "peer_venvs": {
                p: versions(py, [p, "uvicorn", "fastapi", "starlette", "pydantic", "onnxruntime", "numpy"])
                for p, py in pythons.items()
                if p != "kserve"
            },
            "h2load": subprocess.run(
                [grpcload.H2LOAD, "--version"], capture_output=True, text=True, check=False
            ).stdout.strip()
            if grpcload.H2LOAD
            else None,
            "loadavg_start": os.getloadavg(),
        },
        "settings": {
            "rounds": args.rounds,
            "duration_s": args.duration,
            "concurrency": list(CONCURRENCY),
            "servers": servers,
            "model_dir": str(model_dir),
            "model": model,
            "image": image,
            "server_cpu": SERVER_CPU,
            "load_cpu": LOAD_CPU,
            "quick": args.quick,
            "wrk": f"wrk -t1 -cC -dDs --timeout={WRK_TIMEOUT_S}s --latency -s SCRIPT URL",
            "h2load": "h2load -t1 -cC -m1 -DD -d BODY -H 'content-type: application/grpc' -H 'te: trailers' "
            "URL/inference.GRPCInferenceService/ModelInfer",
            "perf_analyzer": f"perf_analyzer ({perfanalyzer.WHEEL}) -i grpc --streaming --concurrency-range=C "
            "--input-data=IMAGE --measurement-mode=time_windows --measurement-interval=D*1000/3 "
            "--stability-percentage=1000 --max-trials=6",
        },
    }
    with tempfile.TemporaryDirectory(prefix="distml-bench-peers-") as tmp_name:
        tmp = Path(tmp_name)
        files = {"h2load_log": tmp / "h2load.log"}
        for kind in ("v1", "v2"):
            (tmp / f"{kind}.json").write_bytes(bodies[kind])
            files[f"{kind}.lua"] = tmp / f"{kind}.lua"
            files[f"{kind}.lua"].write_text(LUA.format(body=json.dumps(str(tmp / f"{kind}.json"))))
        if "grpc-stream" in grpc_kinds:
            files["pa_input"] = perfanalyzer.input_data(pixels, tmp / "perf-analyzer-input.json")
        if "grpc" in grpc_kinds:
            files["grpc"] = tmp / "grpc.bin"
            files["grpc"].write_bytes(grpcload.grpc_body(model, pixels))
            doc["grpc_generator_ceiling"] = generator_ceiling(files, args.duration, tmp)
            c = doc["grpc_generator_ceiling"]
            print(
                f"h2load against a trivial servicer: {c['req_per_s']:,.0f} calls/s at c=64, h2load cpu "
                f"{c['generator_cpu_share']:.0%}",
                flush=True,
            )
        ctx = {
            "model_dir": model_dir,
            "model": model,
            "tmp": tmp,
            "pythons": pythons,
            "grpc": grpc,
            "grpc_kinds": grpc_kinds,
            "bodies": bodies,
            "pixels": pixels,
            "files": files,
        }
        doc |= run_rounds(args, servers, ctx)
    doc["machine"]["loadavg_end"], doc["wall_s"] = os.getloadavg(), round(time.time() - started)
    doc["targets"] = targets(doc["medians"])
    print_table(doc["medians"], doc["targets"])
    classes = {f"{n} {k}": a["class_id"] for n, kinds in doc["answers"].items() for k, a in kinds.items()}
    if len(set(classes.values())) > 1:
        print(f"\nwarning: the servers disagree on the sample image's class: {classes}")
    print(
        f"\n{doc['wall_s']} s; load average {doc['machine']['loadavg_start'][0]:.1f} at the start, "
        f"{doc['machine']['loadavg_end'][0]:.1f} at the end"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
