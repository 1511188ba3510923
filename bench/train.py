"""Benchmark training throughput on real Fashion-MNIST, seed ``cnn``, global batch 64.

(a) a plain single-process PyTorch loop over the same in-memory tensors, written here (all cores as threads);
(b) ``distml train`` with W=1 and (c) with W=2 (torchrun + DDP + gloo). Configurations are interleaved round by
round so a noisy machine affects all alike; images/s counts training steps only (not evaluation or start-up).
Then time and epochs for ``cnn`` to reach 91% test accuracy (W=2, 5 epochs).

Usage: python bench/train.py [--rounds 3] [--home DIR] [--out bench/results/train.json]
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

from distml.data import DatasetStore, ingest, open_dataset
from distml.data.sources import FashionMnistSource
from distml.train.models import ModelSpec, build_model
from distml.workspace import Workspace

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO.parent / "shared" / "datasets" / "fashion-mnist"
BATCH = 64


def plain_loop(home: Path, threads: int) -> float:
    """(a): the simplest fast single-process loop; returns training images/s over one epoch."""
    torch.set_num_threads(threads)
    ds = open_dataset("fashion-mnist", home=home)
    images, labels = ds.split("train").to_torch()
    mean, std = ds.manifest.stats["mean"][0] * 255, ds.manifest.stats["std"][0] * 255
    torch.manual_seed(0)
    model = build_model("cnn", ModelSpec(1, 28, 28, 10))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=5e-4)
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


def distml_train(home: Path, workers: int, epochs: int, name: str) -> list[dict[str, Any]]:
    cmd = [sys.executable, "-m", "distml", "--home", str(home), "train", "--model", "cnn", "--workers", str(workers),
           "--epochs", str(epochs), "--batch-size", str(BATCH), "--run-name", name]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True)
    return list(json.loads((home / "runs" / name / "history.json").read_text()))


def _row(name: str, values: list[float], target: str) -> dict[str, Any]:
    return {"measure": name, "median": statistics.median(values), "min": min(values), "max": max(values),
            "runs": len(values), "target": target}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--home", type=Path, default=None, help="workspace (default: a temp folder)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "train.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="distml-bench-train-") as tmp:
        home = args.home or Path(tmp)
        ingest(FashionMnistSource(home / "downloads", location=str(SOURCE)), store=DatasetStore(Workspace(home)))
        cores = len(os.sched_getaffinity(0))
        plain, w1, w2 = [], [], []
        for r in range(args.rounds):
            plain.append(plain_loop(home, cores))
            w1.append(distml_train(home, 1, 1, f"bench-w1-{r}-{time.time_ns()}")[0]["images_per_s"])
            w2.append(distml_train(home, 2, 1, f"bench-w2-{r}-{time.time_ns()}")[0]["images_per_s"])
            print(f"round {r + 1}: plain {plain[-1]:,.0f}  W=1 {w1[-1]:,.0f}  W=2 {w2[-1]:,.0f} img/s", flush=True)
        ratio1 = [b / a for a, b in zip(plain, w1, strict=True)]
        ratio2 = [c / a for a, c in zip(plain, w2, strict=True)]
        history = distml_train(home, 2, 5, f"bench-acc-{time.time_ns()}")
        reached = next((h for h in history if h["test_accuracy"] >= 0.91), None)
        to_91 = {
            "epochs": reached["epoch"] if reached else None,
            "seconds": sum(h["seconds"] for h in history[: reached["epoch"]]) if reached else None,
            "final_test_accuracy": history[-1]["test_accuracy"],
        }
    rows = [
        _row("(a) plain PyTorch loop, 1 process, img/s", plain, "reference"),
        _row("(b) distml train W=1, img/s", w1, ">= 1.0x (a)"),
        _row("(c) distml train W=2, img/s", w2, ">= 0.8x (a), >= 6,000"),
        _row("(b)/(a) paired by round", ratio1, ">= 1.0"),
        _row("(c)/(a) paired by round", ratio2, ">= 0.8"),
    ]
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())  # fmt: skip
    print(f"\nseed cnn, global batch {BATCH}, Fashion-MNIST, {cpu} ({cores} cores), torch {torch.__version__}\n")
    print(f"{'measure':<44} {'median':>9} {'min':>9} {'max':>9}  target")
    for row in rows:
        print(f"{row['measure']:<44} {row['median']:>9,.2f} {row['min']:>9,.2f} {row['max']:>9,.2f}  {row['target']}")
    print(f"\ncnn to 91% test accuracy (W=2): epoch {to_91['epochs']}, {to_91['seconds'] or 0:.1f} s of epochs; "
          f"after 5 epochs {to_91['final_test_accuracy']:.2%}")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"machine": {"cpu": cpu, "cores": cores, "torch": torch.__version__}, "batch": BATCH, "results": rows,
           "cnn_to_91": to_91}  # fmt: skip
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
