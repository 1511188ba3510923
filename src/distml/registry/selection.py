"""Choosing one of several evaluated models: on validation, never on test.

:func:`select` ranks candidates (dicts of a run's evaluation metrics, see :mod:`distml.registry.evaluate`) by a
declared metric and direction, after optional constraints (latency, parameter count). The metric must be one
measured on the validation split (``val_accuracy`` by default) or a property of the model (latency, parameters):
a test metric is refused, since choosing by the number a model then reports would flatter it; test accuracy is
shown beside the choice, marked as not used for it. Runs that held out different validation images are not
compared. Ties go to fewer parameters, then the training settings (their canonical JSON, when a candidate
carries them as ``settings``), then the run name: never to a measured time, so the same runs give the same
choice however noisy the machine was while they were timed. The rule of which metrics may choose is
:mod:`distml.selection_rule` (the config uses it too).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from distml.errors import UsageError
from distml.selection_rule import test_metric_problem


@dataclass(frozen=True)
class Choice:
    rows: list[dict[str, Any]]  # every candidate, ranked, with "eligible" and "reason"
    winner: dict[str, Any]
    metric: str
    direction: str


def check_selection_metric(metric: str) -> str:
    """``metric``, or a UsageError if it is measured on the test split (which reports, and never chooses)."""
    problem = test_metric_problem(metric)
    if problem:
        raise UsageError(problem)
    return metric


def select(
    candidates: list[dict[str, Any]],
    *,
    metric: str = "val_accuracy",
    direction: str = "max",
    max_latency_ms: float | None = None,
    max_params: int | None = None,
) -> Choice:
    """Rank ``candidates`` and pick the best eligible one; a test metric is refused as ``metric``.

    Each candidate is a dict with ``run``, its evaluation metrics and ``validation`` (the record of the split its
    ``val_*`` were measured on, or None): all must share one split. An optional ``settings`` dict (the run's
    training settings) breaks ties before the run name does.
    """
    if direction not in ("max", "min"):
        raise UsageError(f"direction {direction!r} is not max or min")
    if not candidates:
        raise UsageError("no candidates to select from")
    check_selection_metric(metric)
    _check_same_validation(candidates)
    unvalidated = [c["run"] for c in candidates if "val_accuracy" not in c]
    if metric.startswith("val_") and unvalidated:
        raise UsageError(
            f"{', '.join(unvalidated)} measured no {metric}: no validation split (trained with val_fraction 0, or "
            "evaluated on another dataset)",
            hint="train with val_fraction > 0 so the choice can be made on validation",
        )
    if metric not in candidates[0]:
        usable = (k for k, v in candidates[0].items() if isinstance(v, float) and not test_metric_problem(k))
        known = ", ".join(sorted(usable))
        raise UsageError(f"unknown metric {metric!r}", hint=f"one of {known}")
    rows = []
    for c in candidates:
        reasons = []
        if max_latency_ms is not None and c["latency_b1_ms"] > max_latency_ms:
            reasons.append(f"batch-1 latency {c['latency_b1_ms']:.3f} ms > {max_latency_ms} ms")
        if max_params is not None and c["parameters"] > max_params:
            reasons.append(f"{int(c['parameters']):,} parameters > {max_params:,}")
        rows.append({**c, "eligible": not reasons, "reason": "; ".join(reasons)})
    sign = -1.0 if direction == "max" else 1.0
    # Ties: fewer parameters, then the settings, then the name; a measured latency would make the choice noisy.
    rows.sort(
        key=lambda r: (not r["eligible"], sign * r[metric], r["parameters"], _canonical(r.get("settings")), r["run"])
    )
    if not rows[0]["eligible"]:
        raise UsageError("no candidate meets the constraints: " + "; ".join(f"{r['run']}: {r['reason']}" for r in rows))
    return Choice(rows, rows[0], metric, direction)


def _canonical(settings: object) -> str:
    """A candidate's settings as canonical JSON (sorted keys, no spaces): an order that no timing can change."""
    return "" if settings is None else json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)


def _check_same_validation(candidates: list[dict[str, Any]]) -> None:
    """Refuse to compare runs measured on different validation images: their val_* numbers do not compare."""
    splits: dict[str, list[str]] = {}
    for c in candidates:
        v = c.get("validation")
        splits.setdefault(v["indices_sha256"][:12] if v else "none", []).append(c["run"])
    if len(splits) > 1:
        described = "; ".join(f"split {sha}: {', '.join(runs)}" for sha, runs in splits.items())
        raise UsageError(
            f"the runs held out different validation images, so their validation metrics do not compare ({described})",
            hint="select among runs with the same val_fraction and val_seed on the same dataset",
        )


def selection_table(choice: Choice) -> list[str]:
    """The ranked candidates: the metric chosen on, validation and test accuracy (the latter only reported)."""
    metric = choice.metric
    extra = metric != "val_accuracy"  # the chosen metric gets its own column unless it is VAL ACC already
    head = f"{'RUN':<32} " + (f"{metric:>14} " if extra else "") + f"{'VAL ACC':>8} {'TEST ACC*':>9} "
    table = [head + f"{'PARAMS':>10} {'B1 MS':>7}  DECISION"]
    for r in choice.rows:
        decision = "winner" if r is choice.winner else ("eligible" if r["eligible"] else f"excluded: {r['reason']}")
        row = f"{r['run']:<32} " + (f"{r[metric]:>14.4f} " if extra else "")
        row += f"{_percent(r.get('val_accuracy')):>8} {_percent(r.get('test_accuracy')):>9} "
        table.append(row + f"{int(r['parameters']):>10,} {r['latency_b1_ms']:>7.3f}  {decision}")
    table.append(
        f"* test accuracy: measured and shown, not used for the choice (chosen on {metric}, {choice.direction})"
    )
    return table


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.2%}"
