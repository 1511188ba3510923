"""Where does 2-worker DDP on CPU lose its time? A stripped-down loop, timed part by part, in several variants.

Each variant trains the seed ``cnn`` for one epoch of real Fashion-MNIST at global batch 64 (the plain loop of
``bench/train.py``, with nothing of distml's own loop), and reports images/s and the milliseconds per step
spent in the forward pass, the backward pass (which includes DDP's all-reduce) and the optimizer step:

- ``plain``: one process, all cores as threads (the reference);
- ``ddp``: W=2 under torchrun, DDP over gloo, 1 thread each;
- ``no-allreduce``: the same two workers, no DDP: what splitting the compute alone costs;
- ``per-param``: W=2, one gloo all-reduce per parameter after backward (latency-bound);
- ``fused-adamw``: ``ddp`` with AdamW's fused CPU kernel;
- ``shm``: ``ddp`` with distml's shared-memory all-reduce hook (``src/distml/train/shm_allreduce.py``).

Variants are interleaved round by round. Usage: python bench/ddp_probe.py [--rounds 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO.parent / "shared" / "datasets" / "fashion-mnist"
VARIANTS = ("plain", "ddp", "no-allreduce", "per-param", "fused-adamw", "shm")
BATCH = 64


def worker(home: Path, variant: str) -> None:
    """One process of one variant; rank 0 prints a JSON line of timings."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F  # noqa: N812
    from torch import nn

    from distml.data import open_dataset
    from distml.train import shm_allreduce
    from distml.train.dist import context_from_env
    from distml.train.models import ModelSpec, build_model

    ctx = context_from_env()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    if ctx.distributed:
        dist.init_process_group("gloo")
    ds = open_dataset("fashion-mnist", home=home)
    images, labels = ds.split("train").to_torch()
    mean, std = ds.manifest.stats["mean"][0] * 255, ds.manifest.stats["std"][0] * 255
    torch.manual_seed(0)
    model = build_model("cnn", ModelSpec(1, 28, 28, 10))
    step_model: nn.Module = model
    if variant in ("ddp", "fused-adamw", "shm"):
        ddp = nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True)
        if variant == "shm":
            shm_allreduce.install(ddp, ctx, name=f"distml-probe-{ctx.job_id}")
        step_model = ddp
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=5e-4, fused=variant == "fused-adamw" or None)
    local = BATCH // ctx.world_size
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    steps = len(labels) // BATCH
    fwd = bwd = step = 0.0
    start = time.perf_counter()
    for s in range(steps):
        idx = perm[s * BATCH + ctx.rank * local : s * BATCH + (ctx.rank + 1) * local]
        x = (images[idx].permute(0, 3, 1, 2).float() - mean) / std
        t0 = time.perf_counter()
        loss = F.cross_entropy(step_model(x), labels[idx])
        t1 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        if variant == "per-param":
            for p in model.parameters():
                assert p.grad is not None
                dist.all_reduce(p.grad)
                p.grad /= ctx.world_size
        t2 = time.perf_counter()
        opt.step()
        t3 = time.perf_counter()
        fwd, bwd, step = fwd + t1 - t0, bwd + t2 - t1, step + t3 - t2
    elapsed = time.perf_counter() - start
    if ctx.is_main:
        ms = 1000 / steps
        print("PROBE " + json.dumps({"images_per_s": steps * BATCH / elapsed, "ms_step": elapsed * ms,
                                     "forward": fwd * ms, "backward": bwd * ms, "optimizer": step * ms}))  # fmt: skip
    if ctx.distributed:
        dist.destroy_process_group()


def run_variant(home: Path, variant: str, cores: int) -> dict[str, float]:
    from distml.train.launch import MALLOC_DEFAULTS

    me = [str(Path(__file__).resolve()), "--worker", variant, "--home", str(home)]
    if variant == "plain":
        cmd, threads = [sys.executable, *me], cores
    else:
        cmd, threads = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *me], 1
    env = {**MALLOC_DEFAULTS, **os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO / "src")}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("PROBE "))
    return dict(json.loads(line.split(" ", 1)[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "ddp_probe.json")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--home", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.home, args.worker)
        return
    from distml.data import DatasetStore
    from distml.data.ingest import ingest
    from distml.data.sources import FashionMnistSource
    from distml.workspace import Workspace

    variants = args.variants.split(",")
    cores = len(os.sched_getaffinity(0))
    runs: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory(prefix="distml-probe-") as tmp:
        home = Path(tmp)
        ingest(FashionMnistSource(home / "downloads", location=str(SOURCE)), store=DatasetStore(Workspace(home)))
        for r in range(args.rounds):
            for v in variants:
                runs[v].append(run_variant(home, v, cores))
                print(f"round {r + 1} {v:<13} {runs[v][-1]['images_per_s']:>9,.0f} img/s", flush=True)
    rows: list[dict[str, Any]] = []
    for v in variants:
        row: dict[str, Any] = {"variant": v, "runs": len(runs[v])}
        for key in ("images_per_s", "ms_step", "forward", "backward", "optimizer"):
            values = [run[key] for run in runs[v]]
            row[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
        rows.append(row)
    print(f"\nseed cnn, global batch {BATCH}, 1 epoch; W=2 variants run 1 thread per worker on {cores} cores\n")
    print(f"{'variant':<13} {'img/s (median, min-max)':>26} {'ms/step':>8} {'fwd':>6} {'bwd+ar':>7} {'opt':>6}")
    for row in rows:
        ips = row["images_per_s"]
        print(f"{row['variant']:<13} {ips['median']:>10,.0f} ({ips['min']:,.0f}-{ips['max']:,.0f}) "
              f"{row['ms_step']['median']:>8.2f} {row['forward']['median']:>6.2f} {row['backward']['median']:>7.2f} "
              f"{row['optimizer']['median']:>6.2f}")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"cores": cores, "batch": BATCH, "rounds": args.rounds, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
