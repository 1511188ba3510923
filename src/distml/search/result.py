"""What a study holds, as plain records: :class:`TrialRecord` per trial and the :class:`StudyResult`.

Read from the study's storage (:func:`load_study_result`) without running anything; ``distml tune show``, the
report and the pipeline's search step use them. :mod:`distml.search.tuner` re-exports both names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypedDict

from distml.errors import NotFoundError
from distml.search.config import Choice
from distml.search.study import check_study_name, storage_path, storage_url
from distml.workspace import Workspace

if TYPE_CHECKING:
    import optuna

# Optuna's states, and STOPPED: a trial the budget stopped. Optuna keeps it RUNNING (with the user attr
# ``stopped_by = "budget"``), so that the next tune resumes it from its checkpoint like an interrupted one.
TrialStateName = Literal["COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING", "STOPPED"]
BUDGET = "budget"  # the ``stopped_by`` user attr of a trial the budget stopped


class TrialRecord(TypedDict):
    """One trial: its Optuna number and state, sampled ``[train]`` params, validation value and run folder."""

    number: int
    state: TrialStateName
    params: dict[str, Choice]
    value: float | None  # the validation metric (the last one reported, for a pruned trial)
    epochs_used: int
    seconds: float
    run_dir: str
    test_accuracy: float | None  # measured and shown, never used to choose


@dataclass(frozen=True)
class StudyResult:
    """A study after a :func:`~distml.search.tuner.tune` call (``ran``: trials run by that call) or as stored."""

    study: str
    storage: Path
    trials: list[TrialRecord]
    best: TrialRecord | None
    ran: int
    metric: str = "val_accuracy"
    direction: str = "maximize"
    budget_stopped: bool = False  # the budget ended that call early: trials stopped or not started


def record(trial: optuna.trial.FrozenTrial) -> TrialRecord:
    """A stored trial as a :class:`TrialRecord` (user attrs set by the tuner; missing ones read as empty)."""
    attrs = trial.user_attrs
    value = trial.value
    if value is None and trial.intermediate_values:  # pruned: its last reported value
        value = trial.intermediate_values[max(trial.intermediate_values)]
    test = attrs.get("test_accuracy")
    state: TrialStateName = trial.state.name  # type: ignore[assignment]  # optuna's names are these five
    if state == "RUNNING" and attrs.get("stopped_by") == BUDGET:
        state = "STOPPED"
    return TrialRecord(
        number=trial.number,
        state=state,
        params=dict(trial.params),
        value=_finite(value),
        epochs_used=int(attrs.get("epochs_used", len(trial.intermediate_values))),
        seconds=float(attrs.get("seconds", 0.0)),
        run_dir=str(attrs.get("run_dir", "")),
        test_accuracy=_finite(test),
    )


def best_of(records: list[TrialRecord], direction: str) -> TrialRecord | None:
    """The best COMPLETE trial; failing that, the best trial stopped with a value (a budget cut every trial)."""
    sign = 1.0 if direction == "minimize" else -1.0
    for states in (("COMPLETE",), ("PRUNED", "STOPPED")):
        scored = [
            (sign * r["value"], r["number"], r) for r in records if r["state"] in states and r["value"] is not None
        ]
        if scored:
            return min(scored, key=lambda s: (s[0], s[1]))[2]
    return None


def from_study(study: optuna.Study, path: Path, ran: int, *, budget_stopped: bool = False) -> StudyResult:
    """The study as records; ``ran`` and ``budget_stopped`` say what the call that ran it did."""
    records = [record(t) for t in study.get_trials(deepcopy=False)]
    direction = str(study.user_attrs.get("direction", "maximize"))
    metric = str(study.user_attrs.get("metric", "val_accuracy"))
    best = best_of(records, direction)
    return StudyResult(study.study_name, path, records, best, ran, metric, direction, budget_stopped)


def load_study_result(workspace: Workspace, study: str) -> StudyResult:
    """Read study ``study`` of the workspace without running anything (NotFoundError if there is none)."""
    import optuna

    path = storage_path(workspace.home, check_study_name(study))
    if not path.is_file():
        known = sorted(p.stem for p in path.parent.glob("*.db")) if path.parent.is_dir() else []
        hint = f"studies here: {', '.join(known)}" if known else "start one with distml tune --study NAME"
        raise NotFoundError(f"no study {study!r} in {path.parent}", hint=hint)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        loaded = optuna.load_study(study_name=study, storage=storage_url(path))
    except KeyError:
        raise NotFoundError(f"{path} holds no study named {study!r}") from None
    return from_study(loaded, path, ran=0)


def _finite(value: object) -> float | None:
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    return None
