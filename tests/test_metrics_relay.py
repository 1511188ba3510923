"""The launcher logs rank 0's per-epoch metrics to MLflow (MetricsRelay); no worker imports MLflow.

A real MLflow store (SQLite in a temp folder) and a real ``history.json`` as rank 0 writes it. The whole path (a
torchrun job whose metrics reach MLflow while its workers import no MLflow, a resumed job continuing them) is
``test_one_mlflow_run_per_job_with_metrics_reopened_on_resume`` in tests/test_train.py.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from distml import tracking
from distml.config import TrainConfig
from distml.files import write_atomic
from distml.train.job import EPOCH_METRICS, EpochRecord, Job
from distml.train.job_run import MetricsRelay


def _record(epoch: int) -> EpochRecord:
    return {
        "epoch": epoch,
        "global_step": 4 * epoch,
        "train_loss": 1.0 / epoch,
        "train_accuracy": 0.5,
        "val_loss": 0.9 / epoch,
        "val_accuracy": 0.6,
        "test_loss": math.nan,
        "test_accuracy": math.nan,
        "lr": 0.01,
        "images_per_s": 100.0,
        "seconds": 1.0,
        "step_losses": [1.0],
        "resumed_at_step": 0,
    }


def _write_history(run_dir: Path, epochs: int) -> None:
    write_atomic(run_dir / "history.json", json.dumps([_record(e) for e in range(1, epochs + 1)]).encode())


def _job(tmp_path: Path) -> Job:
    uri, run_id = tracking.open_run(
        home=tmp_path / "home", experiment="relay", run_name="r", existing_id=None, params={}, tags={}
    )
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = TrainConfig.model_validate({"dataset": "tiny", "workers": 1, "epochs": 3})
    return Job(cfg, run_dir, tmp_path / "data", "0" * 64, 1, mlflow_uri=uri, mlflow_run_id=run_id)


def _steps(job: Job, key: str = "val_accuracy") -> list[int]:
    assert job.mlflow_uri and job.mlflow_run_id
    return [m.step for m in tracking.mlflow_client(job.mlflow_uri).get_metric_history(job.mlflow_run_id, key)]


def test_each_epoch_reaches_mlflow_once_while_the_job_runs_and_a_resume_adds_only_new_ones(tmp_path: Path) -> None:
    job = _job(tmp_path)
    with MetricsRelay(job, every_s=0.1):
        _write_history(job.run_dir, 1)
        deadline = time.monotonic() + 10
        while not _steps(job) and time.monotonic() < deadline:  # logged while the job runs, not only at its end
            time.sleep(0.1)
        assert _steps(job) == [1]
        _write_history(job.run_dir, 2)  # the job's last epoch: logged at the latest as the relay stops
    assert _steps(job) == [1, 2]
    logged = tracking.mlflow_client(job.mlflow_uri).get_run(job.mlflow_run_id).data.metrics
    assert set(logged) == set(EPOCH_METRICS) and logged["train_loss"] == 0.5
    assert math.isnan(logged["test_accuracy"])  # NaN (no test yet) is logged as NaN, as rank 0 logged it

    # The same --run-name again (resume): its history holds the earlier epochs, which are not logged twice.
    with MetricsRelay(job) as relay:
        assert relay.relay() == 0
        _write_history(job.run_dir, 3)
        assert relay.relay() == 1
        assert relay.relay() == 0  # unchanged file: not read again
    assert _steps(job) == [1, 2, 3] and _steps(job, "train_loss") == [1, 2, 3]


def test_without_an_mlflow_run_the_relay_does_nothing(tmp_path: Path) -> None:
    job = _job(tmp_path)
    other_node = Job(job.config, job.run_dir, job.dataset_path, job.dataset_digest, 1)  # no run: another node
    _write_history(job.run_dir, 2)
    with MetricsRelay(other_node) as relay:
        assert relay.relay() == 0
    assert _steps(job) == []
