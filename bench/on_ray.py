"""Benchmark distml on a Ray cluster against the same work without one, on this machine.

One local Ray cluster of two nodes (tests/ray_cluster.py: loopback, token auth, no dashboard; half the cores each)
is up for every measurement, the local ones included, so both sides share the machine with its processes.
Configurations are interleaved round by round (A B A B): the machine is noisy.

(a) train: the same 2-worker seed-``cnn`` job (Fashion-MNIST, 1 epoch, global batch 64) through torchrun and
    through Ray Train (``--ray``): training images/s from the run's ``history.json`` (training steps only; target
    Ray >= 0.9x torchrun, paired by round), and the time from the command to its first step: the first progress
    line (step 10, ``log_every_steps = 10``) on the command's output, less those 10 steps at the epoch's rate.
(b) candidates: ``distml train --candidates cnn,cnn-dropout,cnn-batchnorm`` (the three default candidates, each a
    1-worker job) by the local scheduler and on the cluster: wall time of the command.
(c) predict: ``distml predict`` of the train split (60,000 images) with a 1-epoch ``cnn``, locally (one Parquet
    file) and with ``--ray`` (one Parquet dataset): images/s as the command reports it (reading, predicting,
    writing) and the command's wall time (start-up, connecting, Ray Data's actors included).

A part runs when its feature is there (``--ray`` in the command's ``--help``) and is recorded as skipped otherwise.
Prints a table and writes ``bench/results/ray.json`` (``--quick``: a temp file; tiny data, one round).

Not named bench/ray.py: that file would be the ``ray`` package for ruff's import sorting (bench/ is a source
root), for mypy in bench/ and for any bench script's own process. Every Ray job here runs in a ``distml``
subprocess started from the repository root; this process does not import Ray.

Usage: python bench/on_ray.py [--rounds 3] [--only train,candidates,predict] [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol, TypeVar

from distml.data.ingest import ingest
from distml.data.sources.fashion_mnist import FashionMnistSource
from distml.data.store import DatasetStore
from distml.workspace import Workspace

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO.parent / "shared" / "datasets" / "fashion-mnist"
DISTML = [sys.executable, "-m", "distml"]
CANDIDATES = "cnn,cnn-dropout,cnn-batchnorm"
FIRST_LINE_STEP = 10  # the progress line whose time stands for the first step (--quick: 1, its epochs are short)
PARTS = ("train", "candidates", "predict")


class Cluster(Protocol):
    """What this script uses of tests/ray_cluster.py's LocalRayCluster."""

    address: str

    def client_env(self, **extra: str) -> dict[str, str]: ...

    def stop(self) -> None: ...


def load(path: Path) -> ModuleType:
    """A module of this repository that is not in a package (tests/, bench/), loaded from its file."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # where dataclasses look up the module of the classes it defines
    spec.loader.exec_module(module)
    return module


def start_cluster(nodes: int, cpus_per_node: int) -> Cluster:
    """The tests' local cluster (tests/ray_cluster.py)."""
    cluster: Cluster = load(REPO / "tests" / "ray_cluster.py").start_local_cluster(
        nodes=nodes, cpus_per_node=cpus_per_node
    )
    return cluster


@dataclass
class Command:
    """A finished ``distml`` command: its output, wall time and when (after its start) each line came."""

    code: int
    output: str
    wall_s: float
    lines: list[tuple[float, str]]

    def first(self, pattern: str) -> float | None:
        """Seconds from the start to the first output line matching ``pattern``."""
        found = re.compile(pattern)
        return next((t for t, line in self.lines if found.search(line)), None)


def distml(args: list[str], env: dict[str, str] | None = None, timeout_s: float = 3600) -> Command:
    """Run ``distml ARGS`` from the repository root, stdout and stderr together, each line timed as it comes."""
    lines: list[tuple[float, str]] = []
    env = {**(env or os.environ), "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen(
        [*DISTML, *args], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append((time.perf_counter() - start, line.rstrip("\n")))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()  # our own child, by its handle
        code = proc.wait()
    wall = time.perf_counter() - start
    reader.join(timeout=10)
    return Command(code, "\n".join(line for _, line in lines), wall, lines)


def has_ray_option(*command: str) -> bool:
    """Whether ``distml COMMAND --help`` offers ``--ray`` (the part's feature is in this checkout)."""
    return "--ray" in distml([*command, "--help"]).output


def candidates_on_ray() -> bool:
    """Whether the candidate scheduler takes the cluster settings (issue 18 item 4) in this checkout."""
    import inspect

    from distml.train.candidates import run_candidates

    return "cluster" in inspect.signature(run_candidates).parameters and has_ray_option("train")


def on_ray(home: Path, run_prefix: str) -> bool:
    """Whether the runs named ``run_prefix*`` ran on Ray: each such run records where its ranks ran."""
    runs = sorted((home / "runs").glob(f"{run_prefix}*"))
    return bool(runs) and all((run / "placement.json").is_file() for run in runs)


def checked(cmd: Command, what: str) -> Command:
    if cmd.code != 0:
        sys.exit(f"error: {what} failed ({cmd.code}):\n{cmd.output[-3000:]}")
    return cmd


T = TypeVar("T")


def paired_rounds(
    rounds: int, part: str, local: Callable[[int], T], ray: Callable[[int], T], say: Callable[[T, T], str]
) -> tuple[list[T], list[T]]:
    """``local(r)`` then ``ray(r)`` for each round (interleaved: a drift of the machine's load hits both alike),
    each round's pair printed as ``say`` words it; every round's results of each."""
    got_local: list[T] = []
    got_ray: list[T] = []
    for r in range(rounds):
        got_local.append(local(r))
        got_ray.append(ray(r))
        print(f"({part}) round {r + 1}: {say(got_local[-1], got_ray[-1])}", flush=True)
    return got_local, got_ray


def _row(name: str, values: list[float], target: str) -> dict[str, Any]:
    return {
        "measure": name,
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "runs": len(values),
        "target": target,
    }


# -- (a) the same training job through torchrun and through Ray Train ---------------------------------------------


def train_job(
    home: Path, config: Path, dataset: str, name: str, ray: list[str], env: dict[str, str], line_step: int
) -> dict[str, float]:
    """One 1-epoch job; its training images/s, the time to its first step, and the command's wall time."""
    cmd = [
        "--home",
        str(home),
        "--config",
        str(config),
        "train",
        "--dataset",
        dataset,
        "--model",
        "cnn",
        "--workers",
        "2",
        "--epochs",
        "1",
        "--batch-size",
        "64",
        "--run-name",
        name,
        *ray,
    ]
    done = checked(distml(cmd, env), f"distml train {' '.join(ray)}")
    if ray and not on_ray(home, name):
        sys.exit(f"error: run {name} has no placement.json: it did not run on Ray")
    epoch = json.loads((home / "runs" / name / "history.json").read_text())[0]
    rate = float(epoch["images_per_s"])
    line = done.first(rf"step {line_step}/")
    if line is None:
        sys.exit(f"error: no 'step {line_step}/' line in the output of run {name}:\n{done.output[-2000:]}")
    # The first step ended (line_step - 1) steps before the line: those at the epoch's rate (the first steps are
    # slower than the epoch's mean, so this leans late, for both launchers alike).
    first = line - (line_step - 1) * 64 / rate
    return {"images_per_s": rate, "first_step_s": first, "wall_s": done.wall_s}


def train_part(home: Path, dataset: str, cluster: Cluster, rounds: int, tmp: Path, line_step: int) -> dict[str, Any]:
    config = tmp / "train.toml"
    config.write_text(f"[train]\nlog_every_steps = {line_step}\n")
    env = cluster.client_env()
    local, ray = paired_rounds(
        rounds,
        "a",
        lambda r: train_job(home, config, dataset, f"torchrun-{r}", [], env, line_step),
        lambda r: train_job(home, config, dataset, f"ray-{r}", ["--ray", cluster.address], env, line_step),
        lambda a, b: (
            f"torchrun {a['images_per_s']:,.0f} img/s, first step {a['first_step_s']:.1f} s | "
            f"Ray Train {b['images_per_s']:,.0f} img/s, first step {b['first_step_s']:.1f} s"
        ),
    )
    ratio = [b["images_per_s"] / a["images_per_s"] for a, b in zip(local, ray, strict=True)]
    rows = [
        _row("torchrun, 2 workers: img/s", [x["images_per_s"] for x in local], "reference"),
        _row("Ray Train, 2 workers: img/s", [x["images_per_s"] for x in ray], ">= 0.9x torchrun"),
        _row("Ray Train / torchrun img/s, paired by round", ratio, ">= 0.9"),
        _row("torchrun: command to first step, s", [x["first_step_s"] for x in local], "-"),
        _row("Ray Train: command to first step, s", [x["first_step_s"] for x in ray], "-"),
        _row("torchrun: whole command, s", [x["wall_s"] for x in local], "-"),
        _row("Ray Train: whole command, s", [x["wall_s"] for x in ray], "-"),
    ]
    return {"rows": rows, "target_met": statistics.median(ratio) >= 0.9}


# -- (b) three candidates: the local scheduler against the cluster -------------------------------------------------


def candidates_part(home: Path, dataset: str, cluster: Cluster, rounds: int, epochs: int) -> dict[str, Any]:
    env = cluster.client_env()
    base = ["--home", str(home), "train", "--candidates", CANDIDATES, "--dataset", dataset]
    base += ["--workers", "1", "--epochs", str(epochs)]

    def on_cluster(r: int) -> float:
        with_ray = [*base, "--run-name", f"cand-ray-{r}", "--ray", cluster.address]
        done = checked(distml(with_ray, env), "candidates (--ray)")
        if not on_ray(home, f"cand-ray-{r}"):
            sys.exit(f"error: the candidates cand-ray-{r}* have no placement.json: they did not run on Ray")
        return done.wall_s

    local, ray = paired_rounds(
        rounds,
        "b",
        lambda r: checked(distml([*base, "--run-name", f"cand-local-{r}"], env), "candidates (local)").wall_s,
        on_cluster,
        lambda a, b: f"local scheduler {a:.1f} s | Ray cluster {b:.1f} s",
    )
    rows = [
        _row("local scheduler: 3 candidates, s", local, "reference"),
        _row("two-node Ray cluster: 3 candidates, s", ray, "-"),
        _row("Ray / local wall time, paired by round", [b / a for a, b in zip(local, ray, strict=True)], "-"),
    ]
    return {"candidates": CANDIDATES, "epochs": epochs, "workers_per_candidate": 1, "rows": rows}


# -- (c) batch prediction: the local command against --ray --------------------------------------------------------

_RATE = re.compile(r"predicted ([\d,]+) images in [\d.]+ s \(([\d,]+) img/s\)")


def _predicted(cmd: Command) -> tuple[int, float]:
    found = _RATE.search(cmd.output)
    if found is None:
        sys.exit(f"error: no 'predicted ...' line in:\n{cmd.output[-2000:]}")
    return int(found.group(1).replace(",", "")), float(found.group(2).replace(",", ""))


def predict_part(home: Path, dataset: str, split: str, cluster: Cluster, rounds: int, tmp: Path) -> dict[str, Any]:
    env = cluster.client_env()
    base = ["--home", str(home)]
    checked(
        distml(
            [
                *base,
                "train",
                "--dataset",
                dataset,
                "--model",
                "cnn",
                "--workers",
                "1",
                "--epochs",
                "1",
                "--run-name",
                "predict-model",
            ],
            env,
        ),
        "training the model",
    )
    model = tmp / "model"
    checked(distml([*base, "models", "export", "predict-model", "--out", str(model)], env), "export")
    cmd = [*base, "predict", str(model), "--dataset", dataset, "--split", split]

    def run(out: str, *extra: str) -> tuple[int, float, float]:  # images, img/s, the command's wall time
        done = checked(distml([*cmd, "--out", str(tmp / out), *extra], env), f"predict {' '.join(extra)}")
        images, rate = _predicted(done)
        return images, rate, done.wall_s

    local, ray = paired_rounds(
        rounds,
        "c",
        lambda r: run(f"local-{r}.parquet"),
        lambda r: run(f"ray-{r}", "--ray", cluster.address),
        lambda a, b: f"local {a[1]:,.0f} img/s ({a[2]:.1f} s) | --ray {b[1]:,.0f} img/s ({b[2]:.1f} s)",
    )
    images = local[-1][0] if local else 0
    local_rate, local_wall = [x[1] for x in local], [x[2] for x in local]
    ray_rate, ray_wall = [x[1] for x in ray], [x[2] for x in ray]
    rows = [
        _row("distml predict (local, all cores): img/s", local_rate, "reference"),
        _row("distml predict --ray (2 actors x 1 thread): img/s", ray_rate, "-"),
        _row("distml predict (local): whole command, s", local_wall, "-"),
        _row("distml predict --ray: whole command, s", ray_wall, "-"),
    ]
    return {"split": split, "images": images, "rows": rows}


# -- the data, the table, the file ---------------------------------------------------------------------------------


def tiny_dataset(home: Path, folder: Path) -> str:
    """--quick: bench/search.py's generated MNIST-format dataset (256 train, 64 test images)."""
    return str(load(REPO / "bench" / "search.py").tiny_dataset(home, folder))


def table(doc: dict[str, Any]) -> str:
    lines = [f"{'measure':<52} {'median':>10} {'min':>10} {'max':>10}  target"]
    for part in PARTS:
        section = doc.get(part)
        if not section:
            continue
        if "skipped" in section:
            lines.append(f"({part}: skipped, {section['skipped']})")
            continue
        for row in section["rows"]:
            lines.append(
                f"{row['measure']:<52} {row['median']:>10,.2f} {row['min']:>10,.2f} {row['max']:>10,.2f}  "
                f"{row['target']}"
            )
    return "\n".join(lines)


def _git_rev() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True)
    return done.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", default=",".join(PARTS), help="comma-separated: train, candidates, predict")
    parser.add_argument("--epochs", type=int, default=1, help="(b) epochs of each candidate (default 1)")
    parser.add_argument("--source", type=Path, default=SOURCE, help="folder with the Fashion-MNIST .gz files")
    parser.add_argument("--quick", action="store_true", help="a smoke test: tiny data, one round")
    parser.add_argument("--out", type=Path, default=None, help="default bench/results/ray.json")
    args = parser.parse_args()
    only = set(args.only.split(","))
    if only - set(PARTS):
        parser.error(f"unknown parts in --only {args.only!r}")
    if args.quick:
        args.rounds = 1
    elif not args.source.is_dir():
        sys.exit(f"error: no Fashion-MNIST copy in {args.source}; pass --source DIR (or --quick)")
    out = args.out or (
        Path(tempfile.gettempdir()) / "distml-bench-ray-quick.json" if args.quick else REPO / "bench/results/ray.json"
    )
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # track into the bench's own workspace
    cores = len(os.sched_getaffinity(0))
    doc: dict[str, Any] = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": cores,
            "python": platform.python_version(),
        },
        "git_rev": _git_rev(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "quick": args.quick,
        "rounds": args.rounds,
        "cluster": {"nodes": 2, "cpus_per_node": max(1, cores // 2)},
        "loadavg_before": [round(x, 2) for x in os.getloadavg()],
    }
    features = {
        "train": has_ray_option("train"),
        "candidates": has_ray_option("train"),
        "predict": has_ray_option("predict"),
    }
    with tempfile.TemporaryDirectory(prefix="distml-bench-ray-") as name:
        tmp = Path(name)
        home = tmp / "home"
        if args.quick:
            dataset, split = tiny_dataset(home, tmp / "tiny-src"), "train"
        else:
            ingest(
                FashionMnistSource(home / "downloads", location=str(args.source)), store=DatasetStore(Workspace(home))
            )
            dataset, split = "fashion-mnist", "train"
        cluster = start_cluster(2, max(1, cores // 2))
        try:
            for part in PARTS:
                if part not in only:
                    continue
                if not features[part]:
                    doc[part] = {"skipped": "this checkout cannot run it on Ray yet"}
                elif part == "train":
                    line_step = 1 if args.quick else FIRST_LINE_STEP
                    doc[part] = train_part(home, dataset, cluster, args.rounds, tmp, line_step)
                elif part == "candidates":
                    doc[part] = candidates_part(home, dataset, cluster, args.rounds, args.epochs)
                else:
                    doc[part] = predict_part(home, dataset, split, cluster, args.rounds, tmp)
        finally:
            cluster.stop()
    doc["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    print()
    print(table(doc))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
