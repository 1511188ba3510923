"""Experiment tracking for a training job: one MLflow run per job (not per rank), TensorBoard event files.

The launcher opens the MLflow run before any worker starts and records its id in the job, so every attempt of
the job (a torchrun restart, or re-running the same ``--run-name``) logs to the same run. Rank 0 logs metrics
through :class:`RankTracker`; on other ranks it is a tracker that does nothing, so the loop never branches on rank.

The store is ``MLFLOW_TRACKING_URI`` when set, else ``sqlite:///<workspace>/mlflow.db`` with artifacts in
``<workspace>/mlartifacts``.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any

from distml.train.dist import DistContext


def tracking_uri(home: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home.resolve() / 'mlflow.db'}"


def mlflow_client(uri: str) -> Any:
    import logging

    from mlflow.tracking import MlflowClient

    for noisy in ("alembic", "mlflow.store.db.utils"):  # schema creation chatter on a new store
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return MlflowClient(tracking_uri=uri)


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


def close_run(uri: str, run_id: str, *, ok: bool, artifacts: list[Path]) -> None:
    client = mlflow_client(uri)
    for path in artifacts:
        if path.is_file():
            client.log_artifact(run_id, str(path))
    client.set_terminated(run_id, status="FINISHED" if ok else "FAILED")


def system_info() -> dict[str, str]:
    import torch

    return {
        "system.python": platform.python_version(),
        "system.torch": torch.__version__,
        "system.platform": platform.platform(),
        "system.cpu_count": str(os.cpu_count()),
        "system.cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
    }


class RankTracker:
    """Per-epoch metrics to MLflow and TensorBoard from rank 0; a no-op elsewhere (or with no run id)."""

    def __init__(self, ctx: DistContext, *, uri: str | None, run_id: str | None, tensorboard_dir: Path) -> None:
        self.enabled = ctx.is_main
        self._client = mlflow_client(uri) if self.enabled and uri and run_id else None
        self._run_id = run_id
        self._tb: Any = None
        if self.enabled:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(tensorboard_dir))

    def epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self._client is not None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self._client.log_batch(self._run_id, metrics=[Metric(k, float(v), now, epoch) for k, v in metrics.items()])
        for key, value in metrics.items():
            self._tb.add_scalar(key, value, epoch)
        self._tb.flush()

    def step(self, step: int, loss: float, lr: float) -> None:
        if self._tb is not None:
            self._tb.add_scalar("step/loss", loss, step)
            self._tb.add_scalar("step/lr", lr, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
