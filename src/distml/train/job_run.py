"""The MLflow run of one training job: opened by the launcher before the workers start, closed when they end.

One run per run folder (its id kept in ``mlflow_run_id``, so a resumed job continues the same run); the workers
log their metrics into it through :class:`distml.train.tracking.RankTracker`.
"""

from __future__ import annotations

from dataclasses import replace

from distml import tracking
from distml.data.reader import open_path
from distml.files import write_atomic
from distml.train.job import Job
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
