"""distml tune: the space's checks, the study's storage and lock, pruning, failures, budget, kill-and-resume.

Trials are real training jobs (``cnn``, 1-3 epochs on a tiny generated dataset). The dataset here is learnable
(each class lights its own band of rows), so a trial with a good learning rate is clearly ahead of one that
cannot learn, and the pruner has something to judge.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from wsgiref.simple_server import WSGIRequestHandler, make_server

import numpy as np
import optuna
import pytest

from conftest import MNIST_NAMES, idx_bytes, run_cli
from distml.config import load_config
from distml.data import DatasetStore
from distml.data.ingest import ingest
from distml.data.reader import open_path
from distml.data.sources import FashionMnistSource, IdxSpec, MnistLikeSpec
from distml.errors import ConfigError
from distml.search.study import lock_study, open_study, storage_path, storage_url
from distml.search.tuner import StudyResult, load_study_result, tune
from distml.workspace import Workspace

# Settings every trial here shares: one worker, tiny batches, SGD (whose lr 1e12 makes the loss NaN).
TRAIN = {"dataset": "bands", "model": "cnn", "workers": 1, "epochs": 2, "batch_size": 32, "optimizer": "sgd",
         "lr": 0.05, "schedule": "constant", "log_every_steps": 1000}  # fmt: skip


def _bands(folder: Path, n_train: int = 320, n_test: int = 64) -> MnistLikeSpec:
    """Fashion-MNIST-format files where class c is noise plus a bright band at rows 2c+4 to 2c+6."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        images = rng.integers(0, 60, (n, 28, 28), dtype=np.uint8)
        for i, c in enumerate(labels):
            images[i, 2 * c + 4 : 2 * c + 6, :] = 255
        arrays[split, 3], arrays[split, 1] = images, labels
    specs = []
    for (split, ndim), name in MNIST_NAMES.items():
        content = idx_bytes(arrays[split, ndim])
        gz = gzip.compress(content, mtime=0)
        (folder / name).write_bytes(gz)
        specs.append(IdxSpec(name, hashlib.sha256(content).hexdigest(), hashlib.md5(gz).hexdigest(), split, ndim))
    return MnistLikeSpec(files=tuple(specs), class_names=tuple(f"class{i}" for i in range(10)))


def _ingest(home: Path, tmp: Path) -> Path:
    spec = _bands(tmp / "bands-src")
    src = FashionMnistSource(home / "downloads", location=str(tmp / "bands-src"), spec=spec)
    ingest(src, store=DatasetStore(Workspace(home)), name="bands")
    return home


@pytest.fixture
def bands_home(home: Path, tmp_path: Path) -> Path:
    return _ingest(home, tmp_path)


def _toml(path: Path, space: str, train: dict[str, object] | None = None, search: str = "") -> Path:
    """A distml.toml with [train] (TRAIN, updated) and a [search] space given as TOML lines."""
    lines = ["[train]"] + [f"{k} = {json.dumps(v)}" for k, v in {**TRAIN, **(train or {})}.items()]
    lines += ["[search]", search, "[search.space]", space]
    path.write_text("\n".join(lines) + "\n")
    return path


# -- the space's checks: one line each, before anything starts ----------------------------------------------------


@pytest.mark.parametrize(
    ("space", "needle"),
    [
        ("weight_decy = [0.01]", "weight_decy: not a searchable [train] setting (did you mean 'weight_decay'?)"),
        ("lr_ = [0.01]", "did you mean 'lr'?"),
        ('model = ["cnn", "resnet-smal"]', "unknown model 'resnet-smal' (did you mean 'resnet-small'?)"),
        ("batch_size = []", "batch_size: the list of choices is empty"),
        ("lr = { low = 0.1, high = 0.001 }", "lr: the range is inverted (low 0.1 > high 0.001)"),
        ("weight_decay = { low = 0, high = 0.1, log = true }", "a log range needs low > 0"),
        ('batch_size = [32, "big"]', "'big' is not a valid batch_size"),
        ('schedule = ["cosine", "cosin"]', "'cosin' is not a valid schedule"),
        ("model = { low = 1, high = 2 }", "a range needs a numeric setting"),
        ("workers = [1, 2]", "workers: not a searchable [train] setting"),
    ],
)
def test_a_bad_space_is_one_line_naming_the_nearest(tmp_path: Path, space: str, needle: str) -> None:
    config = _toml(tmp_path / "distml.toml", space)
    with pytest.raises(ConfigError) as err:
        load_config(config)
    assert needle in str(err.value) and "\n" not in str(err.value)
    result = run_cli("--home", tmp_path / "home", "--config", config, "tune")
    assert result.code == 2 and needle in result.err and "Traceback" not in result.err


def test_trials_zero_grid_with_a_range_and_no_validation_are_usage_errors(bands_home: Path, tmp_path: Path) -> None:
    config = _toml(tmp_path / "distml.toml", "lr = [0.01, 0.05]")
    zero = run_cli("--home", bands_home, "--config", config, "tune", "--trials", "0")
    assert zero.code == 2 and "trials=0" in zero.err and "greater than or equal to 1" in zero.err
    ranged = _toml(tmp_path / "ranged.toml", "lr = { low = 0.01, high = 0.1 }")
    grid = run_cli("--home", bands_home, "--config", ranged, "tune", "--sampler", "grid")
    assert grid.code == 2 and "grid sampler needs a list of choices" in grid.err and "lr is a range" in grid.err
    no_val = _toml(tmp_path / "noval.toml", "lr = [0.01]", {"val_fraction": 0})
    refused = run_cli("--home", bands_home, "--config", no_val, "tune")
    assert refused.code == 2 and "val_fraction is 0" in refused.err
    assert not (bands_home / "runs").exists()  # nothing started


def test_a_study_from_another_space_is_refused_and_a_second_tuner_is_locked_out(
    bands_home: Path, tmp_path: Path
) -> None:
    first = load_config(_toml(tmp_path / "a.toml", "lr = [0.01, 0.05]"), overrides={"workspace.home": bands_home})
    other = load_config(_toml(tmp_path / "b.toml", "lr = [0.01, 0.1]"), overrides={"workspace.home": bands_home})
    from distml.search.space import space_document, space_sha256

    doc = space_document(first.search.space, "val_accuracy", "tpe", first.train)
    digest = open_path(DatasetStore(Workspace(bands_home)).resolve("bands")).digest
    open_study(storage_path(bands_home, "s"), "s", first.search, doc, space_sha256(doc), digest, 2)
    with pytest.raises(ConfigError, match="made for another search space") as err:
        tune(other, Workspace(bands_home), study="s", stream=io.StringIO())
    assert "differs in space.lr" in str(err.value) and "--study NEW" in (err.value.hint or "")
    assert str(storage_path(bands_home, "s")) in (err.value.hint or "")

    lock = lock_study(bands_home, "s")  # as a running tuner holds it
    try:
        held = run_cli("--home", bands_home, "--config", tmp_path / "a.toml", "tune", "--study", "s")
    finally:
        lock.release()
    assert held.code == 2 and f"study s is being tuned by another distml tune (process {os.getpid()})" in held.err
    assert not (bands_home / "runs").exists()


def test_optuna_dashboard_opens_the_study_file(tmp_path: Path) -> None:
    """The storage is Optuna's own: optuna-dashboard's app lists the study and its trial over real HTTP."""
    import optuna_dashboard

    path = tmp_path / "studies" / "dash.db"
    path.parent.mkdir()
    study = optuna.create_study(study_name="dash", storage=storage_url(path), direction="maximize")
    study.tell(study.ask({"lr": optuna.distributions.FloatDistribution(1e-3, 1e-1, log=True)}), 0.5)
    app = optuna_dashboard.wsgi(storage_url(path))

    class Quiet(WSGIRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

    server = make_server("127.0.0.1", 0, app, handler_class=Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        with urllib.request.urlopen(f"{base}/api/studies", timeout=30) as resp:
            studies = json.loads(resp.read())["study_summaries"]
        assert [s["study_name"] for s in studies] == ["dash"]
        with urllib.request.urlopen(f"{base}/api/studies/{studies[0]['study_id']}", timeout=30) as resp:
            detail = json.loads(resp.read())
        assert len(detail["trials"]) == 1 and detail["trials"][0]["state"] == "Complete"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


# -- real trials ----------------------------------------------------------------------------------------------------


def test_a_lagging_trial_is_pruned_and_a_crashing_one_fails_while_the_study_goes_on(
    bands_home: Path, tmp_path: Path
) -> None:
    """Grid over lr (seed 5 orders it good, hopeless, NaN): ASHA stops the hopeless one after its first epoch."""
    config = _toml(tmp_path / "distml.toml", "lr = [0.05, 1e-9, 1e12]", search='sampler = "grid"\nseed = 5')
    out = io.StringIO()
    result = tune(load_config(config, overrides={"workspace.home": bands_home}), Workspace(bands_home),
                  study="prune", stream=out, poll_s=0.2)  # fmt: skip
    log = out.getvalue()
    trials = {t["params"]["lr"]: t for t in result.trials}
    good, hopeless, nan = trials[0.05], trials[1e-9], trials[1e12]
    assert [t["number"] for t in (good, hopeless, nan)] == [0, 1, 2], log
    assert good["state"] == "COMPLETE" and good["epochs_used"] == 2 and (good["value"] or 0) > 0.5, log
    assert hopeless["state"] == "PRUNED" and hopeless["epochs_used"] == 1 < TRAIN["epochs"], log
    assert (hopeless["value"] or 0) < (good["value"] or 0)
    assert nan["state"] == "FAIL" and result.ran == 3 and result.best == good
    assert "trial 1 pruned at epoch 1" in log and "trial 2 failed: " in log and "loss is" in log
    # what the contract promises each trial records
    stored = optuna.load_study(study_name="prune", storage=storage_url(result.storage))
    attrs = stored.trials[0].user_attrs
    assert attrs["run_dir"] == str(bands_home / "runs" / "prune-t000") and attrs["resumed"] is False
    assert attrs["epochs_used"] == 2 and attrs["val_accuracy"] == good["value"] and attrs["seconds"] > 0
    assert 0 <= attrs["test_accuracy"] <= 1 and attrs["mlflow_run_id"]
    assert stored.user_attrs["metric"] == "val_accuracy" and len(stored.user_attrs["space_sha256"]) == 64
    assert set(stored.trials[0].params) == {"lr"}
    assert json.loads((bands_home / "runs" / "prune-t000" / "result.json").read_text())["val_accuracy"] > 0.5
    shown = run_cli("--home", bands_home, "tune", "show", "prune")
    assert shown.code == 0 and "PRUNED" in shown.out and "FAIL" in shown.out and "best: trial 0" in shown.out


def test_every_trial_failing_is_an_error_and_a_budget_below_one_epoch_says_so(bands_home: Path, tmp_path: Path) -> None:
    config = _toml(tmp_path / "distml.toml", "lr = [1e12]", {"epochs": 1})
    failed = run_cli("--home", bands_home, "--config", config, "tune", "--study", "nan", "--trials", "1")
    assert failed.code == 1 and "every trial of study nan failed: trial 0: " in failed.err and "loss is" in failed.err
    assert "trial 0 failed" in failed.out
    assert [t["state"] for t in load_study_result(Workspace(bands_home), "nan").trials] == ["FAIL"]

    quick = _toml(tmp_path / "quick.toml", "lr = [0.05]")
    started = time.monotonic()
    cut = run_cli("--home", bands_home, "--config", quick, "tune", "--study", "quick", "--budget-minutes", "0.01")
    assert cut.code == 1 and "--budget-minutes 0.01 is too small for one epoch" in cut.err, cut.out + cut.err
    assert "trial 0 stopped at the 0.01-minute budget after 0 epoch(s)" in cut.out
    assert time.monotonic() - started < 60  # stopped, not trained to the end
    stored = load_study_result(Workspace(bands_home), "quick")
    assert [(t["state"], t["value"]) for t in stored.trials] == [("STOPPED", None)] and stored.best is None


def _tune_args(home: Path, config: Path, trials: int) -> list[str]:
    return ["--home", str(home), "--config", str(config), "tune", "--study", "s", "--trials", str(trials),
            "--sampler", "random", "--pruner", "none", "--seed", "3", "--max-concurrent", "1"]  # fmt: skip


def _wait_for(what: str, check: Callable[[], bool], timeout_s: float = 480) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _epochs(run_dir: Path) -> int:
    try:
        return len(json.loads((run_dir / "history.json").read_text()))
    except (OSError, ValueError):
        return 0


@pytest.mark.timeout(900)  # five trial jobs: minutes on a busy machine
def test_sigkill_mid_trial_then_the_same_command_resumes_it_and_the_study_is_deterministic(
    bands_home: Path, tmp_path: Path
) -> None:
    """Kill -9 the tuner in trial 1's last epoch; rerun: trial 0 kept, trial 1 resumed from its checkpoint.

    A second workspace runs the same study uninterrupted, first with --trials 1 and then grown to 2: the same
    params and the same validation values (resume is exact, the sampler is seeded per trial).
    """
    from distml.train.runlock import lock_file

    # Batch 16 (20 steps an epoch, not 10): epoch 2 must outlast the poll that sees epoch 1 and the SIGSTOP below.
    # Once rank 0 no longer logged to MLflow at each epoch's end, a 10-step epoch 2 sometimes ended first on CI.
    config = _toml(tmp_path / "distml.toml", "lr = { low = 0.01, high = 0.1, log = true }", {"batch_size": 16})
    space_run = bands_home / "runs" / "s-t001"
    frozen: list[int] = []
    log = (tmp_path / "tuner.log").open("wb")
    tuner = subprocess.Popen([sys.executable, "-m", "distml", *_tune_args(bands_home, config, 2)],
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        _wait_for("trial 0 to start", lambda: (bands_home / "runs" / "s-t000").is_dir() or tuner.poll() is not None)
        second = run_cli(*_tune_args(bands_home, config, 2))  # while the first one runs
        assert second.code == 2 and f"study s is being tuned by another distml tune (process {tuner.pid})" in second.err
        _wait_for("trial 1's first epoch", lambda: _epochs(space_run) >= 1 or tuner.poll() is not None)
        job_pid = int(lock_file(space_run).read_text().split()[0])
        # The trial's worker is held still (SIGSTOP) from here until the tuner's death has reached it, so the kill
        # lands inside epoch 2 however loaded the machine is: an epoch of this data is shorter than the signal's
        # way from the tuner through the job process to the worker can be on a busy 2-core machine.
        frozen = _children(job_pid)
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        os.kill(tuner.pid, signal.SIGKILL)
        assert _epochs(space_run) < TRAIN["epochs"], "trial 1 ended before the kill: the test needs longer epochs"
        tuner.wait(timeout=30)
        _wait_for("the stop to reach the held worker", lambda: all(_term_pending(p) for p in frozen), timeout_s=60)
    finally:
        for pid in frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)  # it dies of the pending SIGTERM before running another line
        if tuner.poll() is None:
            tuner.kill()
            tuner.wait(timeout=30)
        log.close()
    _wait_for("the trial's job to die with its tuner", lambda: not _alive(job_pid), timeout_s=60)
    stored = load_study_result(Workspace(bands_home), "s")
    assert [t["state"] for t in stored.trials] == ["COMPLETE", "RUNNING"]
    killed_at = _epochs(space_run)

    resumed = run_cli(*_tune_args(bands_home, config, 2))
    assert resumed.code == 0, resumed.out + resumed.err
    assert "1 trial(s) done, 1 interrupted, 0 new to run" in resumed.out
    assert "resuming trial 1 from its checkpoint" in resumed.out and "trial 0 started" not in resumed.out
    after = load_study_result(Workspace(bands_home), "s")
    assert [(t["state"], t["epochs_used"]) for t in after.trials] == [("COMPLETE", 2), ("COMPLETE", 2)]
    history = json.loads((space_run / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2] and killed_at == 1
    stored_trial = optuna.load_study(study_name="s", storage=storage_url(after.storage)).trials[1]
    assert stored_trial.user_attrs["resumed"] is True and sorted(stored_trial.intermediate_values) == [1, 2]

    other = _ingest(tmp_path / "other", tmp_path / "other-src")
    first = run_cli(*_tune_args(other, config, 1))
    assert first.code == 0 and "0 trial(s) done, 0 interrupted, 1 new to run" in first.out
    grown = run_cli(*_tune_args(other, config, 2))
    assert grown.code == 0 and "1 trial(s) done, 0 interrupted, 1 new to run" in grown.out
    assert "trial 1 started" in grown.out and "trial 0 started" not in grown.out
    uninterrupted = load_study_result(Workspace(other), "s")
    same = [(t["params"], t["value"]) for t in after.trials]
    assert [(t["params"], t["value"]) for t in uninterrupted.trials] == same
    for run in ("s-t000", "s-t001"):  # the losses too, to the bit: the accuracy alone is 100% on this easy data
        losses = [[r["val_loss"] for r in json.loads((h / "runs" / run / "history.json").read_text())]
                  for h in (bands_home, other)]  # fmt: skip
        assert losses[0] == losses[1]


def _alive(pid: int) -> bool:
    from distml._proc import pid_alive

    return pid_alive(pid)


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _term_pending(pid: int) -> bool:
    """Whether SIGTERM waits for process ``pid`` (stopped, it is delivered on SIGCONT), or the process is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    pending = {k: int(v, 16) for k, v in (line.split(":") for line in status.splitlines()) if k in ("SigPnd", "ShdPnd")}
    return any(mask & (1 << (signal.SIGTERM - 1)) for mask in pending.values())


def test_sampling_follows_each_fields_type_and_the_fingerprint_covers_what_trials_depend_on() -> None:
    from distml.config import TrainConfig
    from distml.search.config import Range, SearchConfig
    from distml.search.space import sample, space_document, space_sha256

    space = SearchConfig(
        space={"epochs": Range(low=1, high=4), "lr": Range(low=1e-4, high=1e-1, log=True), "model": ["cnn"]}
    ).space
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    params = sample(study.ask(), space)
    assert isinstance(params["epochs"], int) and 1 <= params["epochs"] <= 4
    assert isinstance(params["lr"], float) and params["model"] == "cnn"
    dists = study.trials[0].distributions
    assert isinstance(dists["epochs"], optuna.distributions.IntDistribution)
    assert isinstance(dists["lr"], optuna.distributions.FloatDistribution) and dists["lr"].log

    base = TrainConfig()
    sha = space_sha256(space_document(space, "val_accuracy", "tpe", base))
    assert sha == space_sha256(space_document(space, "val_accuracy", "random", base.model_copy(update={"workers": 1})))
    for other in (
        space_document({**space, "model": ["cnn", "resnet"]}, "val_accuracy", "tpe", base),
        space_document(space, "val_loss", "tpe", base),
        space_document(space, "val_accuracy", "tpe", base.model_copy(update={"val_seed": 1})),
        space_document(space, "val_accuracy", "tpe", base.model_copy(update={"weight_decay": 0.1})),
    ):
        assert space_sha256(other) != sha


def test_trials_at_once_fit_the_cores_with_their_workers(tmp_path: Path) -> None:
    from distml.config import TrainConfig
    from distml.search.executor import LocalExecutor

    def fit(cores: int, workers: int, wanted: int) -> tuple[int, int]:
        executor = LocalExecutor(Workspace(tmp_path), cores=cores, gpus=0)
        return executor.capacity(TrainConfig(workers=workers), wanted), executor.threads

    assert fit(2, 1, 3) == (2, 1)  # two 1-worker trials on 2 cores, one thread each
    assert fit(2, 2, 2) == (1, 1)  # a 2-worker trial takes both cores
    assert fit(16, 2, 3) == (3, 2)  # 3 trials x 2 workers x 2 threads = 12 <= 16
    assert fit(8, 1, 1) == (1, 8)  # one trial at a time gets every core


# -- the tuner's rules, with jobs that only write their files (no training: cheap) ----------------------------------


class _Job:
    """A scripted trial job: each poll writes the next history (None while it runs), then it ends with ``code``."""

    def __init__(self, run_dir: Path, epochs: list[list[int]], code: int, slow_first_poll_s: float = 0.0) -> None:
        self.run_dir, self.epochs, self.code, self.slow_s = run_dir, epochs, code, slow_first_poll_s
        self.polls = 0

    def poll(self) -> int | None:
        if self.polls < len(self.epochs):
            history = [_record(e) for e in self.epochs[self.polls]]
            (self.run_dir / "history.json").write_text(json.dumps(history))
            self.polls += 1
            if self.polls == 1 and self.slow_s:
                time.sleep(self.slow_s)  # the budget runs out while this poll looks
            return None
        if self.code == 0:
            (self.run_dir / "result.json").write_text("{}")
        else:
            (self.run_dir / "train.log").write_text("error: loss is nan at step 1\n")
        return self.code


def _record(epoch: int) -> dict[str, float]:
    return {"epoch": epoch, "val_accuracy": 0.5 + epoch / 100, "val_loss": 1.0 / epoch, "test_accuracy": 0.5}


class _Executor:
    """A :class:`~distml.search.executor.TrialExecutor` running :class:`_Job`\\ s from ``script(trial_number)``."""

    def __init__(self, script: Callable[[int], _Job | BaseException]) -> None:
        self.script = script
        self.started: list[tuple[int, object]] = []  # (trial number, its TrainConfig)
        self.stopped: list[int] = []

    def capacity(self, base: object, wanted: int) -> int:
        return wanted

    def start(self, cfg: object, run_dir: Path, env: object) -> _Job:
        number = int(run_dir.name.rsplit("-t", 1)[1])
        self.started.append((number, cfg))
        run_dir.mkdir(parents=True, exist_ok=True)
        job = self.script(number)
        if isinstance(job, BaseException):
            raise job
        job.run_dir = run_dir
        return job

    def poll(self, job: _Job) -> int | None:
        return job.poll()

    def stop(self, job: _Job) -> None:
        self.stopped.append(int(job.run_dir.name.rsplit("-t", 1)[1]))
        job.epochs, job.polls, job.code = [], 0, 130  # a stopped job ends interrupted


def _done(epochs: int = 1) -> Callable[[int], _Job]:
    return lambda n: _Job(Path(), [list(range(1, e + 1)) for e in range(1, epochs + 1)], 0)


@pytest.fixture(scope="module")
def _template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A home with the bands dataset and an MLflow store's schema, made once: a new store takes seconds to create."""
    from distml import tracking

    home = _ingest(tmp_path_factory.mktemp("template") / "home", tmp_path_factory.mktemp("template-src"))
    tracking.mlflow_client(tracking.tracking_uri(home)).search_experiments()  # creates the schema
    return home


@pytest.fixture
def fake_home(_template: Path, tmp_path: Path) -> Path:
    """Each test's own copy of the template home (no experiment in it yet: each is made with this home's paths)."""
    home = tmp_path / "home"
    shutil.copytree(_template, home)
    return home


def _fake_tune(
    home: Path, config: Path, study: str, executor: _Executor, **overrides: object
) -> tuple[StudyResult, str]:
    out = io.StringIO()
    cfg = load_config(config, overrides={"workspace.home": home, **overrides})
    result = tune(cfg, Workspace(home), study=study, stream=out, executor=executor, poll_s=0.05)
    return result, out.getvalue()


def _parent_status(home: Path, study: str) -> tuple[str, str]:
    from distml import tracking
    from distml.search.tracking import recorded_run

    recorded = recorded_run(home / "studies", study)
    assert recorded is not None
    run = tracking.mlflow_client(recorded[0]).get_run(recorded[1])
    return recorded[1], str(run.info.status)


def test_search_epochs_and_enqueue_are_checked_with_the_space(tmp_path: Path) -> None:
    sampled = _toml(tmp_path / "sampled.toml", "epochs = [1, 2]")
    refused = run_cli("--home", tmp_path / "home", "--config", sampled, "tune", "--epochs", "3")
    assert refused.code == 2 and "[search] epochs 3 (tune --epochs) is set, but epochs is also in [search.space]" in (
        refused.err
    )
    space = 'lr = { low = 0.01, high = 0.1, step = 0.01 }\nmodel = ["cnn", "cnn-batchnorm"]'
    for enqueue, needle in (
        ("lrr = 0.05", "[[search.enqueue]] 1: lrr: not a key of [search.space] (did you mean 'lr'?)"),
        ("lr = 0.5", "lr: 0.5 is outside its range 0.01 to 0.1"),
        ("lr = 0.055", "lr: 0.055 is not on the range's steps of 0.01 from 0.01"),
        ('model = "resnet-fast"', "model: 'resnet-fast' is not one of its choices ['cnn', 'cnn-batchnorm']"),
    ):
        config = _toml(tmp_path / "e.toml", space + f"\n[[search.enqueue]]\n{enqueue}")
        with pytest.raises(ConfigError) as err:
            load_config(config)
        assert needle in str(err.value) and "\n" not in str(err.value)
    assert load_config(_toml(tmp_path / "ok.toml", space + '\n[[search.enqueue]]\nlr = 0.05\nmodel = "cnn"'))


def test_enqueued_trials_run_first_once_and_search_epochs_set_each_trials_epochs(
    fake_home: Path, tmp_path: Path
) -> None:
    space = 'lr = { low = 0.001, high = 0.1, log = true }\nmodel = ["cnn", "cnn-batchnorm"]'
    enqueue = '[[search.enqueue]]\nlr = 0.05\nmodel = "cnn-batchnorm"\n[[search.enqueue]]\nlr = 0.002'
    search = 'sampler = "random"\nepochs = 3\ntrials = 1\npruner = "none"'
    config = _toml(tmp_path / "distml.toml", f"{space}\n{enqueue}", search=search)
    executor = _Executor(_done(3))
    first, _ = _fake_tune(fake_home, config, "q", executor)
    assert [t["params"] for t in first.trials] == [{"lr": 0.05, "model": "cnn-batchnorm"}]  # room for one only
    assert [cfg.epochs for _, cfg in executor.started] == [3]  # [search] epochs, not [train] epochs (2)
    stored = optuna.load_study(study_name="q", storage=storage_url(first.storage))
    assert stored.trials[0].intermediate_values == pytest.approx({1: 0.51, 2: 0.52, 3: 0.53})
    grown, log = _fake_tune(fake_home, config, "q", executor, **{"search.trials": 3})
    assert "1 trial(s) done, 0 interrupted, 2 new to run" in log
    params = [t["params"] for t in grown.trials]
    assert params[:2] == [{"lr": 0.05, "model": "cnn-batchnorm"}, {"lr": 0.002, "model": params[1]["model"]}]
    assert params[2]["lr"] not in (0.05, 0.002) and [t["state"] for t in grown.trials] == ["COMPLETE"] * 3
    again, log = _fake_tune(fake_home, config, "q", executor, **{"search.trials": 3})
    assert len(again.trials) == 3 and "nothing to run" in log  # not enqueued a second time


def test_trial_seeds_of_neighbouring_study_seeds_are_not_shifted_copies() -> None:
    from distml.search.config import SearchConfig
    from distml.search.study import make_sampler

    def draws(seed: int, number: int) -> list[float]:
        study = optuna.create_study(sampler=make_sampler(SearchConfig(seed=seed, sampler="random"), number))
        dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
        return [float(study.ask(dist).params["x"]) for _ in range(3)]

    assert draws(0, 1) == draws(0, 1)  # reproducible
    assert draws(0, 1) != draws(1, 0) and draws(3, 5) != draws(4, 4) and draws(0, 1) != draws(0, 2)


def test_epochs_are_reported_by_their_number_once_each_in_order(fake_home: Path, tmp_path: Path) -> None:
    """A job killed between its checkpoint and its history write resumes past the missing epoch (3 here)."""
    config = _toml(tmp_path / "distml.toml", "lr = [0.05]", {"epochs": 5}, search='trials = 1\npruner = "none"')
    executor = _Executor(lambda n: _Job(Path(), [[1, 2, 4], [1, 2, 4], [2, 1, 4, 5]], 0))
    result, log = _fake_tune(fake_home, config, "ep", executor)
    stored = optuna.load_study(study_name="ep", storage=storage_url(result.storage)).trials[0]
    assert sorted(stored.intermediate_values) == [1, 2, 4, 5], log
    told = [ln.removeprefix("trial 0: ") for ln in log.splitlines() if ": epoch " in ln]
    assert told == [f"epoch {e}/5 val accuracy {50 + e}.00%" for e in (1, 2, 4, 5)]
    assert result.trials[0]["state"] == "COMPLETE" and result.trials[0]["value"] == 0.55
    assert result.trials[0]["epochs_used"] == 5


def test_a_resumed_trial_runs_with_the_config_its_job_recorded(fake_home: Path, tmp_path: Path) -> None:
    from distml.train.job import Job

    config = _toml(tmp_path / "distml.toml", "lr = [0.05]", search="trials = 1")
    executor = _Executor(lambda n: KeyboardInterrupt())  # the tuner is stopped as trial 0 starts
    with pytest.raises(KeyboardInterrupt):
        _fake_tune(fake_home, config, "r", executor)
    stored = optuna.load_study(study_name="r", storage=storage_url(storage_path(fake_home, "r")))
    assert [t.state.name for t in stored.trials] == ["RUNNING"]
    run_dir = fake_home / "runs" / "r-t000"
    ran_with = load_config(config, overrides={"workspace.home": fake_home}).train.model_copy(update={"lr": 0.05})
    Job(ran_with, run_dir, fake_home, "digest", world_size=1).write()  # as its job wrote it, with 1 worker

    executor = _Executor(_done(2))
    result, log = _fake_tune(fake_home, config, "r", executor, **{"train.workers": 2})
    assert "resuming trial 0 from the start" in log
    assert [(n, cfg.workers, cfg.lr) for n, cfg in executor.started] == [(0, 1, 0.05)]  # its own workers, not 2
    assert result.trials[0]["state"] == "COMPLETE"


def test_the_budget_settles_a_finished_trial_and_leaves_a_stopped_one_resumable(
    fake_home: Path, tmp_path: Path
) -> None:
    from distml.search.report import trial_table

    search = 'sampler = "grid"\nmax_concurrent = 2\npruner = "none"'
    config = _toml(tmp_path / "distml.toml", "lr = [0.01, 0.05]", search=search)
    # trial 0 has finished when the budget runs out (its next poll says so); trial 1 is in its second epoch
    script = {0: _Job(Path(), [[1]], 0, slow_first_poll_s=4), 1: _Job(Path(), [[1]] * 1000, 0)}
    executor = _Executor(lambda n: script[n])
    result, log = _fake_tune(fake_home, config, "b", executor, **{"search.budget_minutes": 0.05})
    states = {t["number"]: t["state"] for t in result.trials}
    assert states == {0: "COMPLETE", 1: "STOPPED"}, log
    assert executor.stopped == [1] and result.budget_stopped
    assert "trial 1 stopped at the 0.05-minute budget after 1 epoch(s); the next distml tune resumes it" in log
    table = trial_table(load_study_result(Workspace(fake_home), "b"))
    assert " 1 STOPPED " in table and "STOPPED: stopped by the budget" in table
    stored = optuna.load_study(study_name="b", storage=storage_url(result.storage)).trials[1]
    assert stored.state.name == "RUNNING" and stored.user_attrs["stopped_by"] == "budget"

    executor = _Executor(lambda n: _Job(Path(), [[1], [1, 2]], 0))
    resumed, log = _fake_tune(fake_home, config, "b", executor)
    assert "1 trial(s) done, 1 interrupted (1 stopped by the budget), 0 new to run" in log
    assert "resuming trial 1 (the budget stopped it)" in log and [n for n, _ in executor.started] == [1]
    assert [t["state"] for t in resumed.trials] == ["COMPLETE", "COMPLETE"] and not resumed.budget_stopped
    stored = optuna.load_study(study_name="b", storage=storage_url(result.storage)).trials[1]
    assert sorted(stored.intermediate_values) == [1, 2]


def test_an_interrupted_study_ends_its_mlflow_run_and_the_resumed_one_finishes_it(
    fake_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _toml(tmp_path / "distml.toml", "lr = [0.05]", search="trials = 1")
    with pytest.raises(RuntimeError):
        _fake_tune(fake_home, config, "m", _Executor(lambda n: RuntimeError("x")))
    run_id, status = _parent_status(fake_home, "m")
    assert status == "FAILED"
    with pytest.raises(KeyboardInterrupt):
        _fake_tune(fake_home, config, "m", _Executor(lambda n: KeyboardInterrupt()))
    assert _parent_status(fake_home, "m") == (run_id, "KILLED")

    class Terminated(_Job):  # the tuner gets SIGTERM while it watches the trial
        def poll(self) -> int | None:
            os.kill(os.getpid(), signal.SIGTERM)
            return None

    import distml.search.tuner

    terminated = _Executor(lambda n: Terminated(Path(), [], 0))
    monkeypatch.setattr(distml.search.tuner, "_local_executor", lambda ws: terminated)
    handler = signal.getsignal(signal.SIGTERM)
    stopped = run_cli("--home", fake_home, "--config", config, "tune", "--study", "m")
    assert stopped.code == 130 and "interrupted" in stopped.err and "Traceback" not in stopped.err
    assert signal.getsignal(signal.SIGTERM) == handler and terminated.stopped == [0]  # its job was stopped
    assert _parent_status(fake_home, "m") == (run_id, "KILLED")

    result, _ = _fake_tune(fake_home, config, "m", _Executor(_done()))
    assert result.trials[0]["state"] == "COMPLETE"
    assert _parent_status(fake_home, "m") == (run_id, "FINISHED")  # the same run, ended this time


def test_a_new_study_refuses_an_earlier_studys_leftovers_and_restart_clears_them(
    fake_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import distml.search.tuner
    from distml.search.study import start_over

    config = _toml(tmp_path / "distml.toml", "lr = [0.05]", search="trials = 1")
    runs = fake_home / "runs"
    for run in ("old-t000", "old-t001", "old-t000-t000", "old-x"):  # the last two: another study's, another run
        (runs / run).mkdir(parents=True)
    (fake_home / "studies").mkdir()
    (fake_home / "studies" / "old.mlflow.json").write_text("{}")
    refused = run_cli("--home", fake_home, "--config", config, "tune", "--study", "old")
    assert refused.code == 2 and "Traceback" not in refused.err, refused.err
    assert (
        "study old is new (no old.db), but an earlier study old left runs/old-t000 (and 1 more trial run(s)), "
        "studies/old.mlflow.json"
        in refused.err
        and "distml tune --study old --restart" in refused.err
    )
    assert not storage_path(fake_home, "old").exists()

    monkeypatch.setattr(distml.search.tuner, "_local_executor", lambda ws: _Executor(_done()))
    restarted = run_cli("--home", fake_home, "--config", config, "tune", "--study", "old", "--restart")
    assert restarted.code == 0, restarted.err
    assert "starting study old over: deleted old.mlflow.json and 2 trial run(s)" in restarted.out
    assert sorted(p.name for p in runs.iterdir()) == ["old-t000", "old-t000-t000", "old-x"]  # t000: the new trial
    said: list[str] = []
    start_over(fake_home, "old", said.append)
    assert said == ["starting study old over: deleted old.db, old.mlflow.json, old-report and 1 trial run(s)"]
    assert sorted(p.name for p in runs.iterdir()) == ["old-t000-t000", "old-x"]
    assert sorted(p.name for p in (fake_home / "studies").iterdir()) == ["old.lock"]


def test_rerunning_a_study_whose_every_trial_failed_fails_the_same_way(
    fake_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import distml.search.tuner

    config = _toml(tmp_path / "distml.toml", "lr = [0.05]", search="trials = 1")
    monkeypatch.setattr(distml.search.tuner, "_local_executor", lambda ws: _Executor(lambda n: _Job(Path(), [], 1)))
    first = run_cli("--home", fake_home, "--config", config, "tune", "--study", "f")
    again = run_cli("--home", fake_home, "--config", config, "tune", "--study", "f")
    assert first.code == again.code == 1, again.out
    errors = [[ln for ln in r.err.splitlines() if ln.startswith("error:")] for r in (first, again)]
    assert errors[0][0].startswith("error: every trial of study f failed: trial 0: loss is nan at step 1 (log ")
    assert errors[1] == errors[0] and "nothing to run" in again.out


def test_a_default_study_name_that_is_no_study_name_says_to_pass_study() -> None:
    from distml.errors import UsageError
    from distml.search.study import default_study_name

    assert default_study_name("fashion-mnist") == "fashion-mnist-search"
    with pytest.raises(UsageError) as err:
        default_study_name("my photos")
    assert "the default study name 'my photos-search' (from the dataset's name) is not allowed" in str(err.value)
    assert err.value.hint == "pass --study NAME"


def test_gpus_go_back_when_a_trial_cannot_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import distml.train.candidates
    from distml.config import TrainConfig
    from distml.search.executor import LocalExecutor

    def fail(*args: object, **kwargs: object) -> None:
        raise OSError("no such interpreter")

    monkeypatch.setattr(distml.train.candidates, "start_job", fail)
    executor = LocalExecutor(Workspace(tmp_path), cores=4, gpus=2)
    executor.capacity(TrainConfig(workers=1), 2)
    with pytest.raises(OSError, match="no such interpreter"):
        executor.start(TrainConfig(workers=2), tmp_path / "runs" / "s-t000", {})
    assert executor.free_gpus == [0, 1]
