"""Learning-rate schedules as pure functions of the step (nothing to save or restore on resume)."""

from __future__ import annotations

import math


def lr_at(step: int, *, total_steps: int, base_lr: float, schedule: str, warmup_steps: int = 0) -> float:
    """The learning rate for optimizer step ``step`` (0-based) of ``total_steps``."""
    total = max(1, total_steps)
    if schedule == "onecycle":
        # Linear up to the peak at 25%, then linear down to ~0 (as in airbench-style fast schedules).
        peak = max(1, int(0.25 * total))
        if step < peak:
            return base_lr * (0.1 + 0.9 * step / peak)
        return base_lr * max(0.0, (total - step) / max(1, total - peak))
    if warmup_steps and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    if schedule == "step":
        # /10 at 50% and again at 75% of training.
        return base_lr * (0.1 ** (int(step >= 0.5 * total) + int(step >= 0.75 * total)))
    if schedule == "cosine":
        progress = (step - warmup_steps) / max(1, total - warmup_steps)
        return base_lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    raise ValueError(f"unknown schedule {schedule!r}")
