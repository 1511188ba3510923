"""MLflow access shared by the stages: the tracking URI, a client, experiments, and one run per training job.

The launcher opens the MLflow run before any worker starts and records its id in the job, so every attempt of
the job (a torchrun restart, or re-running the same ``--run-name``) logs to the same run. The launcher also logs the
per-epoch metrics rank 0 writes (:class:`distml.train.job_run.JobTracking`); workers never open the store.

The store is ``MLFLOW_TRACKING_URI`` when set, else ``sqlite:///<workspace>/mlflow.db`` with artifacts in
``<workspace>/mlartifacts``.

A search trial's training run is a child of its study's run (:mod:`distml.search.tracking`): the tuner starts the
trial's process with :data:`PARENT_RUN_ENV` (and the study and trial number) in its environment, and the launcher
adds :func:`child_tags` to the run it opens.
"""

from __future__ import annotations

import os
import platform
import shutil
from pathlib import Path
from typing import Any

# Set by the tuner for a trial's process (distml.search.tracking.trial_env), read by the launcher that opens its run.
PARENT_RUN_ENV = "DISTML_MLFLOW_PARENT_RUN_ID"
STUDY_ENV = "DISTML_STUDY"
TRIAL_ENV = "DISTML_TRIAL"


def tracking_uri(home: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home.resolve() / 'mlflow.db'}"


def mlflow_client(uri: str) -> Any:
    import logging

    from mlflow.tracking import MlflowClient

    for noisy in ("alembic", "mlflow.store.db.utils"):  # schema creation chatter on a new store
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # MLflow draws a tqdm bar on stderr for every artifact download once tqdm is installed (optuna brings it):
    # six lines around the one-line error a refused model gets, and noise in every serve and predict.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    _seed_sqlite_store(uri)
    return MlflowClient(tracking_uri=uri)


def _seed_sqlite_store(uri: str) -> None:
    """Give a new SQLite store its schema by copying a blank store this machine built once for this MLflow version.

    MLflow builds a new store's schema by running each of its migrations: 3.5 s here on a quiet machine (up to
    ~19 s on a busy one), in every new workspace, although the result depends only on MLflow's version. The copy
    is linked into place, so a store another process has just created is never replaced; anything unexpected (no
    writable cache folder, another MLflow) leaves the store to MLflow, as before.
    """
    if not uri.startswith("sqlite:///"):
        return
    db = Path(uri.removeprefix("sqlite:///"))
    if db.exists():
        return
    import mlflow

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "distml"
    blank = cache / f"mlflow-{mlflow.__version__}-blank.db"
    try:
        if not blank.is_file():
            _build_blank_store(blank)
        db.parent.mkdir(parents=True, exist_ok=True)
        partial = db.with_name(f".{db.name}.{os.getpid()}.partial")
        shutil.copyfile(blank, partial)
        try:
            os.link(partial, db)  # fails if the store exists by now: then it is that one
        finally:
            partial.unlink()
    except Exception:  # noqa: S110 - any failure: MLflow creates the store itself, as without the seed
        pass


def _build_blank_store(path: Path) -> None:
    """An MLflow SQLite store with the current schema and nothing in it, built by MLflow's own migrations."""
    import sqlalchemy
    from mlflow.store.db.utils import _initialize_tables

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.unlink(missing_ok=True)
    engine = sqlalchemy.create_engine(f"sqlite:///{partial}")
    try:
        _initialize_tables(engine)  # type: ignore[no-untyped-call]
    finally:
        engine.dispose()
    os.replace(partial, path)  # whole or not at all, whoever else builds it meanwhile


def ensure_experiment(home: Path, experiment: str, client: Any = None) -> str:
    """Create the store (schema) and the experiment if missing; returns the experiment id.

    Call it once before starting jobs that log concurrently: two processes creating a new SQLite store's schema,
    or the same experiment, at the same moment fail (seen: "duplicate column name" from the schema migration).
    """
    client = client or mlflow_client(tracking_uri(home))
    exp = client.get_experiment_by_name(experiment)
    if exp is not None:
        return str(exp.experiment_id)
    artifacts = None if os.environ.get("MLFLOW_TRACKING_URI") else (home.resolve() / "mlartifacts").as_uri()
    return str(client.create_experiment(experiment, artifact_location=artifacts))


def open_run(
    *, home: Path, experiment: str, run_name: str, existing_id: str | None, params: dict[str, Any], tags: dict[str, str]
) -> tuple[str, str]:
    """Create (or reopen) the job's MLflow run; returns (tracking URI, run id)."""
    uri = tracking_uri(home)
    client = mlflow_client(uri)
    if existing_id:
        try:
            client.update_run(existing_id, status="RUNNING")
            return uri, existing_id
        except Exception:  # noqa: S110 - the old run is gone (store replaced): start a new one below
            pass
    exp_id = ensure_experiment(home, experiment, client)
    run = client.create_run(exp_id, run_name=run_name, tags=tags)
    from mlflow.entities import Param

    client.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in sorted(params.items())])
    return uri, run.info.run_id


def child_tags() -> dict[str, str]:
    """Tags that make a training run the child of a study's run, from the environment a tuner set (else none).

    ``mlflow.parentRunId`` is the tag MLflow's UI nests runs by; the study and trial number say which trial it is.
    """
    parent = os.environ.get(PARENT_RUN_ENV)
    if not parent:
        return {}
    tags = {"mlflow.parentRunId": parent}
    for env, tag in ((STUDY_ENV, "distml.study"), (TRIAL_ENV, "distml.trial")):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    return tags


def close_run(uri: str, run_id: str, *, ok: bool, artifacts: list[Path]) -> None:
    client = mlflow_client(uri)
    for path in artifacts:
        if path.is_file():
            client.log_artifact(run_id, str(path))
    client.set_terminated(run_id, status="FINISHED" if ok else "FAILED")


def system_info(cuda: str) -> dict[str, str]:
    """The host's software as run parameters; ``cuda``: the first GPU's name, or "none".

    torch's version is read from its installed package, not by importing it: a launcher has no other use for torch
    (~1.8 CPU-s, on a 2-core machine beside the workers starting).
    """
    from importlib.metadata import version

    return {
        "system.python": platform.python_version(),
        "system.torch": version("torch"),
        "system.platform": platform.platform(),
        "system.cpu_count": str(os.cpu_count()),
        "system.cuda": cuda,
    }
