"""``distml tune``: an Optuna ask/tell loop whose trials are ordinary distml training runs.

Trial N of study S trains in ``<home>/runs/<S>-t<NNN>`` with ``[train]`` merged with its sampled params. The
tuner reads each running trial's ``history.json`` every ``poll_s``, reports the validation metric of every new
epoch to Optuna, and stops the trial's job when the pruner says so (PRUNED, with the epochs it used). A job that
ends well is COMPLETE with its last validation value; one that crashes is FAIL with the error from its log, and
the study goes on.

Resuming: the study's lock proves that no other tuner runs it, so a trial the storage still calls RUNNING was
interrupted (the tuner was killed; its job died with it). The next call starts that trial again with the same
params in the same run folder, where training resumes from its last checkpoint; it is neither lost nor
counted twice. Each new trial's sampler is seeded by the trial's number (:func:`~distml.search.study.make_sampler`),
so the same seed with one trial at a time gives the same params whether or not the study was interrupted.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from distml.config import DistmlConfig, TrainConfig
from distml.errors import ConfigError, DistmlError, TrainingError
from distml.search.executor import TrialExecutor, TrialJob
from distml.search.result import StudyResult, TrialRecord, from_study, load_study_result
from distml.search.space import (
    Params,
    check_batches,
    enqueued_params,
    grid_size,
    max_epochs,
    sample,
    space_document,
    space_sha256,
)
from distml.search.study import check_study_name, lock_study, make_sampler, open_study, storage_path
from distml.search.trials import (
    finite,
    first_eta,
    log_error,
    metric_of,
    read_history,
    read_text,
    trial_run_dir,
    wait_for_run,
)
from distml.workspace import Workspace

if TYPE_CHECKING:
    import optuna


__all__ = ["StudyResult", "TrialRecord", "load_study_result", "trial_run_dir", "tune"]


@dataclass
class _Active:
    """A trial whose job runs now."""

    trial: optuna.Trial
    cfg: TrainConfig
    run_dir: Path
    job: TrialJob | None = None
    started: float = field(default_factory=time.monotonic)
    seconds_before: float = 0.0  # wall time of earlier attempts (a resumed trial)
    reported: int = 0  # epochs reported to Optuna so far

    @property
    def number(self) -> int:
        return int(self.trial.number)

    def seconds(self) -> float:
        return self.seconds_before + time.monotonic() - self.started


def tune(
    config: DistmlConfig,
    workspace: Workspace,
    *,
    study: str,
    stream: TextIO | None = None,
    executor: TrialExecutor | None = None,
    poll_s: float = 1.0,
) -> StudyResult:
    """Run study ``study`` up to ``[search] trials`` trials (resuming an interrupted one first); its result.

    Raises UsageError/ConfigError before anything starts for bad settings, TrainingError when every trial
    failed or the budget ended before any trial finished an epoch.
    """
    stream = stream or sys.stdout  # looked up now: the CLI's stdout may be redirected
    config = with_search_epochs(config)
    search, base = config.search, config.train
    check_study_name(study)
    if base.val_fraction <= 0:
        raise ConfigError(
            "[train] val_fraction is 0: the search chooses on the validation split",
            hint="set val_fraction > 0 (e.g. 0.1)",
        )
    check_batches(config)
    digest, dataset_name = _dataset(base, workspace)
    total = search.trials
    if search.sampler == "grid" and total > grid_size(search.space):
        print(f"the grid has {grid_size(search.space)} points: running at most that many trials", file=stream)
        total = grid_size(search.space)
    document = space_document(search.space, search.metric, search.sampler, base)
    path = storage_path(workspace.home, study)
    lock = lock_study(workspace.home, study)
    try:
        opened = open_study(path, study, search, document, space_sha256(document), digest, max_epochs(config))
        return _Loop(config, workspace, opened, path, total, stream, executor, poll_s, dataset_name).run()
    finally:
        lock.release()


def with_search_epochs(config: DistmlConfig) -> DistmlConfig:
    """``config`` with ``[search] epochs`` (when set) as ``[train] epochs``: each trial's epochs, the last rung."""
    epochs = config.search.epochs
    if epochs is None:
        return config
    return config.model_copy(update={"train": config.train.model_copy(update={"epochs": epochs})})


class _Loop:
    """One call's ask/tell loop over a locked, opened study."""

    def __init__(
        self,
        config: DistmlConfig,
        workspace: Workspace,
        study: optuna.Study,
        path: Path,
        total: int,
        stream: TextIO,
        executor: TrialExecutor | None,
        poll_s: float,
        dataset_name: str,
    ) -> None:
        self.config, self.search, self.base = config, config.search, config.train
        self.workspace, self.study, self.path, self.total = workspace, study, path, total
        self.stream, self.poll_s = stream, poll_s
        self.executor = executor or _local_executor(workspace)
        self.dataset_name = dataset_name
        self.active: list[_Active] = []
        self.ran = 0  # trials this call started (resumed ones included)
        self.failures: list[str] = []
        self.budget_cut = False
        self.epochs_seen = 0  # epochs finished by this call's trials
        self.parent_run: str | None = None

    def say(self, line: str) -> None:
        print(line, file=self.stream, flush=True)

    def run(self) -> StudyResult:
        from distml import tracking

        slots = self.executor.capacity(self.base, self.search.max_concurrent)
        if slots < self.search.max_concurrent:
            self.say(
                f"running {slots} trial(s) at once, not {self.search.max_concurrent}: each takes "
                f"{self.base.workers} worker(s) and more would not fit here"
            )
        tracking.ensure_experiment(self.workspace.home, f"distml-{self.dataset_name}")  # before trials race
        self.parent_run = _start_parent(self.workspace.home, self.study.study_name, self.config)
        if self.parent_run is not None:
            self.study.set_user_attr("mlflow_run_id", self.parent_run)
        interrupted = self.study.get_trials(deepcopy=False, states=(_state("RUNNING"),))
        existing = self._started()
        new = max(0, self.total - existing)
        self._enqueue(new)
        self.say(
            f"study {self.study.study_name} ({self.path}): {existing - len(interrupted)} trial(s) done, "
            f"{len(interrupted)} interrupted, {new} new to run (--trials {self.total})"
        )
        if not new and not interrupted:
            self.say(f"nothing to run: the study has its {existing} trial(s); a larger --trials continues it")
        deadline = time.monotonic() + self.search.budget_minutes * 60 if self.search.budget_minutes else math.inf
        pending = list(interrupted)
        ok = False
        try:
            while pending or new or self.active:
                while len(self.active) < slots and (pending or new) and time.monotonic() < deadline:
                    if pending:
                        self._resume(pending.pop(0))
                    else:
                        new -= 1
                        self._start_new()
                for act in list(self.active):
                    self._check(act)
                if time.monotonic() >= deadline and (self.active or pending or new):
                    self._cut_by_budget()
                    if pending or new:
                        self.say(f"the budget is spent: {len(pending) + new} trial(s) not started")
                    pending, new = [], 0
                if self.active:
                    time.sleep(self.poll_s)
            ok = True
        finally:
            if not ok:  # interrupted: the jobs stop, their trials stay RUNNING for the next call to resume
                for act in self.active:
                    if act.job is not None:
                        self.executor.stop(act.job)
                self.say("interrupted: the same command resumes the study")
        result = from_study(self.study, self.path, self.ran)
        self._finish_parent(result)
        self._check_outcome(result)
        return result

    # -- starting -------------------------------------------------------------------------------------------

    def _started(self) -> int:
        """Trials the study has started (an enqueued trial waiting for its turn is not one yet)."""
        return len(self.study.get_trials(deepcopy=False)) - len(self._waiting())

    def _waiting(self) -> list[optuna.trial.FrozenTrial]:
        return self.study.get_trials(deepcopy=False, states=(_state("WAITING"),))

    def _enqueue(self, room: int) -> None:
        """Queue ``[search] enqueue``'s trials (at most ``room``); one the study already has is not queued again."""
        for params in self.search.enqueue:
            if len(self._waiting()) >= room:
                return
            self.study.enqueue_trial(enqueued_params(self.search.space, params), skip_if_exists=True)

    def _start_new(self) -> None:
        waiting = self._waiting()  # ask() takes the first enqueued trial, with its number
        number = waiting[0].number if waiting else len(self.study.get_trials(deepcopy=False))
        self.study.sampler = make_sampler(self.search, number)  # seeded by the trial's number
        trial = self.study.ask()
        params = sample(trial, self.search.space)
        self._launch(trial, params, resumed=False)

    def _resume(self, frozen: optuna.trial.FrozenTrial) -> None:
        import optuna

        trial = optuna.trial.Trial(self.study, frozen._trial_id)
        # Suggesting again returns the values the trial already has (a kill between ask and the last suggest
        # leaves some unsampled: the trial's own seeded sampler draws them now).
        self.study.sampler = make_sampler(self.search, frozen.number)
        params = sample(trial, self.search.space)
        run_dir = trial_run_dir(self.workspace.home, self.study.study_name, frozen.number)
        has_checkpoint = any((run_dir / "checkpoints").glob("*")) if (run_dir / "checkpoints").is_dir() else False
        how = "from its checkpoint" if has_checkpoint else "from the start (it had no checkpoint yet)"
        self.say(f"resuming trial {frozen.number} {how}")
        wait_for_run(run_dir, self.say)
        before = float(frozen.user_attrs.get("seconds", 0.0))
        self._launch(trial, params, resumed=True, reported=len(frozen.intermediate_values), before=before)

    def _launch(
        self, trial: optuna.Trial, params: Params, *, resumed: bool, reported: int = 0, before: float = 0.0
    ) -> None:
        from pydantic import ValidationError

        from distml.config import config_error

        run_dir = trial_run_dir(self.workspace.home, self.study.study_name, trial.number)
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("resumed", resumed)
        self.ran += 1
        try:
            cfg = TrainConfig.model_validate({**self.base.model_dump(), **params})
        except (ValidationError, DistmlError) as exc:
            message = config_error(exc).message if isinstance(exc, ValidationError) else exc.message
            self._fail(trial, f"invalid trial config: {message}")
            return
        act = _Active(trial, cfg, run_dir, seconds_before=before, reported=reported)
        if not resumed:
            self.say(f"trial {trial.number} started: {_params_text(params)} (run {run_dir.name})")
        if (run_dir / "result.json").is_file() and resumed:  # it finished just before the tuner was killed
            self.active.append(act)
            return
        env = _trial_env(self.parent_run, trial.number, self.study.study_name)
        try:
            act.job = self.executor.start(cfg, run_dir, env)
        except (OSError, DistmlError) as exc:
            self._fail(trial, f"could not start: {exc}")
            return
        self.active.append(act)

    # -- watching -------------------------------------------------------------------------------------------

    def _check(self, act: _Active) -> None:
        """Report new epochs, prune if told to, and settle a job that has ended."""
        code = self.executor.poll(act.job) if act.job is not None else 0
        metric = self.search.metric
        for rec in read_history(act.run_dir)[act.reported :]:
            value = metric_of(rec, metric)
            act.reported = int(rec["epoch"])
            self.epochs_seen += 1
            act.trial.report(value, act.reported)
            act.trial.set_user_attr("epochs_used", act.reported)
            act.trial.set_user_attr("seconds", round(act.seconds(), 1))
            self.say(f"trial {act.number}: epoch {act.reported}/{act.cfg.epochs} {_metric_text(metric, value)}")
            if code is None and act.reported < act.cfg.epochs and act.trial.should_prune():
                self._stop(act)
                self._tell(act, "PRUNED")
                self.say(f"trial {act.number} pruned at epoch {act.reported} ({_metric_text(metric, value)})")
                return
        if code is None:
            return
        result_file = act.run_dir / "result.json"
        history = read_history(act.run_dir)
        if code == 0 and result_file.is_file() and history:
            value = metric_of(history[-1], metric)
            if math.isnan(value):
                self._fail(act.trial, f"the final {metric} is NaN", act)
                return
            self._tell(act, "COMPLETE", value)
            self.say(
                f"trial {act.number} complete: {_metric_text(metric, value)} after {act.reported} epoch(s), "
                f"{act.seconds():.0f}s"
            )
            return
        self._fail(act.trial, f"{log_error(act.run_dir, code)} (log {act.run_dir / 'train.log'})", act)

    def _stop(self, act: _Active) -> None:
        if act.job is not None:
            self.executor.stop(act.job)

    def _tell(self, act: _Active, state: str, value: float | None = None) -> None:
        history = read_history(act.run_dir)
        last = history[-1] if history else None
        attrs: dict[str, object] = {
            "epochs_used": act.reported,
            "seconds": round(act.seconds(), 1),
            "val_accuracy": finite(last, "val_accuracy"),
            "test_accuracy": finite(last, "test_accuracy"),
            "mlflow_run_id": read_text(act.run_dir / "mlflow_run_id"),
        }
        for key, attr in attrs.items():
            act.trial.set_user_attr(key, attr)
        self.study.tell(act.trial, value if state == "COMPLETE" else None, state=_state(state))
        self.active.remove(act)

    def _fail(self, trial: optuna.Trial, error: str, act: _Active | None = None) -> None:
        trial.set_user_attr("error", error[:2000])
        self.failures.append(f"trial {trial.number}: {error}")
        self.say(f"trial {trial.number} failed: {error}")
        if act is not None:
            self._tell(act, "FAIL")
        else:
            self.study.tell(trial, state=_state("FAIL"))

    def _cut_by_budget(self) -> None:
        minutes = self.search.budget_minutes
        self.budget_cut = True
        for act in list(self.active):
            self._stop(act)
            self._check_reports(act)
            act.trial.set_user_attr("stopped_by", "budget")
            self._tell(act, "PRUNED")
            self.say(f"trial {act.number} stopped at the {minutes:g}-minute budget after {act.reported} epoch(s)")

    def _check_reports(self, act: _Active) -> None:
        for rec in read_history(act.run_dir)[act.reported :]:
            act.reported = int(rec["epoch"])
            self.epochs_seen += 1
            act.trial.report(metric_of(rec, self.search.metric), act.reported)

    # -- the end --------------------------------------------------------------------------------------------

    def _finish_parent(self, result: StudyResult) -> None:
        if self.parent_run is None:
            return
        from distml.search.tracking import finish_study_run

        finish_study_run(self.workspace.home, self.parent_run, result, ok=result.best is not None)

    def _check_outcome(self, result: StudyResult) -> None:
        if self.budget_cut and self.ran and self.epochs_seen == 0 and result.best is None:
            minutes = self.search.budget_minutes or 0
            eta = first_eta(result)
            raise TrainingError(
                f"--budget-minutes {minutes:g} is too small for one epoch: no trial finished an epoch in it{eta}",
                hint="give a larger budget, or fewer/smaller epochs",
            )
        if self.ran and result.best is None:
            raise TrainingError(f"every trial of study {result.study} failed: " + "; ".join(self.failures[-5:]))


def _state(name: str) -> optuna.trial.TrialState:
    import optuna

    return optuna.trial.TrialState[name]


def _local_executor(workspace: Workspace) -> TrialExecutor:
    from distml.search.executor import LocalExecutor
    from distml.train.dist import usable_cores
    from distml.train.launch import _gpu_count

    return LocalExecutor(workspace, usable_cores(), _gpu_count())


def _dataset(base: TrainConfig, workspace: Workspace) -> tuple[str, str]:
    from distml.data.reader import open_path
    from distml.data.store import DatasetStore

    dataset = open_path(DatasetStore(workspace).resolve(base.dataset))
    return dataset.digest, dataset.name


def _start_parent(home: Path, study: str, config: DistmlConfig) -> str | None:
    from distml.search.tracking import start_study_run

    return start_study_run(home, study, config)


def _trial_env(parent_run: str | None, number: int, study: str) -> dict[str, str]:
    if parent_run is None:
        return {}
    from distml.search.tracking import trial_env

    return trial_env(parent_run, number, study)


def _metric_text(metric: str, value: float) -> str:
    return f"val accuracy {value:.2%}" if metric == "val_accuracy" else f"val loss {value:.4f}"


def _params_text(params: Params) -> str:
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
