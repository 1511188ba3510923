"""``distml run --search``: the search step in the real pipeline (torchrun trials, Optuna on SQLite, MLflow).

One small study (a tiny image folder, ``cnn``, 1 epoch, 2 trials) is taken through the pipeline's life: a cold
run registers a champion from a trial and the record says so; a warm rerun is a hit; more --trials continues the
study and runs only the new trial; --refit retrains the chosen trial on all of train and registers that.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import pipeline_config, run_cli, run_cli_fresh, step_decisions
from distml.pipeline.cache import Entry, KeyParts
from distml.pipeline.search_step import explain_trials, study_name
from distml.pipeline.shape import search_shape
from distml.search.trials import trial_run_name

FAST = ["--epochs", "1", "--workers", "1"]


SEARCH = """
[search]
pruner = "none"

[search.space]
model = ["cnn"]
lr = { low = 1e-3, high = 1e-2, log = true }
"""


def _config(tmp_path: Path, images: Path) -> Path:
    """The pipeline tests' image-folder config with a small search: one model, a log range of lr, no pruner."""
    return pipeline_config(tmp_path, images, SEARCH)


def _run(home: Path, config: Path, *args: str) -> tuple[str, dict[str, str], dict[str, Any]]:
    """Run the pipeline; its output, each step's decision line and the run record."""
    result = run_cli("--home", home, "run", "--config", config, *args)
    assert result.code == 0, result.out + result.err
    decisions = step_decisions(result.out)
    # "pipeline run ID: ..." names the record (ids sort by the second only, and two runs may share one)
    run_id = next(ln for ln in result.out.splitlines() if ln.startswith("pipeline run ")).split()[2].rstrip(":")
    return result.out, decisions, json.loads((home / "pipeline" / "runs" / run_id / "run.json").read_text())


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.timeout(900)  # four 1-epoch trainings and their exports: about two minutes on a quiet 2-core machine
def test_search_registers_a_trial_continues_the_study_and_refits(home: Path, tmp_path: Path, images: Path) -> None:
    config = _config(tmp_path, images)

    # Cold: the search step replaces the candidates; the champion is the trial select chose on validation.
    out, cold, record = _run(home, config, "--search", "--trials", "2", *FAST)
    assert list(cold) == ["ingest", "search", "select", "register"], cold
    assert all(d.startswith("ran: no earlier run") for d in cold.values()), cold
    assert record["dag"] == {"ingest": [], "search": ["ingest"], "select": ["search"], "register": ["select"]}
    lineage = record["lineage"]
    search, selected = lineage["search"], lineage["selected"]
    study = search["study"]
    assert search["trials"] == 2 and search["states"] == {"COMPLETE": 2} and search["ran"] == 2
    assert set(search["best"]["params"]) == {"model", "lr"} and isinstance(search["best"]["value"], float)
    assert selected["metric"] == "val_accuracy" and selected["trial"] in (0, 1)
    assert selected["run"] == trial_run_name(study, selected["trial"])
    # The same rule as select_runs on validation: no complete trial beats the one chosen.
    table = record["steps"]["search"]["outputs"]["table"]
    assert selected["value"] == pytest.approx(max(t["value"] for t in table))
    # The study's report (as 'distml tune show' writes it) beside the study: the history plot and report.md.
    report = [Path(f) for f in record["steps"]["search"]["outputs"]["report"]]
    assert {f.name for f in report} >= {"history.png", "report.md"} and all(f.is_file() for f in report)
    assert lineage["validation"]["fraction"] == 0.1 and lineage["validation"]["images"] > 0
    winner_onnx = home / "runs" / selected["run"] / "model" / "model.onnx"
    assert record["steps"]["register"]["outputs"]["onnx_sha256"] == _sha(winner_onnx)
    assert "is champion" in out
    shown = run_cli("--home", home, "runs", "show", "latest").out
    assert f"search    study {study}" in shown and "2 trials (2 complete)" in shown

    # Warm: every step is a verified hit, the study untouched. Run as a user runs it, in a new interpreter: a hit
    # imports neither torch, optuna nor MLflow (seconds of a warm rerun that should take about one).
    warm_args = ["--home", home, "run", "--config", config, "--search", "--trials", "2", *FAST]
    started = time.perf_counter()
    result, loaded = run_cli_fresh(tmp_path, *warm_args)
    took = time.perf_counter() - started
    assert result.code == 0, result.out + result.err
    warm = step_decisions(result.out)
    assert list(warm) == ["ingest", "search", "select", "register"], warm
    assert all(d.startswith("hit: same inputs as run ") for d in warm.values()), warm
    assert took < 15, took  # ≤ 5 s on a quiet machine; the CI box is shared
    assert loaded & {"torch", "optuna", "mlflow", "onnxruntime"} == set(), sorted(loaded)

    # More trials: the same study continues; only the new trial trains, the old runs are not touched.
    old = {n: (home / "runs" / trial_run_name(study, n) / "result.json").stat().st_mtime_ns for n in (0, 1)}
    _, grown, record = _run(home, config, "--search", "--trials", "3", *FAST)
    assert grown["ingest"].startswith("hit")
    assert grown["search"].startswith("ran: trials 2 -> 3: the study continues, 1 new trial"), grown
    assert record["lineage"]["search"]["study"] == study
    assert record["lineage"]["search"]["trials"] == 3 and record["lineage"]["search"]["ran"] == 1
    assert {n: (home / "runs" / trial_run_name(study, n) / "result.json").stat().st_mtime_ns for n in (0, 1)} == old
    assert (home / "runs" / trial_run_name(study, 2) / "result.json").is_file()
    from distml.search.tuner import load_study_result
    from distml.workspace import Workspace

    assert len(load_study_result(Workspace(home), study).trials) == 3

    # --refit: the chosen trial's settings retrain on all of train; that model is registered, and said so.
    _, refit, record = _run(home, config, "--search", "--trials", "3", "--refit", *FAST)
    assert refit["search"].startswith("hit") and refit["select"].startswith("hit"), refit
    assert refit["refit"].startswith("ran: no earlier run") and refit["register"].startswith("ran"), refit
    lineage = record["lineage"]
    r = lineage["refit"]
    assert r["refit"] is True and r["source_trial"] == lineage["selected"]["trial"]
    assert r["source_run"] == lineage["selected"]["run"] and "val_accuracy" in r["reason"]
    assert isinstance(r["test_accuracy"], float)
    run_dir = home / "runs" / r["run"]
    assert json.loads((run_dir / "job.json").read_text())["config"]["val_fraction"] == 0.0
    result = json.loads((run_dir / "result.json").read_text())
    assert result["validation"]["images"] == 0 and result["val_accuracy"] is None
    trial_cfg = json.loads((home / "runs" / r["source_run"] / "job.json").read_text())["config"]
    refit_cfg = json.loads((run_dir / "job.json").read_text())["config"]
    assert refit_cfg["lr"] == trial_cfg["lr"] and refit_cfg["epochs"] == trial_cfg["epochs"]
    assert record["steps"]["register"]["outputs"]["onnx_sha256"] == _sha(run_dir / "model" / "model.onnx")
    shown = run_cli("--home", home, "runs", "show", "latest").out
    assert f"refit     run {r['run']}: trial {r['source_trial']} retrained on all of train" in shown


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--trials", "3"], "--trials needs --search"),
        (["--refit"], "--refit needs --search"),
        (["--search", "--candidates", "cnn"], "--candidates and --search exclude each other"),
    ],
)
def test_search_options_without_search_are_one_clear_line(
    home: Path, tmp_path: Path, images: Path, args: list[str], message: str
) -> None:
    result = run_cli("--home", home, "run", "--config", _config(tmp_path, images), *args)
    assert result.code != 0 and message in result.err, result.err
    assert "Traceback" not in result.err and not (home / "pipeline" / "runs").exists()


def test_a_search_without_a_validation_split_is_refused_before_anything_runs(
    home: Path, tmp_path: Path, images: Path
) -> None:
    config = _config(tmp_path, images)
    config.write_text(config.read_text().replace("log_every_steps = 1000", "log_every_steps = 1000\nval_fraction = 0"))
    result = run_cli("--home", home, "run", "--config", config, "--search")
    assert result.code != 0 and "val_fraction is 0: a search chooses on the validation split" in result.err
    assert len(result.err.strip().splitlines()) <= 2 and not (home / "pipeline" / "runs").exists()


def test_the_search_shape_and_its_refit() -> None:
    assert search_shape().needs() == {"ingest": [], "search": ["ingest"], "select": ["search"], "register": ["select"]}
    assert search_shape(refit=True).needs() == {
        "ingest": [],
        "search": ["ingest"],
        "select": ["search"],
        "refit": ["ingest", "select"],
        "register": ["refit"],
    }


def test_the_study_is_named_without_the_trial_count_and_a_longer_study_says_so() -> None:
    def parts(trials: int, seed: int = 0, budget: float | None = None) -> KeyParts:
        params = {"seed": seed, "trials": trials, "budget_minutes": budget}
        return KeyParts("search", {"m": "c"}, params, {"dataset": "d"}, {"optuna": "5"})

    assert study_name(parts(2)) == study_name(parts(12)) != study_name(parts(2, seed=1))
    assert parts(2).key != parts(12).key  # the step itself re-runs for more trials
    done = Entry("search", parts(8).key, parts(8).to_json(), {"trials": 8}, {}, "run-1", 1.0)
    assert explain_trials(parts(12), [done]) == "trials 8 -> 12: the study continues, 4 new trials"
    assert explain_trials(parts(8, seed=1), [done]) is None  # another study: the usual explanation
    assert "none new" in (explain_trials(parts(6), [done]) or "")
    # The budget, like the trial count, is how far to take the study: a larger one continues the same study.
    assert study_name(parts(16, budget=28)) == study_name(parts(16, budget=40)) == study_name(parts(2))
    assert parts(16, budget=28).key != parts(16, budget=40).key
    was = parts(16, budget=28)
    cut = Entry("search", was.key, was.to_json(), {"trials": 2, "states": {"COMPLETE": 1, "STOPPED": 1}}, {}, "r", 1.0)
    assert explain_trials(parts(16, budget=40), [cut]) == (
        "budget 28 min -> 40 min: the study continues, 14 new trials, 1 stopped by the budget resumes"
    )
    assert explain_trials(parts(20, budget=None), [cut]) == (
        "trials 16 -> 20, budget 28 min -> none: the study continues, 18 new trials, 1 stopped by the budget resumes"
    )


def test_the_search_key_covers_what_defines_the_study() -> None:
    from distml.config import load_config
    from distml.pipeline.search_step import search_params

    def name_and_key(**search: object) -> tuple[str, str]:
        config = load_config(overrides={f"search.{k}": v for k, v in search.items()})
        parts = KeyParts("search", {}, search_params(config, config.train), {"dataset": "d"}, {})
        return study_name(parts), parts.key

    base = name_and_key()
    # A trial's epochs and the enqueued trials define the study: another value is another study.
    for other in (name_and_key(epochs=3), name_and_key(enqueue=[{"model": "cnn-batchnorm"}])):
        assert other[0] != base[0] and other[1] != base[1]
    # The trial count and the budget re-run the step on the same study.
    for more in (name_and_key(trials=17), name_and_key(budget_minutes=28.0)):
        assert more[0] == base[0] and more[1] != base[1]


def test_a_hit_on_a_study_the_budget_stopped_says_so(tmp_path: Path) -> None:
    """The real runner and cache, with a search step that only returns what a budget-cut study's step does."""
    from distml.pipeline.record import describe
    from distml.pipeline.runner import Runner, Step
    from distml.pipeline.search_step import explain_hit
    from distml.pipeline.steps import StepResult

    states = {"COMPLETE": 1, "STOPPED": 1}
    outputs = {"study": "s", "storage": "s.db", "trials": 2, "asked": 16, "states": states}
    outputs |= {"budget_minutes": 28.0, "budget_stopped": True}

    def run(ctx: object) -> StepResult:
        return StepResult(dict(outputs))

    code = ("distml.pipeline.cache",)
    step = Step("search", (), code, (), {"trials": 16}, inputs=lambda o, f: {}, run=run, explain_hit=explain_hit)
    said = []
    for _ in range(2):
        out = io.StringIO()
        runner = Runner([step], home=tmp_path, config={}, stream=out)
        assert runner.execute()["search"].status == "done", out.getvalue()
        said.append(step_decisions(out.getvalue())["search"])
    assert said[0] == "ran: no earlier run of this step"
    assert said[1].startswith("hit: same inputs as run ") and said[1].endswith(
        "; the 28-minute budget stopped the study after 2 of 16 trials (raise --budget-minutes or --trials to continue)"
    )
    assert explain_hit({**outputs, "budget_stopped": False}) is None  # a study that ran its trials: a plain hit
    # 'distml runs show' says it too, under the study's line.
    why = "stopped by its 28-minute budget after 2 of 16 trials (raise --budget-minutes or --trials to continue)"
    assert f"            {why}" in describe(runner.record)


def test_force_starts_the_study_over_and_leaves_other_runs(home: Path) -> None:
    from distml.search.study import start_over, storage_path

    study = "pl-search-0123456789"
    storage = storage_path(home, study)
    storage.parent.mkdir(parents=True)
    storage.write_bytes(b"sqlite")
    for run in (trial_run_name(study, 0), trial_run_name(study, 1), "pl-search-9999999999-t000", "pl-cnn-0123456789"):
        (home / "runs" / run).mkdir(parents=True)
    said: list[str] = []
    start_over(home, study, said.append)
    assert not storage.exists()
    assert sorted(p.name for p in (home / "runs").iterdir()) == ["pl-cnn-0123456789", "pl-search-9999999999-t000"]
    assert said == [f"starting study {study} over: deleted {storage.name} and 2 trial run(s)"]
