"""Run under torchrun by test_train_units.py: shared-memory all-reduce against gloo's, on random buckets."""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from distml.train import shm_allreduce
from distml.train.dist import context_from_env


def main() -> None:
    ctx = context_from_env()
    dist.init_process_group("gloo")
    assert shm_allreduce.available(ctx), "expected the shared-memory path to be available"
    state = shm_allreduce.SharedGradients.open(ctx, f"distml-test-{ctx.job_id}", capacity=5000)
    gen = torch.Generator().manual_seed(1000 + ctx.rank)  # different data on every rank
    worst = 0.0
    for step in range(60):  # many buckets, so both slot sets are reused many times
        n = [1, 17, 4999, 5000, 300][step % 5]
        mine = torch.randn(n, generator=gen)
        expected = mine.clone()
        dist.all_reduce(expected)
        expected /= ctx.world_size
        got = state.allreduce_mean_(mine.clone())
        worst = max(worst, float((got - expected).abs().max()))
        gathered = [torch.empty_like(got) for _ in range(ctx.world_size)]
        dist.all_gather(gathered, got)
        assert all(torch.equal(g, got) for g in gathered), "ranks disagree"
    try:
        state.allreduce_mean_(torch.zeros(5001))
        too_big = "accepted"
    except ValueError:
        too_big = "refused"
    dist.destroy_process_group()
    if ctx.rank == 0:
        print("RESULT " + json.dumps({"max_abs_diff": worst, "too_big": too_big}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
