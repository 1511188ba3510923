"""Run under torchrun by test_train_units.py: shared-memory all-reduce against gloo's, on random buckets.

``--capacity N`` sizes the segment for buckets of N values (default 5000); when it cannot be created, each rank
prints ``ERROR <message>`` and exits with 3.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from distml.errors import TrainingError
from distml.train import shm_allreduce
from distml.train.dist import context_from_env, init_distributed


def main(argv: list[str]) -> int:
    capacity = int(argv[argv.index("--capacity") + 1]) if "--capacity" in argv else 5000
    ctx = context_from_env()
    init_distributed(ctx, timeout=timedelta(seconds=60))
    assert shm_allreduce.available(ctx), "expected the shared-memory path to be available"
    try:
        state = shm_allreduce.SharedGradients.open(ctx, f"distml-test-{ctx.job_id}", capacity=capacity)
    except TrainingError as exc:
        os.write(1, f"ERROR rank {ctx.rank}: {exc}\n".encode())  # one write: the ranks' lines do not interleave
        dist.destroy_process_group()
        return 3
    gen = torch.Generator().manual_seed(1000 + ctx.rank)  # different data on every rank
    worst = 0.0
    for step in range(60):  # many buckets, so both slot sets are reused many times
        n = [1, 17, capacity - 1, capacity, 300][step % 5]
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
        state.allreduce_mean_(torch.zeros(capacity + 1))
        too_big = "accepted"
    except ValueError:
        too_big = "refused"
    dist.destroy_process_group()
    if ctx.rank == 0:
        print("RESULT " + json.dumps({"max_abs_diff": worst, "too_big": too_big}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
