"""Which metrics may choose a model: the rule the config, ``distml select``, the pipeline and the tuner share.

A leaf module (nothing of distml's stages): :mod:`distml.config` checks ``[pipeline] metric`` with it, so every
step's code key covers it, and it must not pull the registry or the server into the training step's key.
"""

from __future__ import annotations

# Measured on the test split: shown and recorded, never a selection key (the choice is made on validation).
TEST_METRICS = ("test_accuracy", "test_loss", "macro_f1")


def test_metric_problem(metric: str) -> str | None:
    """Why ``metric`` cannot choose a model (it is measured on the test split), or None if it can."""
    if not (metric.startswith("test_") or metric in TEST_METRICS):
        return None
    instead = f"val_{metric.removeprefix('test_')}" if metric.startswith("test_") else "val_accuracy"
    return (
        f"metric {metric!r} is measured on the test split: test metrics only report, the choice is made on "
        f"validation (use {instead})"
    )
