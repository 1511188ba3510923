"""``distml run --search``: the search step (one Optuna study in place of the fixed candidates) and the refit.

The **search** step's key covers what defines the study: the space, the sampler's seed, the sampler, the pruner,
the metric, a trial's epochs, the enqueued trials, the ``[train]`` base settings, the dataset digest and the code
(the tuner and the training it starts); and how far to take it: the trial count and the budget. The study's name
is that key's hash *without* the trial count and the budget (``pl-search-<hash>``), so asking for more trials or
more minutes keys the step anew but reopens the same study: only the new trials run, and the reason says so.
Its outputs: the study, its storage, the trials asked for and started, their states, whether the budget ended
the study early, the trial table and the run folders of the finished (``COMPLETE``) trials, which ``select``
compares on the validation metric with the same rule as ``distml select``.

A study the budget stopped early is cached like any other: the same command again is a hit (a warm rerun is
fast, and the same inputs give the same answer), and the hit says that the budget stopped it and how to go on.

The **refit** step (``--refit``) retrains the chosen trial's settings on all of train (``val_fraction = 0``,
the same epochs) and exports it; ``register`` then registers that model. A refit model has no validation score:
the record keeps the trial's as the reason for the choice and reports the refit model's test accuracy.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distml.card import CARD_FILE, ONNX_FILE
from distml.config import DistmlConfig, TrainConfig
from distml.errors import TrainingError
from distml.pipeline.cache import Entry, KeyParts
from distml.pipeline.steps import StepResult, train_params
from distml.workspace import Workspace

if TYPE_CHECKING:
    from distml.data.sources.base import Log
    from distml.search.config import SearchConfig
    from distml.search.tuner import StudyResult

# The search step's root modules: the tuner, and the training it starts (what the train steps' key covers).
SEARCH_CODE = ("distml.search.tuner", "distml.train.launch", "distml.train.worker", "distml.train.candidates")
SEARCH_LIBS = ("optuna", "torch", "numpy")
REFIT_CODE = ("distml.train.launch", "distml.train.worker", "distml.train.candidates", "distml.registry.evaluate")
REFIT_LIBS = ("torch", "numpy", "onnx", "onnxruntime")
TRIALS, BUDGET = "trials", "budget_minutes"
# In the step's key but not in the study's name: how far to take the study, not what it is.
HOW_FAR = (TRIALS, BUDGET)


def search_params(config: DistmlConfig, base: TrainConfig) -> dict[str, Any]:
    """The search step's parameters: what defines the study, and how far to take it (trials, budget)."""
    s = config.search
    study = {"space", "seed", "sampler", "pruner", "metric", "epochs", "enqueue"}
    return {
        **s.model_dump(mode="json", include=study),
        "train": train_params(base),
        TRIALS: s.trials,
        BUDGET: s.budget_minutes,
    }


def study_name(parts: KeyParts) -> str:
    """``pl-search-<hash>``: the step's key without the trials and budget, so more of either reopens the study."""
    return f"pl-search-{replace(parts, params=_study_params(parts.params)).key[:10]}"


def explain_trials(parts: KeyParts, earlier: list[Entry]) -> str | None:
    """``trials 8 -> 12: the study continues, 4 new trials`` when only the trials or budget differ from a cached run.

    None when no earlier run was of the same study: the runner then says what differs, as for any step.
    """
    want = parts.to_json()
    for entry in earlier:  # newest first
        old = entry.parts
        same_code = all(old.get(k) == want[k] for k in ("code", "inputs", "libs"))
        if not same_code or _study_params(old.get("params", {})) != _study_params(want["params"]):
            continue
        changed = []
        for name, label, shown in ((TRIALS, "trials", str), (BUDGET, "budget", _budget)):
            was, now = old["params"].get(name), parts.params.get(name)
            if was != now:
                changed.append(f"{label} {shown(was)} -> {shown(now)}")
        had = int(entry.outputs.get("trials", 0))
        new = parts.params[TRIALS] - had
        more = f"{new} new trial{'s' if new != 1 else ''}" if new > 0 else f"it holds {had} trials already, none new"
        stopped = int((entry.outputs.get("states") or {}).get("STOPPED", 0))  # the budget stopped them: they resume
        more += f", {stopped} stopped by the budget resume{'s' if stopped == 1 else ''}" if stopped else ""
        return f"{', '.join(changed) or 'the same study'}: the study continues, {more}"
    return None


def explain_hit(outputs: dict[str, Any]) -> str | None:
    """What a hit adds when the budget ended the cached study early: how many trials it ran, and how to go on."""
    if not outputs.get("budget_stopped"):
        return None
    return (
        f"the {_minutes(outputs.get(BUDGET))} budget stopped the study after {outputs.get('trials')} of "
        f"{outputs.get('asked')} trials (raise --budget-minutes or --trials to continue)"
    )


def _study_params(params: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in params.items() if k not in HOW_FAR}


def _minutes(value: object) -> str:
    return f"{value:g}-minute" if isinstance(value, int | float) else "no"


def _budget(value: object) -> str:
    return f"{value:g} min" if isinstance(value, int | float) else "none"


class LogStream(io.StringIO):
    """A text stream that hands each complete line to a step's log (what the tuner prints, as the step's lines)."""

    def __init__(self, log: Log) -> None:
        super().__init__()
        self._log, self._pending = log, ""

    def write(self, text: str) -> int:
        lines = (self._pending + text).split("\n")
        self._pending = lines.pop()
        for line in lines:
            if line.strip():
                self._log(line)
        return len(text)

    def flush(self) -> None:
        if self._pending.strip():
            self._log(self._pending)
        self._pending = ""


def run_search(
    workspace: Workspace,
    config: DistmlConfig,
    base: TrainConfig,
    dataset: str,
    parts: KeyParts,
    log: Log,
    *,
    forced: bool = False,
) -> StepResult:
    """Run (or continue) the study of this key until it holds ``[search] trials`` trials; its trials as outputs.

    ``forced`` (``--force search``, ``--no-cache``) starts the study over, as a forced training step starts
    its run over: its storage, its trials' run folders and its report are deleted first.
    """
    from distml.search.study import start_over
    from distml.search.tuner import tune

    study = study_name(parts)
    if forced:
        start_over(workspace.home, study, log)
    searching = config.model_copy(update={"train": base.model_copy(update={"dataset": dataset[:16]})})
    stream = LogStream(log)
    result = tune(searching, workspace, study=study, stream=stream)
    stream.flush()
    return search_outputs(result, config.search, log)


def search_outputs(result: StudyResult, search: SearchConfig, log: Log) -> StepResult:
    """The study as step outputs; the finished trials' final checkpoints are the files ``select`` keys on."""
    from distml.train.checkpoint import list_checkpoints  # here, not above: it imports torch

    metric = search.metric
    started = [t for t in result.trials if t["state"] != "WAITING"]  # an enqueued trial not reached is not one
    complete = [t for t in started if t["state"] == "COMPLETE"]
    states = dict(sorted(Counter(str(t["state"]) for t in result.trials).items()))
    if not complete:
        raise TrainingError(
            f"no trial of study {result.study} finished ({_states(states) or 'no trials'}): nothing to select",
            hint=f"see 'distml tune show {result.study}' for why",
        )
    files: dict[str, Path] = {}
    for t in complete:
        run_dir = Path(t["run_dir"])
        files[f"t{t['number']:03d}.checkpoint"] = list_checkpoints(run_dir / "checkpoints")[-1]
        files[f"t{t['number']:03d}.result"] = run_dir / "result.json"
    best = result.best or complete[0]
    value = best["value"]
    validation = json.loads((Path(best["run_dir"]) / "result.json").read_text()).get("validation")
    from distml.search.report import trial_table, write_report

    for line in trial_table(result).splitlines():
        log(line)
    # The same report as 'distml tune show': plots and report.md beside the study, and on its MLflow run.
    report = write_report(result)
    log(f"study report: {', '.join(str(f) for f in report)}")
    outputs: dict[str, Any] = {
        "study": result.study,
        "storage": str(result.storage),
        "trials": len(started),
        "asked": search.trials,
        BUDGET: search.budget_minutes,
        "budget_stopped": result.budget_stopped,
        "ran": result.ran,
        "states": states,
        "metric": metric,
        "best": {
            "number": best["number"],
            "params": best["params"],
            "value": value,
            "run_dir": best["run_dir"],
            "epochs_used": best["epochs_used"],
            "test_accuracy": best["test_accuracy"],
        },
        "complete": [t["run_dir"] for t in complete],
        "table": [dict(t) for t in result.trials],
        "validation": validation,
        "report": [str(f) for f in report],
    }
    ran = f"{result.ran} trial{'s' if result.ran != 1 else ''} run now"
    return StepResult(
        outputs=outputs,
        files=files,
        metric=f"{result.study}: {len(started)} trials ({_states(states)}), best t{best['number']:03d} "
        + (f"{metric} {value:.4f}" if value is not None else ""),
        note=ran + (f"; {explain_hit(outputs)}" if result.budget_stopped else ""),
    )


def choosing(config: DistmlConfig) -> DistmlConfig:
    """The config ``select`` chooses with after a search: the study's validation metric and its direction."""
    metric = config.search.metric
    direction = "min" if metric.endswith("loss") else "max"
    return config.model_copy(
        update={"pipeline": config.pipeline.model_copy(update={"metric": metric, "direction": direction})}
    )


# -- refit ----------------------------------------------------------------------------------------------------
def refit_config(workspace: Workspace, winner: str, dataset: str) -> TrainConfig:
    """The chosen trial's settings, on all of train: ``val_fraction = 0``, the same epochs."""
    job = json.loads((workspace.home / "runs" / winner / "job.json").read_text())
    return TrainConfig.model_validate({**job["config"], "val_fraction": 0.0, "dataset": dataset[:16]})


def settings_digest(cfg: TrainConfig) -> str:
    """The refit step's input: its settings (what changes the weights), hashed."""
    return hashlib.sha256(json.dumps(train_params(cfg), sort_keys=True).encode()).hexdigest()


def refit_outputs(workspace: Workspace, run_dir: Path, selected: dict[str, Any], log: Log) -> StepResult:
    """Export the refit run and measure it on test; the selection's validation figure stays the reason."""
    from distml.registry.evaluate import evaluate_target
    from distml.train.checkpoint import list_checkpoints  # here, not above: it imports torch

    artifact, ev = evaluate_target(workspace, str(run_dir), log=log)
    acc = ev.metrics["test_accuracy"]
    winner, trial = str(selected["winner"]), selected.get("trial")
    reason = f"{selected['metric']} {selected['value']:.4f} of trial {trial} ({winner}), on validation"
    return StepResult(
        outputs={
            "refit": True,
            "run": run_dir.name,
            "run_dir": str(run_dir),
            "source_run": winner,
            "source_trial": trial,
            "reason": reason,
            "test_accuracy": acc,
            "artifact": str(artifact.path),
        },
        files={
            ONNX_FILE: artifact.onnx_path,
            CARD_FILE: artifact.path / CARD_FILE,
            "checkpoint": list_checkpoints(run_dir / "checkpoints")[-1],
        },
        metric=f"{run_dir.name}: trial {trial} on all of train, test acc {acc:.2%}",
    )


def _states(states: dict[str, int]) -> str:
    return ", ".join(f"{n} {s.lower()}" for s, n in states.items())
