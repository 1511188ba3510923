"""Loss and accuracy of a model on a whole split, measured by every rank of a job together.

Each rank evaluates a contiguous part of the split and one all-reduce sums the counts. The model evaluated is the
bare network (or the run's test-time augmentation around it), never the DDP wrapper: DDP's forward may hold a
collective (it broadcasts rank 0's buffers), which a rank whose part is empty, or shorter, would never join.
:func:`share_buffers` does that broadcast instead, once, before evaluation.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch
import torch.distributed as dist
import torch.nn.functional as F  # noqa: N812
from torch import nn

from distml.train.batches import Batcher
from distml.train.dist import DistContext

EVAL_BATCH = 1024


def share_buffers(model: nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm's running statistics), the model its checkpoint will hold.

    Each rank's statistics drift with its own batches; DDP copies rank 0's at the start of each forward, but
    evaluation runs the bare model, so it is done here, by every rank, before any rank evaluates.
    """
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


def evaluate(
    model: nn.Module, data: Batcher, ctx: DistContext, world_size: int, autocast: AbstractContextManager[object]
) -> tuple[float, float]:
    """Loss and accuracy on the whole split: each rank takes a contiguous part, sums are all-reduced.

    ``model`` must hold no collective in its forward (not a DDP wrapper): a rank's part may be empty, or have
    fewer batches than another's. The one all-reduce at the end is joined by every rank, whatever its part.
    """
    n = len(data)
    lo, hi = ctx.rank * n // world_size, (ctx.rank + 1) * n // world_size
    sums = torch.zeros(3, dtype=torch.float64, device=ctx.device)
    model.eval()
    with torch.no_grad(), autocast:
        for start in range(lo, hi, EVAL_BATCH):
            idx = torch.arange(start, min(hi, start + EVAL_BATCH), device=ctx.device)
            x, y = data.batch(idx)
            logits = model(x).float()
            sums[0] += F.cross_entropy(logits, y, reduction="sum").double()
            sums[1] += (logits.argmax(1) == y).sum()
            sums[2] += len(y)
    model.train()
    if ctx.distributed:
        dist.all_reduce(sums)
    total = max(1.0, float(sums[2]))
    return float(sums[0]) / total, float(sums[1]) / total
