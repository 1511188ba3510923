"""Is the serving hot path slower than it was? ``distml serve`` of this checkout against an older one, interleaved.

Both servers serve the same ONNX model on CPU 0 (one worker, the defaults); wrk sends the V2 UINT8 single-image
body at c=64 from CPU 1. Both start once; the one not being measured is paused (SIGSTOP), and the rounds alternate
which goes first, so a change of the machine's speed shows in both columns rather than as a difference. The older
code runs in this repository's venv with ``PYTHONPATH=OLD/src`` (make it with ``git worktree add /tmp/old REV``).

Usage: python bench/serve_ab.py --old /tmp/old [--rounds 5] [--seconds 5] [--out FILE]
Writes bench/results/serve-ab.json (req/s per round, medians, both revisions).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from serve import CACHE, DISTML_PY, LOAD_CPU, LUA, SERVER_CPU, SOURCE, WRK, build_model, request_bodies, sample_image

REPO = Path(__file__).resolve().parents[1]


def revision(checkout: Path) -> str:
    done = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def start(src: Path | None, model_dir: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, **({"PYTHONPATH": str(src)} if src else {}))
    cmd = ["taskset", "-c", str(SERVER_CPU), str(DISTML_PY), "-m", "distml", "serve", str(model_dir)]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*cmd, "--port", str(port)], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2):
                return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    sys.exit(f"error: the server on port {port} did not become ready:\n{log.read_text()[-2000:]}")


def wrk(url: str, script: Path, seconds: int) -> float:
    cmd = ["taskset", "-c", str(LOAD_CPU), WRK, "-t1", "-c64", "--timeout=10s", "-s", str(script)]
    subprocess.run([*cmd, "-d1s", url], capture_output=True, timeout=60, check=False)  # warm-up
    out = subprocess.run([*cmd, f"-d{seconds}s", url], capture_output=True, text=True, timeout=seconds + 60).stdout
    if re.search(r"Non-2xx or 3xx responses|Socket errors", out):
        sys.exit(f"error: wrk saw failed requests:\n{out}")
    return float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1])  # type: ignore[index]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", type=Path, required=True, help="an older checkout of this repository")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=5, help="seconds per measured point")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "serve-ab.json")
    args = parser.parse_args()
    if not (args.old / "src" / "distml").is_dir():
        parser.error(f"--old {args.old} is not a checkout of distml (no src/distml)")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the finally block stops the servers
    model_dir = build_model(SOURCE, CACHE).resolve()
    model = json.loads((model_dir / "model.json").read_text())["name"]
    pixels, _ = sample_image(SOURCE)
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"distml-serve-ab-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "v2.json").write_bytes(request_bodies(pixels)["v2"])
    script = tmp / "v2.lua"
    script.write_text(LUA.format(body=json.dumps(str(tmp / "v2.json"))))
    names = {"head": revision(REPO), "old": revision(args.old)}
    servers: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
    results: dict[str, list[float]] = {"head": [], "old": []}
    try:
        for name, src, port in (("head", None, 18181), ("old", args.old / "src", 18182)):
            servers[name] = (start(src, model_dir, port, tmp / f"{name}.log"), port)
            servers[name][0].send_signal(signal.SIGSTOP)
        for r in range(args.rounds):
            for name in ("head", "old") if r % 2 == 0 else ("old", "head"):
                proc, port = servers[name]
                proc.send_signal(signal.SIGCONT)
                try:
                    rps = wrk(f"http://127.0.0.1:{port}/v2/models/{model}/infer", script, args.seconds)
                finally:
                    proc.send_signal(signal.SIGSTOP)
                results[name].append(rps)
                print(f"round {r + 1}/{args.rounds}  {name} ({names[name]}): {rps:,.0f} req/s", flush=True)
    finally:
        for proc, _ in servers.values():
            proc.send_signal(signal.SIGCONT)  # a stopped process would not act on SIGTERM
            proc.terminate()
        for proc, _ in servers.values():
            proc.wait(timeout=30)
    medians = {name: statistics.median(values) for name, values in results.items()}
    print(f"\nV2 UINT8 c=64, medians of {args.rounds} rounds: ", end="")
    print(" | ".join(f"{name} ({names[name]}) {medians[name]:,.0f} req/s" for name in results), end="")
    print(f" | head/old {medians['head'] / medians['old']:.2f}x")
    doc = {"revisions": names, "rounds": results, "medians": medians, "loadavg_end": os.getloadavg()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
