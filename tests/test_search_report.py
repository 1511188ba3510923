"""``distml tune show``'s table and report, and a study in MLflow: a parent run with its trials' runs as children.

The studies here are real Optuna studies in a temp SQLite file, written trial by trial with the states, per-epoch
values and user attributes the tuner records (the report reads any study, however it was filled).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from conftest import make_mnist
from distml.config import DistmlConfig, TrainConfig
from distml.data.ingest import ingest
from distml.data.sources import FashionMnistSource
from distml.data.store import DatasetStore
from distml.search.report import NOT_USED, trial_table, write_report
from distml.search.result import StudyResult, load_study_result
from distml.workspace import Workspace

SPACE = {
    "model": CategoricalDistribution(["cnn", "cnn-batchnorm"]),
    "lr": FloatDistribution(1e-3, 1e-1, log=True),
    "batch_size": CategoricalDistribution([64, 128]),
}
# (state, params, per-epoch val_accuracy, test accuracy)
Trial = tuple[TrialState, dict[str, object], list[float], float | None]
TRIALS: list[Trial] = [
    (TrialState.COMPLETE, {"model": "cnn", "lr": 0.0031622, "batch_size": 64}, [0.80, 0.85, 0.87], 0.861),
    (TrialState.PRUNED, {"model": "cnn", "lr": 0.09, "batch_size": 128}, [0.40], None),
    (TrialState.COMPLETE, {"model": "cnn-batchnorm", "lr": 0.01, "batch_size": 128}, [0.83, 0.88, 0.905], 0.899),
    (TrialState.FAIL, {"model": "cnn-batchnorm", "lr": 0.05, "batch_size": 64}, [], None),
    (TrialState.COMPLETE, {"model": "cnn", "lr": 0.002, "batch_size": 128}, [0.78, 0.84, 0.86], 0.85),
    (TrialState.COMPLETE, {"model": "cnn-batchnorm", "lr": 0.02, "batch_size": 64}, [0.82, 0.87, 0.89], 0.88),
    (TrialState.PRUNED, {"model": "cnn", "lr": 0.001, "batch_size": 64}, [0.70, 0.75], None),
]


def _study(home: Path, name: str, trials: list[Trial]) -> StudyResult:
    """Study ``name`` in ``<home>/studies/<name>.db`` with ``trials``, read back as ``distml tune show`` reads it."""
    storage = home / "studies" / f"{name}.db"
    storage.parent.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(study_name=name, storage=f"sqlite:///{storage}", direction="maximize")
    study.set_user_attr("metric", "val_accuracy")
    study.set_user_attr("direction", "maximize")
    for number, (state, params, values, test) in enumerate(trials):
        attrs = {"run_dir": str(home / "runs" / f"{name}-t{number:03d}"), "epochs_used": len(values), "resumed": False}
        attrs.update({"seconds": 10.0 * len(values) + 0.4, "val_accuracy": values[-1] if values else None})
        attrs.update({"test_accuracy": test, "mlflow_run_id": None})
        frozen = create_trial(
            state=state,
            value=values[-1] if state == TrialState.COMPLETE else None,
            params=params,
            distributions={k: SPACE[k] for k in params},
            intermediate_values=dict(enumerate(values, start=1)),
            user_attrs=attrs,
        )
        study.add_trial(frozen)
    return load_study_result(Workspace(home), name)


def _png_size(path: Path) -> tuple[int, int]:
    """(width, height) of a PNG, checking its signature and header chunk."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", path
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_the_trial_table_marks_the_best_and_says_test_accuracy_is_not_used(tmp_path: Path) -> None:
    result = _study(tmp_path, "s", TRIALS)
    lines = trial_table(result).splitlines()
    assert lines[0].split() == ["#", "STATE", "VAL", "ACC", "EPOCHS", "TIME", "TEST", "ACC*", "PARAMS"]
    marks = {int(line[1:].split()[0]): line[0] for line in lines[1:8]}
    assert marks == {n: "*" if n == 2 else " " for n in range(7)}  # the best val_accuracy, 90.50%
    rows = {n: line[1:] for n, line in zip(range(7), lines[1:8], strict=True)}
    assert rows[2].split()[1:7] == ["COMPLETE", "90.50%", "3", "30s", "89.90%", "batch_size=128"]
    assert rows[1].split()[1:6] == ["PRUNED", "40.00%", "1", "10s", "-"]  # a pruned trial: its last value
    assert rows[3].split()[1:3] == ["FAIL", "-"]
    assert rows[0].endswith("batch_size=64 lr=0.00316 model=cnn")  # params compactly, sorted
    assert lines[8] == "* best: trial 2, val_accuracy 90.50%"
    assert lines[9] == f"TEST ACC*: measured on the test split, {NOT_USED}"


def test_the_report_writes_the_plots_and_a_summary_atomically(tmp_path: Path) -> None:
    result = _study(tmp_path, "s", TRIALS)
    files = write_report(result)
    folder = tmp_path / "studies" / "s-report"
    assert files == [folder / "history.png", folder / "importance.png", folder / "report.md"]
    for png in files[:2]:
        width, height = _png_size(png)
        assert width >= 400 and height >= 150
    assert sorted(p.name for p in folder.iterdir()) == ["history.png", "importance.png", "report.md"]  # no temp files
    report = (folder / "report.md").read_text()
    assert "Trial 2: val_accuracy 90.50% after 3 epochs" in report
    assert f"Test accuracy 89.90% ({NOT_USED})" in report
    assert "- trials: 7 (4 complete, 2 pruned, 1 fail)" in report and "- epochs spent: 15" in report
    assert trial_table(result) in report
    importance = report.split("## Parameter importance")[1]
    assert {line.split("`")[1] for line in importance.strip().splitlines()} == {"model", "lr", "batch_size"}

    again = write_report(result, tmp_path / "elsewhere")  # another folder when asked; rewriting is fine
    assert [f.parent for f in again] == [tmp_path / "elsewhere"] * 3


def test_too_few_complete_trials_for_importance_is_said_not_failed(tmp_path: Path) -> None:
    result = _study(tmp_path, "few", TRIALS[:4])  # two complete, one pruned, one failed
    files = write_report(result)
    assert [f.name for f in files] == ["history.png", "report.md"]
    _png_size(files[0])
    report = files[1].read_text()
    assert "No importance plot: too few complete trials for parameter importance: 2, it needs 4" in report


def test_a_study_with_no_complete_trial_shows_its_best_pruned_one_or_none(tmp_path: Path) -> None:
    result = _study(tmp_path, "pruned", [TRIALS[1], TRIALS[3], TRIALS[6]])
    assert trial_table(result).splitlines()[-2] == "* best: trial 2 (pruned: no trial completed), val_accuracy 75.00%"
    files = write_report(result)
    assert "Trial 2 (stopped early: no trial completed): val_accuracy 75.00% after 2 epochs" in files[-1].read_text()

    result = _study(tmp_path, "failed", [TRIALS[3]])
    assert result.best is None
    assert "no trial has reported a value yet: no best" in trial_table(result)
    assert "No trial has reported a value: there is no best." in write_report(result)[-1].read_text()


@pytest.mark.parametrize("gone", ["deleted", "never in this store"])
def test_a_report_whose_study_run_is_gone_is_written_and_says_so_in_one_line(
    home: Path, capsys: pytest.CaptureFixture[str], gone: str
) -> None:
    from mlflow.tracking import MlflowClient

    from distml import tracking
    from distml.search.tracking import run_file

    result = _study(home, "s", TRIALS)
    uri = tracking.tracking_uri(home)
    client = MlflowClient(tracking_uri=uri)
    run_id = "0" * 32
    if gone == "deleted":
        run_id = client.create_run(tracking.ensure_experiment(home, "distml-x", client)).info.run_id
        client.delete_run(run_id)
    run_file(home / "studies", "s").write_text(json.dumps({"uri": uri, "run_id": run_id}) + "\n")
    files = write_report(result)  # before the fix: MLflow's exception, and a traceback from `distml tune show`
    assert [f.name for f in files] == ["history.png", "importance.png", "report.md"]
    assert all(f.is_file() for f in files)
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"note: study s's MLflow run {run_id} is gone from {uri}; the report is only in {files[0].parent}"


def test_a_study_is_one_parent_run_with_each_trials_training_run_as_its_child(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking import MlflowClient

    from distml.search.tracking import finish_study_run, start_study_run, trial_env
    from distml.train.launch import train

    files = make_mnist(tmp_path / "src", n_train=48, n_test=16)
    ingest(
        FashionMnistSource(home / "downloads", location=str(files.folder), spec=files.spec),
        store=DatasetStore(Workspace(home)),
        name="tiny",
    )
    config = DistmlConfig.model_validate({"train": {"dataset": "tiny"}, "search": {"trials": 2, "seed": 3}})
    parent = start_study_run(home, "s", config)
    client = MlflowClient(tracking_uri=f"sqlite:///{home.resolve() / 'mlflow.db'}")
    run = client.get_run(parent)
    assert client.get_experiment(run.info.experiment_id).name == "distml-tiny"  # where the trials' runs go
    assert run.info.status == "RUNNING" and run.data.tags["distml.study"] == "s"
    assert run.data.params["seed"] == "3" and run.data.params["pruner"] == "asha"
    assert json.loads(run.data.params["space.model"]) == list(config.search.space["model"])  # type: ignore[arg-type]
    assert run.data.tags["distml.search.trials"] == "2"

    for name, value in trial_env(parent, 1, "s").items():  # as the tuner starts trial 1's process
        monkeypatch.setenv(name, value)
    trial = TrainConfig.model_validate(
        {
            "dataset": "tiny",
            "model": "cnn",
            "epochs": 1,
            "batch_size": 16,
            "lr": 0.0123,
            "workers": 1,
            "log_every_steps": 1000,
        }
    )
    child_id = train(trial, Workspace(home), "s-t001").metrics["mlflow_run_id"]
    assert child_id is not None and child_id != parent
    child = client.get_run(child_id)
    assert child.info.experiment_id == run.info.experiment_id
    assert child.data.tags["mlflow.parentRunId"] == parent
    assert (child.data.tags["distml.trial"], child.data.tags["distml.study"]) == ("1", "s")
    assert child.data.params["lr"] == "0.0123" and child.data.params["model"] == "cnn"  # the trial's params
    assert [m.step for m in client.get_metric_history(child_id, "val_accuracy")] == [1]  # per-epoch metrics

    result = _study(home, "s", TRIALS)
    finish_study_run(home, parent, result)
    run = client.get_run(parent)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["best_val_accuracy"] == pytest.approx(0.905)
    assert run.data.metrics["trials_pruned"] == 2 and run.data.metrics["epochs_spent"] == 15
    assert run.data.tags["distml.best_trial"] == "2" and run.data.tags["best.model"] == "cnn-batchnorm"
    write_report(result)
    assert sorted(a.path for a in client.list_artifacts(parent, "report")) == [
        "report/history.png",
        "report/importance.png",
        "report/report.md",
    ]

    # Continuing the study (more trials, another sampler) reopens the same run; a param that changed becomes a tag.
    more = config.model_copy(update={"search": config.search.model_copy(update={"trials": 4, "sampler": "random"})})
    assert start_study_run(home, "s", more) == parent
    run = client.get_run(parent)
    assert run.info.status == "RUNNING" and run.data.params["sampler"] == "tpe"
    assert run.data.tags["distml.search.sampler"] == "random" and run.data.tags["distml.search.trials"] == "4"
    assert len(client.search_runs([run.info.experiment_id])) == 2  # the study's run and its one trial's

    client.delete_run(parent)  # someone deleted it in the UI: the study gets a new run, not a deleted one
    assert start_study_run(home, "s", more) not in (parent, None)
