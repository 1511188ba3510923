"""Candidates: several real training jobs at once, sized to the cores; one failing does not stop the others."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from conftest import make_mnist, run_cli
from distml.config import TrainConfig
from distml.data import DatasetStore
from distml.data.ingest import ingest
from distml.data.sources import FashionMnistSource
from distml.errors import TrainingError, UsageError
from distml.train.candidates import plan, run_candidates, summarise
from distml.workspace import Workspace


@pytest.fixture
def tiny_home(home: Path, tmp_path: Path) -> Path:
    files = make_mnist(tmp_path / "src", n_train=256, n_test=64)
    src = FashionMnistSource(home / "downloads", location=str(files.folder), spec=files.spec)
    ingest(src, store=DatasetStore(Workspace(home)), name="tiny")
    return home


def _cfg(**kw: object) -> TrainConfig:
    base = {"dataset": "tiny", "workers": 1, "epochs": 1, "batch_size": 32, "log_every_steps": 1000}
    return TrainConfig.model_validate({**base, **kw})


def test_plan_shares_the_cores_without_oversubscribing(tmp_path: Path) -> None:
    three = [_cfg(model=m) for m in ("cnn", "cnn", "cnn-dropout")]
    jobs = plan(three, cores=2, gpus=0, prefix="p", home=tmp_path)
    assert [j.label for j in jobs] == ["cnn", "cnn-2", "cnn-dropout"]
    assert [(j.threads, j.slots) for j in jobs] == [(1, 1)] * 3  # two at a time on 2 cores
    wide = plan([_cfg(model="cnn", workers=2)] * 3, cores=16, gpus=0, prefix="p", home=tmp_path)
    assert [(j.threads, j.slots) for j in wide] == [(2, 4)] * 3  # 3 jobs x 2 workers x 2 threads = 12 <= 16
    assert [j.slots for j in plan([_cfg(workers=1)] * 2, cores=8, gpus=2, prefix="g", home=tmp_path)] == [1, 1]
    with pytest.raises(UsageError, match="more than the 1 GPU"):
        plan([_cfg(workers=2)], cores=8, gpus=1, prefix="g", home=tmp_path)
    with pytest.raises(UsageError, match="unknown model 'vgg'"):
        plan([_cfg(model="vgg")], cores=2, gpus=0, prefix="p", home=tmp_path)


def test_candidates_run_concurrently_and_a_failure_stops_no_one(tiny_home: Path) -> None:
    configs = [_cfg(model="cnn"), _cfg(model="cnn-batchnorm"), _cfg(model="cnn-dropout", lr=1e12, optimizer="sgd")]
    out = io.StringIO()
    jobs = run_candidates(configs, Workspace(tiny_home), "c", stream=out, poll_s=0.2)
    states = {j.label: j.state for j in jobs}
    assert states == {"cnn": "done", "cnn-batchnorm": "done", "cnn-dropout": "failed"}
    failed = next(j for j in jobs if j.state == "failed")
    assert "loss is" in failed.error and failed.log.is_file()
    assert all((tiny_home / "runs" / f"c-{j.label}" / "result.json").is_file() for j in jobs if j.state == "done")
    if len(os.sched_getaffinity(0)) >= 2:
        first, second = jobs[0], jobs[1]  # 1 worker x 1 thread each: the first two start together
        assert second.started < first.ended and first.started < second.ended
    assert "cnn-batchnorm" in out.getvalue() and "CANDIDATE" in out.getvalue()  # the final table
    summarise(jobs)  # at least one succeeded: no error


def test_no_candidate_succeeding_is_an_error(tiny_home: Path) -> None:
    bad = [_cfg(model=m, lr=1e12, optimizer="sgd") for m in ("cnn", "cnn-dropout")]
    jobs = run_candidates(bad, Workspace(tiny_home), "bad", stream=io.StringIO(), poll_s=0.2)
    with pytest.raises(TrainingError, match="no candidate succeeded"):
        summarise(jobs)
    result = run_cli("--home", tiny_home, "train", "--dataset", "tiny", "--candidates", "cnn", "--workers", "1",
                     "--epochs", "1", "--batch-size", "32", "--lr", "1e12", "--optimizer", "sgd")  # fmt: skip
    assert result.code == 1 and "no candidate succeeded" in result.err and "log " in result.err


def test_candidates_cli_errors_before_anything_starts(tiny_home: Path, tmp_path: Path) -> None:
    unknown = run_cli("--home", tiny_home, "train", "--dataset", "tiny", "--candidates", "cnn,vgg", "--workers", "1")
    assert unknown.code == 2 and "unknown model 'vgg'" in unknown.err
    assert not (tiny_home / "runs").exists() or not list((tiny_home / "runs").iterdir())
    config = tmp_path / "distml.toml"
    config.write_text('[[candidates]]\nmodle = "cnn"\n')
    typo = run_cli("--home", tiny_home, "--config", config, "train", "--candidates", "config")
    assert typo.code == 2 and "unknown key 'modle'" in typo.err and "did you mean 'model'" in typo.err
    config.write_text("[train]\nepochs = 1\n")
    empty = run_cli("--home", tiny_home, "--config", config, "train", "--candidates", "config")
    assert empty.code == 2 and "no [[candidates]] tables" in empty.err


def test_the_candidate_table_shows_validation_and_marks_test_as_reported_only(tmp_path: Path) -> None:
    import json

    from distml.train.candidates import Candidate, _Table

    job = Candidate("cnn", _cfg(model="cnn", epochs=2), tmp_path / "runs" / "c-cnn", state="done")
    job.run_dir.mkdir(parents=True)
    record = {"epoch": 1, "val_accuracy": 0.875, "test_accuracy": 0.5}
    (job.run_dir / "history.json").write_text(json.dumps([record]))
    out = io.StringIO()
    _Table(out).draw([job], final=True)
    header, row, note = out.getvalue().splitlines()
    assert header.split() == ["CANDIDATE", "STATE", "EPOCH", "VAL", "ACC", "TEST", "ACC*", "ETA"]
    assert row.split()[:5] == ["cnn", "done", "1/2", "87.50%", "50.00%"]
    assert note.startswith("* test accuracy: reported, not used to choose")
    lines = io.StringIO()
    _Table(lines).draw([job])  # not a terminal: a line per change
    assert lines.getvalue() == "cnn: done, epoch 1/2, val accuracy 87.50%, test accuracy 50.00%\n"
