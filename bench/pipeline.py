"""Benchmark ``distml run`` on the real Fashion-MNIST: cold by step, warm rerun, and one changed candidate.

1. cold: a fresh workspace, the default pipeline (the seed's three candidates, 2 DDP workers each, ``--epochs``);
   the step times come from the run's own record (``<home>/pipeline/runs/<id>/run.json``);
2. warm: the same command again, ``--repeats`` times, nothing changed: every step must be a hit; the whole
   command's wall time (process start to exit) is what a user waits;
3. changed: one candidate's learning rate changes (through ``[[candidates]]`` tables in a config file): only that
   candidate and the steps after it may run (``register`` is a hit when the same model wins again: its input,
   the winner's ONNX file, is unchanged); which ran and how long the command took.

Writes a table and ``bench/results/pipeline.json``.

Usage: python bench/pipeline.py [--epochs 5] [--repeats 5] [--source DIR] [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO.parent / "shared" / "datasets" / "fashion-mnist"
DISTML = [sys.executable, "-m", "distml"]


def run(home: Path, *args: str) -> tuple[float, dict[str, Any], str]:
    """One ``distml run``; returns (wall seconds, its run record, its output)."""
    started = time.perf_counter()
    done = subprocess.run([*DISTML, "--home", str(home), "run", *args], capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"error: distml run {' '.join(args)} failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    records = sorted((home / "pipeline" / "runs").glob("*/run.json"))
    return wall, json.loads(records[-1].read_text()), done.stdout


def steps_of(record: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: {"cache": s.get("cache"), "status": s.get("status"), "seconds": round(s.get("seconds") or 0.0, 2),
                   "why": s.get("why"), "metric": s.get("metric")} for name, s in record["steps"].items()}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=5, help="epochs of every candidate (default 5, the default)")
    parser.add_argument("--repeats", type=int, default=5, help="warm reruns (default 5)")
    parser.add_argument("--source", type=Path, default=SOURCE, help="folder with the Fashion-MNIST .gz files")
    parser.add_argument("--quick", action="store_true", help="1 epoch, 2 warm reruns: a smoke test")
    parser.add_argument("--out", type=Path, default=None, help="default bench/results/pipeline.json")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.repeats = 1, 2
    if not args.source.is_dir():
        sys.exit(f"error: no Fashion-MNIST copy in {args.source}; pass --source DIR")
    out = args.out or (Path(tempfile.gettempdir()) / "distml-bench-pipeline-quick.json" if args.quick
                       else REPO / "bench" / "results" / "pipeline.json")  # fmt: skip
    common = ["--source", str(args.source), "--epochs", str(args.epochs)]
    doc: dict[str, Any] = {"machine": {"cpu": platform.processor() or platform.machine(), "python":
                                       platform.python_version()}, "epochs": args.epochs}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="distml-bench-pipeline-") as tmp:
        home = Path(tmp) / "home"
        print(f"cold run ({args.epochs} epochs, 3 candidates x 2 workers) ...", flush=True)
        wall, record, _ = run(home, *common)
        doc["cold"] = {"wall_s": round(wall, 2), "steps": steps_of(record)}
        warm = []
        for i in range(args.repeats):
            wall, record, _ = run(home, *common)
            hits = [n for n, s in record["steps"].items() if s.get("cache") == "hit"]
            if len(hits) != len(record["steps"]):
                sys.exit(f"error: warm run {i + 1} was not all hits: {steps_of(record)}")
            warm.append(wall)
        doc["warm"] = {"wall_s": [round(w, 3) for w in warm], "median_s": round(statistics.median(warm), 3),
                       "min_s": round(min(warm), 3), "max_s": round(max(warm), 3)}  # fmt: skip
        config = Path(tmp) / "distml.toml"
        config.write_text('[[candidates]]\nmodel = "cnn"\n\n[[candidates]]\nmodel = "cnn-dropout"\nlr = 0.001\n\n'
                          '[[candidates]]\nmodel = "cnn-batchnorm"\n')  # fmt: skip
        wall, record, _ = run(home, "--config", str(config), *common)
        doc["changed"] = {"change": "cnn-dropout lr 0.002 -> 0.001", "wall_s": round(wall, 2),
                          "steps": steps_of(record)}  # fmt: skip
    print()
    print(f"{'STEP':<22} {'COLD':>8} {'CACHE':>6}   {'CHANGED':>8} {'CACHE':>6}  WHY (changed run)")
    for name, cold in doc["cold"]["steps"].items():
        ch = doc["changed"]["steps"][name]
        ch_time = f"{ch['seconds']:.1f}s" if ch["cache"] == "ran" else "-"
        print(f"{name:<22} {cold['seconds']:>7.1f}s {cold['cache']:>6}   {ch_time:>8} {ch['cache']:>6}  {ch['why']}")
    print(f"{'whole command':<22} {doc['cold']['wall_s']:>7.1f}s {'':>6}   {doc['changed']['wall_s']:>7.1f}s")
    w = doc["warm"]
    print(f"\nwarm rerun, nothing changed ({args.repeats}x): median {w['median_s']:.2f} s (min {w['min_s']:.2f}, "
          f"max {w['max_s']:.2f}); target <= 5 s")  # fmt: skip
    ran = {n for n, s in doc["changed"]["steps"].items() if s["cache"] == "ran"}
    # The changed candidate and select must run; register too unless the winner's model is the same file (then
    # its key is unchanged and it is a hit); nothing before or beside the changed candidate may run.
    ok = {"train[cnn-dropout]", "select"} <= ran <= {"train[cnn-dropout]", "select", "register"}
    doc["targets"] = {"warm_le_5s": w["median_s"] <= 5.0, "changed_runs_only_its_descendants": ok}
    print(
        f"changed run ran {', '.join(sorted(ran))} (only the changed candidate and what follows): "
        f"{'PASS' if ok else 'FAIL'}"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
