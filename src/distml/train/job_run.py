"""The MLflow run of one training job: opened by the launcher as the workers start, closed when they end.

One run per run folder (its id kept in ``mlflow_run_id``, so a resumed job continues the same run). The launcher
opens it in a thread while the workers start and logs the job's per-epoch metrics into it (:class:`JobTracking`),
from the ``history.json`` that rank 0 rewrites after every epoch: the workers never import MLflow or open its
store. That kept MLflow's import and its SQLAlchemy store (~3.5 CPU-s) off every job's way to its first step, in
the launcher and in rank 0, and on a cluster only the launching host writes the workspace's SQLite store, never
several nodes through a shared filesystem.
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
from distml.train.dist import cuda_device_name
from distml.train.job import EPOCH_METRICS, EpochRecord, Job
from distml.workspace import Workspace


def open_job_run(job: Job, workspace: Workspace) -> Job:
    """Open the job's one MLflow run (reopened when the run folder already has one) and record it in the job.

    The job file is rewritten with the run (atomically: a worker reading it meanwhile gets either version).
    """
    id_file = job.run_dir / "mlflow_run_id"
    existing = id_file.read_text().strip() if id_file.is_file() else None
    params = {**job.config.model_dump(mode="json"), "world_size": job.world_size, "dataset_digest": job.dataset_digest}
    params.update(tracking.system_info(cuda=cuda_device_name()))
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


class JobTracking:
    """The job's MLflow side, kept by the launcher in a thread beside the workers: the run, then each epoch's metrics.

    ``with JobTracking(job, workspace) as tracked: <run the workers>``, then :attr:`job` is the job with its MLflow
    run. The thread opens the run (:func:`open_job_run`; with ``workspace`` None the job's own run, if any, is used)
    while the workers start, so MLflow's import and store (~3.5 CPU-s) are off the job's way to its first step;
    the workers never use the run's id. It then logs each epoch of the ``history.json`` that rank 0 rewrites into
    the run once, while the job runs and when it ends: :data:`~distml.train.job.EPOCH_METRICS` at step = the epoch
    (1-based). Epochs the run already has (an earlier attempt of the same ``--run-name``) are not logged again: the
    run's own metric history says which. An error opening the run is raised when the block ends (the job's
    checkpoints are kept; the same command resumes); one logging an epoch is retried at the next poll.
    """

    def __init__(self, job: Job, workspace: Workspace | None = None, *, every_s: float = 1.0) -> None:
        self.job = job
        self._workspace = workspace
        self._history = job.run_dir / "history.json"
        self._every_s = every_s
        self._client: Any = None
        self._logged: set[int] = set()
        self._seen: tuple[int, int] | None = None  # (mtime_ns, size) of the history last read
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> JobTracking:
        if self._workspace is None and not (self.job.mlflow_uri and self.job.mlflow_run_id):
            self._ready.set()  # no run to open or log into (another node's launcher)
            return self
        self._thread = threading.Thread(target=self._main, name="distml-job-tracking", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        if self._error is not None:
            if kind is None:
                raise self._error
            return  # the job's own failure is the one to report
        self._try_relay(last=True)  # the last epoch, written just before the workers ended

    def _main(self) -> None:
        try:
            if self._workspace is not None:
                self.job = open_job_run(self.job, self._workspace)
            if self.job.mlflow_uri and self.job.mlflow_run_id:
                self._client = tracking.mlflow_client(self.job.mlflow_uri)
                history = self._client.get_metric_history(self.job.mlflow_run_id, EPOCH_METRICS[0])
                self._logged = {m.step for m in history}
        except BaseException as exc:  # raised by __exit__, in the launcher's thread
            self._error = exc
            return
        finally:
            self._ready.set()
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
        """Log the epochs of ``history.json`` not logged yet (once the run is open); how many."""
        self._ready.wait()
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
            self._client.log_batch(self.job.mlflow_run_id, metrics=metrics)
        self._logged.update(r["epoch"] for r in new)
        self._seen = (stat.st_mtime_ns, stat.st_size)
        return len(new)
