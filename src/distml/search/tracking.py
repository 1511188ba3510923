"""A study in MLflow: one parent run per study, and the environment that makes each trial's training run its child.

The parent run lives in the dataset's experiment (``distml-<dataset>``), where the trials' training runs are
created, so MLflow's UI nests them under it. Its id is remembered in ``<home>/studies/<S>.mlflow.json``, next to
the study's storage: continuing the study (more trials, a resume after a kill) reopens the same run.

The tuner calls, in order: :func:`start_study_run` once, :func:`trial_env` for each trial's process (the launcher
reads it through :func:`distml.tracking.child_tags`), :func:`finish_study_run` at the end; the report
(:mod:`distml.search.report`) attaches its files with :func:`log_report`.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypedDict

from distml import tracking
from distml.files import write_atomic

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

    from distml.config import DistmlConfig
    from distml.search.result import StudyResult


class _RunRef(TypedDict):
    uri: str
    run_id: str


def run_file(studies: Path, study: str) -> Path:
    """Where a study's parent run is remembered: next to its storage, ``<home>/studies/<S>.mlflow.json``."""
    return studies / f"{study}.mlflow.json"


def recorded_run(studies: Path, study: str) -> tuple[str, str] | None:
    """(tracking URI, run id) of the study's parent run as recorded, or None when it has none."""
    try:
        ref: _RunRef = json.loads(run_file(studies, study).read_text())
        return ref["uri"], ref["run_id"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _settings(config: DistmlConfig) -> tuple[dict[str, str], dict[str, str]]:
    """(params, tags) of a study's run: what cannot change while a study continues, and what may."""
    search = config.search
    params = {
        "sampler": search.sampler,
        "pruner": search.pruner,
        "seed": str(search.seed),
        "metric": search.metric,
        "dataset": config.train.dataset,
    }
    for key, choices in sorted(search.space.items()):
        value = list(choices) if isinstance(choices, list) else choices.model_dump(mode="json")
        params[f"space.{key}"] = json.dumps(value)
    # Growing --trials or changing the concurrency or budget continues the same study: tags, which may change.
    tags = {
        "distml.search.trials": str(search.trials),
        "distml.search.max_concurrent": str(search.max_concurrent),
        "distml.search.budget_minutes": str(search.budget_minutes),
    }
    return params, tags


def start_study_run(home: Path, study: str, config: DistmlConfig) -> str:
    """Open the study's parent MLflow run (reopened when the study continues); returns its run id.

    Params are the search settings and the space; a setting that differs from the one the run was started with
    (the sampler changed between invocations, say) is kept as a ``distml.search.<key>`` tag instead, since
    MLflow's params cannot change.
    """
    from mlflow.entities import Param, RunTag

    from distml.data.reader import open_path
    from distml.data.store import DatasetStore
    from distml.workspace import Workspace

    uri = tracking.tracking_uri(home)
    client: MlflowClient = tracking.mlflow_client(uri)
    studies = home / "studies"
    params, tags = _settings(config)
    tags["distml.study"] = study
    run_id, logged = _reopen(client, uri, recorded_run(studies, study))
    if run_id is not None:
        client.update_run(run_id, status="RUNNING")
        tags.update({f"distml.search.{k}": v for k, v in params.items() if k in logged and logged[k] != v})
        params = {k: v for k, v in params.items() if k not in logged}
    else:
        dataset = open_path(DatasetStore(Workspace(home)).resolve(config.train.dataset)).name
        experiment = tracking.ensure_experiment(home, f"distml-{dataset}", client)
        run_id = str(client.create_run(experiment, run_name=f"study-{study}").info.run_id)
        tags["distml.dataset"] = dataset
        studies.mkdir(parents=True, exist_ok=True)
        write_atomic(run_file(studies, study), (json.dumps({"uri": uri, "run_id": run_id}) + "\n").encode())
    client.log_batch(
        run_id,
        params=[Param(k, v[:6000]) for k, v in sorted(params.items())],
        tags=[RunTag(k, v) for k, v in sorted(tags.items())],
    )
    return run_id


def _reopen(client: MlflowClient, uri: str, recorded: tuple[str, str] | None) -> tuple[str | None, dict[str, str]]:
    """(run id, its params) of the recorded parent run if it is in this store and not deleted, else (None, {})."""
    if recorded is None or recorded[0] != uri:  # none yet, or MLFLOW_TRACKING_URI now names another store
        return None, {}
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(recorded[1])
    except MlflowException:  # the recorded run is gone (the store was replaced): start a new one
        return None, {}
    if run.info.lifecycle_stage == "deleted":  # deleted in the UI: it stays readable, but is not the study's now
        return None, {}
    return recorded[1], dict(run.data.params)


def trial_env(parent_run_id: str, trial_number: int, study: str | None = None) -> dict[str, str]:
    """Environment variables for trial ``trial_number``'s process: its training run becomes the study run's child.

    Add them to the environment the trial's job starts with; :func:`distml.tracking.child_tags` turns them into
    the run's ``mlflow.parentRunId``, ``distml.trial`` (and ``distml.study``) tags.
    """
    env = {tracking.PARENT_RUN_ENV: parent_run_id, tracking.TRIAL_ENV: str(trial_number)}
    if study is not None:
        env[tracking.STUDY_ENV] = study
    return env


def finish_study_run(home: Path, run_id: str, result: StudyResult, *, ok: bool = True) -> None:
    """Record the study's outcome on its parent run (best value and trial, trial counts) and end the run.

    ``ok`` False (every trial failed, or the tuner was interrupted) ends it FAILED.
    """
    from mlflow.entities import Metric, RunTag

    client = tracking.mlflow_client(tracking.tracking_uri(home))
    metrics = {
        f"trials_{s.lower()}": float(sum(t["state"] == s for t in result.trials))
        for s in ("COMPLETE", "PRUNED", "STOPPED", "FAIL")
    }
    metrics["epochs_spent"] = float(sum(t["epochs_used"] or 0 for t in result.trials))
    tags = {"distml.study": result.study}
    best = result.best
    if best is not None and best["value"] is not None and math.isfinite(best["value"]):
        metric = client.get_run(run_id).data.params.get("metric", "value")
        metrics[f"best_{metric}"] = best["value"]
        if best["test_accuracy"] is not None:  # shown, never used to choose
            metrics["best_trial_test_accuracy"] = best["test_accuracy"]
        tags.update({"distml.best_trial": str(best["number"]), "distml.best_run_dir": str(best["run_dir"])})
        tags.update({f"best.{k}": str(v) for k, v in sorted(best["params"].items())})
    step = len(result.trials)  # the study's size when this was logged: a continued study logs a later point
    client.log_batch(
        run_id,
        metrics=[Metric(k, v, _now_ms(), step) for k, v in sorted(metrics.items())],
        tags=[RunTag(k, v) for k, v in sorted(tags.items())],
    )
    client.set_terminated(run_id, status="FINISHED" if ok else "FAILED")


def end_study_run(home: Path, run_id: str, status: Literal["KILLED", "FAILED"]) -> None:
    """End the study's parent run of an interrupted tuner (KILLED) or one that crashed (FAILED).

    The next tune of the study reopens it (:func:`start_study_run`) and ends it FINISHED.
    """
    client = tracking.mlflow_client(tracking.tracking_uri(home))
    client.set_terminated(run_id, status=status)


def log_report(storage: Path, study: str, files: list[Path]) -> str | None:
    """Attach the report's files to the study's parent run (under ``report/``); returns its id, or None if none.

    A recorded run that is gone (deleted in the UI, or its store replaced) is said in one line on stderr: the
    report is on disk either way, and ``distml tune show`` must not end in MLflow's traceback.
    """
    recorded = recorded_run(storage.parent, study)
    if recorded is None:
        return None
    from mlflow.exceptions import MlflowException

    uri, run_id = recorded
    client = tracking.mlflow_client(uri)
    try:
        if client.get_run(run_id).info.lifecycle_stage == "deleted":
            raise LookupError(run_id)
        for path in files:
            client.log_artifact(run_id, str(path), artifact_path="report")
    except (MlflowException, LookupError):
        where = files[0].parent if files else storage.parent
        print(
            f"note: study {study}'s MLflow run {run_id} is gone from {uri}; the report is only in {where}",
            file=sys.stderr,
        )
        return None
    return run_id


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)
