"""The MLflow run of one training job: opened by the launcher before the workers start, closed when they end.

One run per run folder (its id kept in ``mlflow_run_id``, so a resumed job continues the same run). The launcher
also logs the job's per-epoch metrics into it (:class:`MetricsRelay`), from the ``history.json`` that rank 0
rewrites after every epoch: the workers never import MLflow or open its store. That kept ~3.5 CPU-s (MLflow's
import and its SQLAlchemy store) off every job's way to its first step, and on a cluster only the launching host
writes the workspace's SQLite store, never several nodes through a shared filesystem.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import replace
from types import TracebackType
from typing import Any

from distml import tracking
from distml.data.reader import open_path
from distml.files import write_atomic
from distml.train.job import EPOCH_METRICS, EpochRecord, Job
from distml.workspace import Workspace


def open_job_run(job: Job, workspace: Workspace) -> Job:
    """Open the job's one MLflow run (reopened when the run folder already has one) and record it in the job."""
    id_file = job.run_dir / "mlflow_run_id"
    existing = id_file.read_text().strip() if id_file.is_file() else None
    params = {**job.config.model_dump(mode="json"), "world_size": job.world_size, "dataset_digest": job.dataset_digest}
    params.update(tracking.system_info())
    dataset_name = open_path(job.dataset_path).name
    uri, run_id = tracking.open_run(
        home=workspace.home,
        experiment=f"distml-{dataset_name}",
        run_name=job.run_dir.name,
        existing_id=existing,
        params=params,
        tags={
            "distml.run_dir": str(job.run_dir),
            "distml.dataset": dataset_name,
            "distml.model": job.config.model,
            **tracking.child_tags(),  # a search trial's run nests under its study's run
        },
    )
    write_atomic(id_file, run_id.encode())
    job = replace(job, mlflow_uri=uri, mlflow_run_id=run_id)
    job.write()
    return job


def close_job_run(job: Job, *, ok: bool, error: str | None = None) -> None:
    """Attach the run's record (and on success its final checkpoint) and mark the MLflow run finished or failed.

    A failed run's one-line reason is its ``distml.error`` tag.
    """
    if not (job.mlflow_uri and job.mlflow_run_id):
        return
    if error:
        tracking.mlflow_client(job.mlflow_uri).set_tag(job.mlflow_run_id, "distml.error", error[:5000])
    from distml.train.checkpoint import list_checkpoints

    final = list_checkpoints(job.checkpoints)[-1:] if ok else []
    artifacts = [job.run_dir / "job.json", job.run_dir / "history.json", *final]
    tracking.close_run(job.mlflow_uri, job.mlflow_run_id, ok=ok, artifacts=artifacts)


class MetricsRelay:
    """Logs each epoch of ``history.json`` into the job's MLflow run once, while the job runs and when it ends.

    Use it around the wait for the workers (``with MetricsRelay(job): ...``). The epochs the run already has (an
    earlier attempt of the same ``--run-name``) are not logged again: the run's own metric history says which.
    Each epoch's metrics are :data:`~distml.train.job.EPOCH_METRICS` at step = the epoch (1-based), as rank 0
    logged them before. Without an MLflow run (another node's launcher) it does nothing.
    """

    def __init__(self, job: Job, *, every_s: float = 1.0) -> None:
        self._history = job.run_dir / "history.json"
        self._uri, self._run_id = job.mlflow_uri, job.mlflow_run_id
        self._every_s = every_s
        self._client: Any = None
        self._logged: set[int] = set()
        self._seen: tuple[int, int] | None = None  # (mtime_ns, size) of the history last read
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> MetricsRelay:
        if self._uri and self._run_id:
            self._client = tracking.mlflow_client(self._uri)
            self._logged = {m.step for m in self._client.get_metric_history(self._run_id, EPOCH_METRICS[0])}
            self._thread = threading.Thread(target=self._loop, name="distml-metrics-relay", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._try_relay(last=True)  # the last epoch, written just before the workers ended

    def _loop(self) -> None:
        while not self._stop.wait(self._every_s):
            self._try_relay(last=False)

    def _try_relay(self, *, last: bool) -> None:
        try:
            self.relay()
        except Exception as exc:  # a locked SQLite store, say: the next poll tries again; the job goes on
            self._seen = None
            if last:
                print(f"note: epochs of {self._history} not logged to MLflow: {exc}", file=sys.stderr)

    def relay(self) -> int:
        """Log the epochs of ``history.json`` not logged yet; how many."""
        if self._client is None:
            return 0
        from mlflow.entities import Metric

        try:
            stat = self._history.stat()
        except FileNotFoundError:
            return 0
        if (stat.st_mtime_ns, stat.st_size) == self._seen:
            return 0
        records: list[EpochRecord] = json.loads(self._history.read_text())  # replaced atomically: whole or old
        new = [r for r in records if r["epoch"] not in self._logged]
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(r[k]), now, r["epoch"]) for r in new for k in EPOCH_METRICS]
        if metrics:
            self._client.log_batch(self._run_id, metrics=metrics)
        self._logged.update(r["epoch"] for r in new)
        self._seen = (stat.st_mtime_ns, stat.st_size)
        return len(new)
