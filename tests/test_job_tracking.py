"""The launcher's MLflow side (JobTracking): it opens the run beside the workers and logs rank 0's epochs into it.

A real MLflow store (SQLite in a temp folder) and a real ``history.json`` as rank 0 writes it. The whole path (a
torchrun job whose metrics reach MLflow while its workers import no MLflow, a resumed job continuing them) is
``test_one_mlflow_run_per_job_with_metrics_reopened_on_resume`` in tests/test_train.py.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest

from conftest import make_mnist
from distml import tracking
from distml.config import TrainConfig
from distml.data import DatasetStore
from distml.data.ingest import ingest
from distml.data.sources import FashionMnistSource
from distml.errors import DistmlError
from distml.files import write_atomic
from distml.train.job import EPOCH_METRICS, EpochRecord, Job
from distml.train.job_run import JobTracking
from distml.workspace import Workspace


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
    """A prepared job over a real (tiny) dataset, with an MLflow run of its own."""
    home = tmp_path / "home"
    files = make_mnist(tmp_path / "src", n_train=32, n_test=8)
    ingest(FashionMnistSource(home / "downloads", location=str(files.folder), spec=files.spec),
           store=DatasetStore(Workspace(home)), name="tiny")  # fmt: skip
    uri, run_id = tracking.open_run(home=home, experiment="relay", run_name="r", existing_id=None, params={}, tags={})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = TrainConfig.model_validate({"dataset": "tiny", "workers": 1, "epochs": 3})
    dataset = DatasetStore(Workspace(home)).resolve("tiny")
    return Job(cfg, run_dir, dataset, "0" * 64, 1, mlflow_uri=uri, mlflow_run_id=run_id)


def _steps(job: Job, key: str = "val_accuracy") -> list[int]:
    assert job.mlflow_uri and job.mlflow_run_id
    return [m.step for m in tracking.mlflow_client(job.mlflow_uri).get_metric_history(job.mlflow_run_id, key)]


def test_each_epoch_reaches_mlflow_once_while_the_job_runs_and_a_resume_adds_only_new_ones(tmp_path: Path) -> None:
    job = _job(tmp_path)
    with JobTracking(job, every_s=0.1):
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
    with JobTracking(job) as relay:
        assert relay.relay() == 0
        _write_history(job.run_dir, 3)
        assert relay.relay() == 1
        assert relay.relay() == 0  # unchanged file: not read again
    assert _steps(job) == [1, 2, 3] and _steps(job, "train_loss") == [1, 2, 3]


def test_without_an_mlflow_run_the_relay_does_nothing(tmp_path: Path) -> None:
    job = _job(tmp_path)
    other_node = Job(job.config, job.run_dir, job.dataset_path, job.dataset_digest, 1)  # no run: another node
    _write_history(job.run_dir, 2)
    with JobTracking(other_node) as relay:
        assert relay.relay() == 0
    assert _steps(job) == []


def test_the_run_opens_beside_the_job_and_the_job_file_gets_it(tmp_path: Path) -> None:
    job = _job(tmp_path)
    fresh = Job(job.config, job.run_dir, job.dataset_path, job.dataset_digest, 1)  # as prepared: no run yet
    fresh.write()
    with JobTracking(fresh, Workspace(tmp_path / "home"), every_s=0.1) as tracked:
        _write_history(job.run_dir, 1)
    assert tracked.job.mlflow_run_id and tracked.job.mlflow_run_id != job.mlflow_run_id  # a run of its own
    assert Job.read(job.run_dir).mlflow_run_id == tracked.job.mlflow_run_id  # recorded for a resume
    assert _steps(tracked.job) == [1]


def test_a_run_that_cannot_be_opened_is_raised_when_the_job_ends_unless_the_job_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = _job(tmp_path)
    fresh = Job(job.config, job.run_dir, job.dataset_path, job.dataset_digest, 1)
    fresh.write()
    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'a-file' / 'mlflow.db'}")  # cannot be made
    with pytest.raises(OSError, match="a-file"), JobTracking(fresh, Workspace(tmp_path)):
        pass  # the workers' wait: the run could not be opened meanwhile
    with pytest.raises(DistmlError, match="the job's own"), JobTracking(fresh, Workspace(tmp_path)):
        raise DistmlError("the job's own failure")
