"""Benchmark ``distml tune``: ASHA against no pruning, the tuner's overhead per trial, and ``distml run --search``.

(a) pruning: the same space, seed, sampler and trial count (default 16 trials of up to 8 epochs on Fashion-MNIST,
    cnn-family models), once with ``--pruner asha`` and once with ``--pruner none``, back to back in one
    invocation (a study cannot interleave the two), with the load average before and after each. The random
    sampler is the default here: seeded per trial, it proposes the same trials to both studies, so they differ only
    in what the pruner stopped. Epochs spent, wall time, best validation accuracy. Target: ASHA spends <= 40% of
    the unpruned epochs and its best is within 0.3 points of the unpruned best.
(b) overhead: trivial trials (1 epoch of a 256-image generated dataset): the study's wall time minus the time the
    trials' workers spent training and evaluating (``result.json`` seconds), per trial; and minus the trials' whole
    jobs (process start-up included), per trial: what the tuner itself adds between jobs.
(c) ``--e2e``: ``distml run --search`` from an empty workspace with the default space and budget: the champion's
    test accuracy and the wall time. Target: >= 94.0% within 30 minutes.

Prints a table and writes ``bench/results/search.json``: a section per part, each with the machine, git revision,
date and load averages it ran with.

Usage: python bench/search.py [--trials 16] [--epochs 8] [--only pruning,overhead] [--e2e] [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from distml.config import DistmlConfig
from distml.data.ingest import ingest
from distml.data.sources.fashion_mnist import FashionMnistSource, IdxSpec, MnistLikeSpec
from distml.data.store import DatasetStore
from distml.search.result import StudyResult
from distml.search.tuner import tune
from distml.workspace import Workspace

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO.parent / "shared" / "datasets" / "fashion-mnist"
DISTML = [sys.executable, "-m", "distml"]
# A cheap space: the seed CNNs, whose epochs take seconds, not minutes. Epochs are fixed by --epochs.
SPACE: dict[str, object] = {
    "model": ["cnn", "cnn-batchnorm"],
    "lr": {"low": 5e-4, "high": 5e-3, "log": True},
    "batch_size": [64, 128],
    "label_smoothing": [0.0, 0.1],
}
IDX_NAMES = {
    ("train", 3): "train-images-idx3-ubyte.gz",
    ("train", 1): "train-labels-idx1-ubyte.gz",
    ("test", 3): "t10k-images-idx3-ubyte.gz",
    ("test", 1): "t10k-labels-idx1-ubyte.gz",
}


def tiny_dataset(home: Path, folder: Path, n_train: int = 256, n_test: int = 64) -> str:
    """Ingest a generated MNIST-format dataset named ``tiny`` (random pixels: for timing, not accuracy)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    specs = []
    for (split, ndim), name in IDX_NAMES.items():
        n = n_train if split == "train" else n_test
        array = rng.integers(0, 256, (n, 28, 28) if ndim == 3 else n, dtype=np.uint8)
        if ndim == 1:
            array %= 10
        content = bytes([0, 0, 0x08, ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
        content += array.tobytes()
        packed = gzip.compress(content, mtime=0)
        (folder / name).write_bytes(packed)
        specs.append(IdxSpec(name, hashlib.sha256(content).hexdigest(), hashlib.md5(packed).hexdigest(), split, ndim))
    spec = MnistLikeSpec(files=tuple(specs), class_names=tuple(f"class{i}" for i in range(10)))
    source = FashionMnistSource(home / "downloads", location=str(folder), spec=spec)
    ingest(source, store=DatasetStore(Workspace(home)), name="tiny")
    return "tiny"


def study(home: Path, name: str, train: dict[str, object], search: dict[str, object], log: Path) -> dict[str, Any]:
    """Run one study with ``distml.search.tuner.tune`` (its progress to ``log``); its numbers."""
    config = DistmlConfig.model_validate({"train": train, "search": search})
    load_before = os.getloadavg()
    started = time.perf_counter()
    with log.open("w") as stream:
        result = tune(config, Workspace(home), study=name, stream=stream)
    wall = time.perf_counter() - started
    return summarise(result, wall, load_before)


def summarise(result: StudyResult, wall: float, load_before: tuple[float, float, float]) -> dict[str, Any]:
    trials = result.trials
    complete = [t for t in trials if t["state"] == "COMPLETE" and t["value"] is not None]
    best = max(complete, key=lambda t: t["value"] or 0.0) if complete else None
    training = [_training_seconds(Path(t["run_dir"])) for t in trials]
    return {
        "trials": len(trials),
        "states": {s: sum(t["state"] == s for t in trials) for s in ("COMPLETE", "PRUNED", "FAIL")},
        "epochs_spent": sum(t["epochs_used"] for t in trials),
        "wall_s": round(wall, 1),
        "trial_job_s": round(sum(t["seconds"] for t in trials), 1),
        "training_s": round(sum(training), 1),
        "best_val_accuracy": best["value"] if best else None,
        "best_trial": {"number": best["number"], "params": best["params"], "test_accuracy": best["test_accuracy"]}
        if best
        else None,
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    }


def _training_seconds(run_dir: Path) -> float:
    """What the trial's workers spent training and evaluating (``result.json``), 0 when it wrote none."""
    try:
        return float(json.loads((run_dir / "result.json").read_text())["seconds"])
    except (OSError, ValueError, KeyError):
        return 0.0


def pruning(home: Path, tmp: Path, args: argparse.Namespace, dataset: str) -> dict[str, Any]:
    train = {"dataset": dataset, "epochs": args.epochs, "workers": args.workers}
    out: dict[str, Any] = {"dataset": dataset, "epochs": args.epochs, "workers": args.workers, "space": SPACE}
    for pruner in ("asha", "none"):
        search = {
            "trials": args.trials,
            "seed": args.seed,
            "sampler": args.sampler,
            "pruner": pruner,
            "max_concurrent": args.max_concurrent,
            "space": SPACE,
        }
        print(f"(a) {pruner}: {args.trials} trials x up to {args.epochs} epochs on {dataset} ...", flush=True)
        out[pruner] = study(home, f"bench-{pruner}", train, search, tmp / f"tune-{pruner}.log")
        s = out[pruner]
        print(f"    {s['epochs_spent']} epochs, {s['wall_s']:.0f} s, best {_pct(s['best_val_accuracy'])}", flush=True)
    asha, none = out["asha"], out["none"]
    share = asha["epochs_spent"] / max(1, none["epochs_spent"])
    gap = None
    if asha["best_val_accuracy"] is not None and none["best_val_accuracy"] is not None:
        gap = round(100 * (none["best_val_accuracy"] - asha["best_val_accuracy"]), 3)
    out["asha_epoch_share"] = round(share, 3)
    out["best_gap_points"] = gap
    out["targets"] = {"epochs_le_40pct": share <= 0.40, "best_within_0.3_points": gap is not None and gap <= 0.3}
    return out


def overhead(home: Path, tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    dataset = tiny_dataset(home, tmp / "tiny-src")
    train = {"dataset": dataset, "epochs": 1, "workers": 1, "model": "cnn", "batch_size": 64, "log_every_steps": 1000}
    search = {
        "trials": args.overhead_trials,
        "seed": 0,
        "sampler": "random",
        "pruner": "none",
        "space": {"lr": {"low": 1e-3, "high": 1e-2, "log": True}},
    }
    print(f"(b) overhead: {args.overhead_trials} trials x 1 epoch of a 256-image dataset ...", flush=True)
    s = study(home, "bench-overhead", train, search, tmp / "tune-overhead.log")
    n = max(1, s["trials"])
    s["overhead_per_trial_s"] = round((s["wall_s"] - s["training_s"]) / n, 2)
    s["tuner_between_jobs_per_trial_s"] = round((s["wall_s"] - s["trial_job_s"]) / n, 2)
    return s


def end_to_end(tmp: Path, args: argparse.Namespace, log_file: Path) -> dict[str, Any]:
    """``distml run --search`` in a fresh workspace; the champion's test accuracy from the run's lineage."""
    from distml.pipeline.record import lineage

    home = tmp / "e2e-home"
    cmd = [*DISTML, "--home", str(home), "run", "--search", "--source", str(args.source), *args.e2e_args.split()]
    print(f"(c) {' '.join(cmd[2:])} ...", flush=True)
    load_before = os.getloadavg()
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=4 * 3600, check=False)
    wall = time.perf_counter() - started
    # Kept beside the results (the workspace is a temp folder): the run's step lines and the study's trial table.
    log_file.parent.mkdir(parents=True, exist_ok=True)
    log_file.write_text(done.stdout + done.stderr)
    print("\n".join(done.stdout.splitlines()[-40:]), flush=True)
    if done.returncode != 0:
        sys.exit(f"error: distml run --search failed ({done.returncode}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    record = json.loads(sorted((home / "pipeline" / "runs").glob("*/run.json"))[-1].read_text())
    lin = record.get("lineage") or lineage(record["steps"])
    final = lin.get("refit") or lin.get("selected") or {}
    accuracy = final.get("test_accuracy")
    return {
        "command": " ".join(cmd[2:]),
        "wall_s": round(wall, 1),
        "champion_test_accuracy": accuracy,
        "selected": lin.get("selected"),
        "refit": lin.get("refit"),
        "search": lin.get("search"),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "targets": {"ge_94pct_within_30min": accuracy is not None and accuracy >= 0.94 and wall <= 1800},
    }


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2%}"


def _git_rev() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True)
    return done.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def table(doc: dict[str, Any]) -> str:
    lines = []
    if "pruning" in doc:
        p = doc["pruning"]
        lines.append(
            f"{'PRUNER':<8} {'TRIALS':>6} {'COMPLETE':>8} {'PRUNED':>6} {'EPOCHS':>6} {'WALL':>7} {'BEST VAL':>9}"
        )
        for name in ("asha", "none"):
            s = p[name]
            lines.append(
                f"{name:<8} {s['trials']:>6} {s['states']['COMPLETE']:>8} {s['states']['PRUNED']:>6} "
                f"{s['epochs_spent']:>6} {s['wall_s']:>6.0f}s {_pct(s['best_val_accuracy']):>9}"
            )
        t = p["targets"]
        lines.append(
            f"ASHA epochs {p['asha_epoch_share']:.0%} of unpruned (target <= 40%: "
            f"{'PASS' if t['epochs_le_40pct'] else 'FAIL'}); best {p['best_gap_points']} points below "
            f"(target <= 0.3: {'PASS' if t['best_within_0.3_points'] else 'FAIL'})"
        )
    if "overhead" in doc:
        o = doc["overhead"]
        lines.append(
            f"overhead: {o['trials']} trivial trials in {o['wall_s']:.1f} s, {o['training_s']:.1f} s of it training: "
            f"{o['overhead_per_trial_s']:.2f} s per trial ({o['tuner_between_jobs_per_trial_s']:.2f} s outside the "
            "trials' jobs)"
        )
    if "e2e" in doc:
        e = doc["e2e"]
        lines.append(
            f"distml run --search: champion test accuracy {_pct(e['champion_test_accuracy'])} in {e['wall_s']:.0f} s "
            f"(target >= 94.0% within 30 min: {'PASS' if e['targets']['ge_94pct_within_30min'] else 'FAIL'})"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=16, help="(a) trials per study (default 16)")
    parser.add_argument("--epochs", type=int, default=8, help="(a) epochs of an unpruned trial (default 8)")
    parser.add_argument("--workers", type=int, default=2, help="(a) workers per trial (default 2)")
    parser.add_argument("--max-concurrent", type=int, default=1, help="(a) trials at once (default 1: deterministic)")
    parser.add_argument("--sampler", default="random", choices=["random", "tpe"], help="(a) default random")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overhead-trials", type=int, default=8, help="(b) trivial trials (default 8)")
    parser.add_argument("--only", default="pruning,overhead", help="comma-separated: pruning, overhead")
    parser.add_argument("--e2e", action="store_true", help="(c) only: distml run --search from an empty workspace")
    parser.add_argument("--e2e-args", default="", help="(c) more arguments for distml run, e.g. '--refit'")
    parser.add_argument("--source", type=Path, default=SOURCE, help="folder with the Fashion-MNIST .gz files")
    parser.add_argument("--quick", action="store_true", help="a smoke test: tiny data, 3 trials x 2 epochs")
    parser.add_argument("--out", type=Path, default=None, help="default bench/results/search.json")
    args = parser.parse_args()
    only = {"e2e"} if args.e2e else set(args.only.split(","))
    if args.quick:
        args.trials, args.epochs, args.workers, args.overhead_trials = 3, 2, 1, 3
    elif ("pruning" in only or "e2e" in only) and not args.source.is_dir():
        sys.exit(f"error: no Fashion-MNIST copy in {args.source}; pass --source DIR (or --quick)")
    quick_out = Path(tempfile.gettempdir()) / "distml-bench-search-quick.json"
    out = args.out or (quick_out if args.quick else REPO / "bench" / "results" / "search.json")
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # track into the bench's own workspace
    # Each section carries the machine and revision it ran on: a later --e2e keeps the (a)/(b) of an earlier run.
    when = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
        },
        "git_rev": _git_rev(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "quick": args.quick,
    }
    doc: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="distml-bench-search-") as name:
        tmp = Path(name)
        home = tmp / "home"
        if "pruning" in only:
            if args.quick:
                dataset = tiny_dataset(home, tmp / "tiny-src")
            else:
                ingest(
                    FashionMnistSource(home / "downloads", location=str(args.source)),
                    store=DatasetStore(Workspace(home)),
                )
                dataset = "fashion-mnist"
            doc["pruning"] = pruning(home, tmp, args, dataset)
        if "overhead" in only:
            doc["overhead"] = overhead(tmp / "overhead-home", tmp, args)
        if "e2e" in only:
            doc["e2e"] = end_to_end(tmp, args, out.with_name(out.stem + "-e2e.log"))
    print()
    print(table(doc))
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(out.read_text()) if out.is_file() else {}
    doc = {section: {**when, **numbers} for section, numbers in doc.items()}
    out.write_text(json.dumps({**previous, **doc}, indent=2) + "\n")  # (c) alone keeps (a) and (b)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
