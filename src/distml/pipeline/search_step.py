"""``distml run --search``: the search step (one Optuna study in place of the fixed candidates) and the refit.

The **search** step's key covers what defines the study: the space, the sampler's seed, the sampler, the pruner,
the metric, the ``[train]`` base settings, the dataset digest and the code (the tuner and the training it starts).
The study's name is that key's hash *without* the trial count (``pl-search-<hash>``), so asking for more trials
keys the step anew but reopens the same study: only the new trials run. Its outputs: the study, its storage, the
trial table and the run folders of the finished (``COMPLETE``) trials, which ``select`` compares on the
validation metric with the same rule as ``distml select``.

The **refit** step (``--refit``) retrains the chosen trial's settings on all of train (``val_fraction = 0``,
the same epochs) and exports it; ``register`` then registers that model. A refit model has no validation score:
the record keeps the trial's as the reason for the choice and reports the refit model's test accuracy.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
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
    from distml.search.tuner import StudyResult

# The search step's root modules: the tuner, and the training it starts (what the train steps' key covers).
SEARCH_CODE = ("distml.search.tuner", "distml.train.launch", "distml.train.worker", "distml.train.candidates")
SEARCH_LIBS = ("optuna", "torch", "numpy")
REFIT_CODE = ("distml.train.launch", "distml.train.worker", "distml.train.candidates", "distml.registry.evaluate")
REFIT_LIBS = ("torch", "numpy", "onnx", "onnxruntime")
TRIALS = "trials"  # the one parameter of the search step's key that the study's name leaves out
_TRIAL_RUN = re.compile(r"-t(\d+)$")  # a trial's run folder: <study>-t<NNN> (distml.search.tuner)


def search_params(config: DistmlConfig, base: TrainConfig) -> dict[str, Any]:
    """The search step's parameters: what defines the study, and the trial count asked for."""
    s = config.search
    return {
        **s.model_dump(mode="json", include={"space", "seed", "sampler", "pruner", "metric"}),
        "train": train_params(base),
        TRIALS: s.trials,
    }


def study_name(parts: KeyParts) -> str:
    """``pl-search-<hash>``: the step's key without the trial count, so more trials reopen the same study."""
    study = replace(parts, params={k: v for k, v in parts.params.items() if k != TRIALS})
    return f"pl-search-{study.key[:10]}"


def explain_trials(parts: KeyParts, earlier: list[Entry]) -> str | None:
    """``trials 8 -> 12: the study continues, 4 new trials`` when only the trial count differs from a cached run."""
    want = parts.to_json()
    same_study = {k: v for k, v in want["params"].items() if k != TRIALS}
    for entry in earlier:  # newest first
        old = entry.parts
        params = {k: v for k, v in old.get("params", {}).items() if k != TRIALS}
        if params != same_study or any(old.get(k) != want[k] for k in ("code", "inputs", "libs")):
            continue
        asked, had = old["params"].get(TRIALS), int(entry.outputs.get("trials", 0))
        new = parts.params[TRIALS] - had
        more = f"{new} new trial{'s' if new != 1 else ''}" if new > 0 else f"it holds {had} trials already, none new"
        return f"trials {asked} -> {parts.params[TRIALS]}: the study continues, {more}"
    return None


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
    its run over: its storage and its trials' run folders are deleted first.
    """
    from distml.search.tuner import tune

    study = study_name(parts)
    if forced:
        start_study_over(workspace, study, log)
    searching = config.model_copy(update={"train": base.model_copy(update={"dataset": dataset[:16]})})
    stream = LogStream(log)
    result = tune(searching, workspace, study=study, stream=stream)
    stream.flush()
    return search_outputs(result, config.search.metric, log)


def start_study_over(workspace: Workspace, study: str, log: Log) -> None:
    """Delete a study's storage and its trials' run folders, under its lock (refused while a tuner runs it)."""
    from distml.search.study import lock_study, storage_path

    lock = lock_study(workspace.home, study)
    try:
        storage = storage_path(workspace.home, study)
        trials = sorted((workspace.home / "runs").glob(f"{study}-t[0-9]*"))
        if not storage.exists() and not trials:
            return
        storage.unlink(missing_ok=True)
        for run_dir in trials:
            shutil.rmtree(run_dir)
        log(f"starting study {study} over: deleted {storage.name} and {len(trials)} trial run(s)")
    finally:
        lock.release()


def search_outputs(result: StudyResult, metric: str, log: Log) -> StepResult:
    """The study as step outputs; the finished trials' final checkpoints are the files ``select`` keys on."""
    from distml.train.checkpoint import list_checkpoints  # here, not above: it imports torch

    complete = [t for t in result.trials if t["state"] == "COMPLETE"]
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
    return StepResult(
        outputs={
            "study": result.study,
            "storage": str(result.storage),
            "trials": len(result.trials),
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
        },
        files=files,
        metric=f"{result.study}: {len(result.trials)} trials ({_states(states)}), best t{best['number']:03d} "
        + (f"{metric} {value:.4f}" if value is not None else ""),
        note=f"{result.ran} trial{'s' if result.ran != 1 else ''} run now",
    )


def choosing(config: DistmlConfig) -> DistmlConfig:
    """The config ``select`` chooses with after a search: the study's validation metric and its direction."""
    metric = config.search.metric
    direction = "min" if metric.endswith("loss") else "max"
    return config.model_copy(
        update={"pipeline": config.pipeline.model_copy(update={"metric": metric, "direction": direction})}
    )


# -- refit ----------------------------------------------------------------------------------------------------
def trial_number(run: str) -> int | None:
    """The trial number of a trial's run folder name (``pl-search-ab12cd34ef-t003`` -> 3)."""
    found = _TRIAL_RUN.search(run)
    return int(found.group(1)) if found else None


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
    winner = str(selected["winner"])
    trial = trial_number(winner)
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
