"""Benchmark training throughput on real Fashion-MNIST, seed ``cnn``, global batch 64.

(a) a plain single-process PyTorch loop over the same in-memory tensors, written here (all cores as threads),
run in a fresh process like a worker;
(b) ``distml train`` with W=1 and (c) with W=2 (torchrun + DDP + gloo). Configurations are interleaved round by
round so a noisy machine affects all alike; images/s counts training steps only (not evaluation or start-up).
Then time and epochs for ``cnn`` to reach 91% test accuracy (W=2, 5 epochs), and for the strong net on CPU
(``resnet-small``, W=2, 12 epochs, crop+flip) to reach 93%. Steps can be chosen with ``--only``; each writes its
own keys of the results file and keeps the others (``bench/train_gpu.py`` adds the ``gpu`` section there).

Usage: python bench/train.py [--rounds 3] [--only throughput,cnn,strong] [--home DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812

from distml.data import DatasetStore, open_dataset
from distml.data.ingest import ingest
from distml.data.sources import FashionMnistSource
from distml.train.launch import MALLOC_DEFAULTS
from distml.train.models import ModelSpec, build_model
from distml.workspace import Workspace

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO.parent / "shared" / "datasets" / "fashion-mnist"
BATCH = 64


def plain_loop_process(home: Path, threads: int, fused: bool = False) -> float:
    """(a) in a fresh process with the workers' allocator settings, so (a) and (b) start from the same state.

    Run inside this long-lived bench process instead, (a) gained from memory and caches warmed by earlier
    rounds, which a worker never has: 11.4k images/s in round 1, 12.4k in rounds 2 and 3 (2026-11-23).
    """
    env = {**MALLOC_DEFAULTS, **os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--plain-loop", str(home), "--threads", str(threads),
           *(["--fused"] if fused else [])]  # fmt: skip
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return float(out.strip().splitlines()[-1])


def plain_loop(home: Path, threads: int, fused: bool = False) -> float:
    """(a): the simplest fast single-process loop; returns training images/s over one epoch.

    ``fused``: with the fused AdamW that distml's trainer uses, to show what of (b)/(a) that is, and what is not.
    """
    torch.set_num_threads(threads)
    ds = open_dataset("fashion-mnist", home=home)
    images, labels = ds.split("train").to_torch()
    mean, std = ds.manifest.stats["mean"][0] * 255, ds.manifest.stats["std"][0] * 255
    torch.manual_seed(0)
    model = build_model("cnn", ModelSpec(1, 28, 28, 10))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=5e-4, fused=True if fused else None)
    perm = torch.randperm(len(labels))
    steps = len(labels) // BATCH
    start = time.perf_counter()
    for s in range(steps):
        idx = perm[s * BATCH : (s + 1) * BATCH]
        x = (images[idx].permute(0, 3, 1, 2).float() - mean) / std
        loss = F.cross_entropy(model(x), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
    return steps * BATCH / (time.perf_counter() - start)


STRONG = ["--model", "resnet-small", "--batch-size", "128", "--lr", "0.003", "--augment", "crop+flip"]


def distml_train(
    home: Path, workers: int, epochs: int, name: str, extra: list[str] | None = None, config: Path | None = None
) -> list[dict[str, Any]]:
    cmd = [sys.executable, "-m", "distml", "--home", str(home), *(["--config", str(config)] if config else []),
           "train", "--workers", str(workers), "--epochs", str(epochs), "--run-name", name,
           *(extra or ["--model", "cnn", "--batch-size", str(BATCH)])]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True)
    return list(json.loads((home / "runs" / name / "history.json").read_text()))


def _row(name: str, values: list[float], target: str) -> dict[str, Any]:
    return {"measure": name, "median": statistics.median(values), "min": min(values), "max": max(values),
            "runs": len(values), "target": target}  # fmt: skip


def time_to(history: list[dict[str, Any]], target: float) -> dict[str, Any]:
    """Epochs and seconds of epochs until the test accuracy first reaches ``target``."""
    hit = next((h for h in history if h["test_accuracy"] >= target), None)
    return {
        "target": target,
        "epochs": hit["epoch"] if hit else None,
        "seconds": sum(h["seconds"] for h in history[: hit["epoch"]]) if hit else None,
        "final_test_accuracy": history[-1]["test_accuracy"],
        "epochs_run": len(history),
    }


def _print_time_to(label: str, res: dict[str, Any]) -> None:
    reached = f"epoch {res['epochs']}, {res['seconds']:.1f} s of epochs" if res["epochs"] else "not reached"
    print(f"{label} to {res['target']:.0%} test accuracy (W=2): {reached}; "
          f"after {res['epochs_run']} epochs {res['final_test_accuracy']:.2%}")  # fmt: skip


def throughput(home: Path, rounds: int, cores: int) -> list[dict[str, Any]]:
    plain, fused, w1, w2 = [], [], [], []
    for r in range(rounds):
        plain.append(plain_loop_process(home, cores))
        fused.append(plain_loop_process(home, cores, fused=True))
        w1.append(distml_train(home, 1, 1, f"bench-w1-{r}-{time.time_ns()}")[0]["images_per_s"])
        w2.append(distml_train(home, 2, 1, f"bench-w2-{r}-{time.time_ns()}")[0]["images_per_s"])
        print(f"round {r + 1}: plain {plain[-1]:,.0f}  plain+fused {fused[-1]:,.0f}  W=1 {w1[-1]:,.0f}  "
              f"W=2 {w2[-1]:,.0f} img/s", flush=True)  # fmt: skip
    ratio1 = [b / a for a, b in zip(plain, w1, strict=True)]
    ratio1f = [b / a for a, b in zip(fused, w1, strict=True)]
    ratio2 = [c / a for a, c in zip(plain, w2, strict=True)]
    return [
        _row("(a) plain PyTorch loop, 1 process, img/s", plain, "reference"),
        _row("(a') the same loop with fused AdamW, img/s", fused, "what (b) gains from fused AdamW"),
        _row("(b) distml train W=1, img/s", w1, ">= 1.0x (a)"),
        _row("(c) distml train W=2, img/s", w2, ">= 0.8x (a), >= 6,000"),
        _row("(b)/(a) paired by round", ratio1, ">= 1.0"),
        _row("(b)/(a') paired by round", ratio1f, "distml's own overhead"),
        _row("(c)/(a) paired by round", ratio2, ">= 0.8"),
    ]


def scaling(home: Path, cores: int) -> list[dict[str, Any]]:
    """W = 1, 2, 4, ... up to the cores: images/s of one epoch of ``cnn`` at global batch 256, shm against gloo."""
    rows = []
    workers = [w for w in (1, 2, 4, 8, 16) if w <= cores]
    for w in workers:
        for mode in ("shm", "gloo") if w > 1 else ("shm",):
            config = home / f"allreduce-{mode}.toml"
            config.write_text(f'[train]\ncpu_allreduce = "{mode}"\n')
            name = f"bench-scale-{w}-{mode}-{time.time_ns()}"
            history = distml_train(home, w, 1, name, ["--model", "cnn", "--batch-size", "256"], config)
            ips = history[0]["images_per_s"]
            rows.append({"workers": w, "allreduce": mode if w > 1 else "none", "images_per_s": ips})
            print(f"W={w} {rows[-1]['allreduce']}: {rows[-1]['images_per_s']:,.0f} img/s", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--plain-loop", type=Path, metavar="HOME", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--fused", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--only", default="throughput,cnn,strong", help="comma-separated: throughput, cnn, strong, scaling"
    )
    parser.add_argument("--home", type=Path, default=None, help="workspace (default: a temp folder)")
    parser.add_argument("--source", type=Path, default=SOURCE, help="folder with the Fashion-MNIST .gz files")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "train.json")
    args = parser.parse_args()
    if args.plain_loop:  # the child process of plain_loop_process
        print(plain_loop(args.plain_loop, args.threads, args.fused))
        return
    steps = set(args.only.split(","))
    if steps - {"throughput", "cnn", "strong", "scaling"}:
        parser.error(f"unknown steps in --only {args.only!r}")
    cores = len(os.sched_getaffinity(0))
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())  # fmt: skip
    doc: dict[str, Any] = json.loads(args.out.read_text()) if args.out.is_file() else {}
    doc.update({"machine": {"cpu": cpu, "cores": cores, "torch": torch.__version__}, "batch": BATCH})
    with tempfile.TemporaryDirectory(prefix="distml-bench-train-") as tmp:
        home = args.home or Path(tmp)
        ingest(FashionMnistSource(home / "downloads", location=str(args.source)), store=DatasetStore(Workspace(home)))
        if "throughput" in steps:
            doc["results"] = throughput(home, args.rounds, cores)
        if "cnn" in steps:
            doc["cnn_to_91"] = time_to(distml_train(home, 2, 5, f"bench-acc-{time.time_ns()}"), 0.91)
        if "scaling" in steps:
            doc["scaling"] = {"cores": cores, "rows": scaling(home, cores)}
        if "strong" in steps:
            history = distml_train(home, 2, 12, f"bench-strong-{time.time_ns()}", STRONG)
            doc["strong_cpu_to_93"] = {**time_to(history, 0.93), "args": STRONG, "workers": 2}
    print(f"\nseed cnn, global batch {BATCH}, Fashion-MNIST, {cpu} ({cores} cores), torch {torch.__version__}\n")
    if "results" in doc:
        print(f"{'measure':<44} {'median':>9} {'min':>9} {'max':>9}  target")
        for row in doc["results"]:
            print(f"{row['measure']:<44} {row['median']:>9,.2f} {row['min']:>9,.2f} {row['max']:>9,.2f}  "
                  f"{row['target']}")  # fmt: skip
    if "cnn_to_91" in doc:
        _print_time_to("\ncnn", doc["cnn_to_91"])
    if "strong_cpu_to_93" in doc:
        _print_time_to("resnet-small", doc["strong_cpu_to_93"])
    if "scaling" in doc:
        print(f"\nscaling, cnn, global batch 256, {doc['scaling']['cores']} cores:")
        for row in doc["scaling"]["rows"]:
            print(f"  W={row['workers']:<3} {row['allreduce']:<5} {row['images_per_s']:>10,.0f} img/s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
