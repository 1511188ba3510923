"""The ask/tell loop of one ``distml tune`` call over a locked, opened study (:func:`distml.search.tuner.tune`).

It starts trials within the executor's slots (resuming interrupted or budget-stopped ones first, then enqueued,
then sampled ones), reports each new epoch to Optuna, prunes, settles ended jobs, and stops at the budget.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TextIO

from distml.config import DistmlConfig, TrainConfig
from distml.errors import DistmlError, TrainingError
from distml.search.config import params_text
from distml.search.executor import TrialExecutor, TrialJob
from distml.search.result import BUDGET, StudyResult, from_study
from distml.search.space import Params, enqueued_params, sample
from distml.search.study import make_sampler
from distml.search.trials import (
    finite,
    first_eta,
    last_epoch,
    metric_of,
    new_epochs,
    read_history,
    read_text,
    recorded_config,
    trial_run_dir,
    wait_for_run,
)
from distml.workspace import Workspace

if TYPE_CHECKING:
    import optuna


@dataclass
class _Active:
    """A trial whose job runs now."""

    trial: optuna.Trial
    cfg: TrainConfig
    run_dir: Path
    job: TrialJob | None = None
    started: float = field(default_factory=time.monotonic)
    seconds_before: float = 0.0  # wall time of earlier attempts (a resumed trial)
    reported: int = 0  # the last epoch reported to Optuna

    @property
    def number(self) -> int:
        return int(self.trial.number)

    def seconds(self) -> float:
        return self.seconds_before + time.monotonic() - self.started


class StudyLoop:
    """One call's ask/tell loop over a locked, opened study: :meth:`run` runs it to its end or the budget."""

    def __init__(
        self,
        config: DistmlConfig,
        workspace: Workspace,
        study: optuna.Study,
        path: Path,
        total: int,
        stream: TextIO,
        executor: TrialExecutor,
        poll_s: float,
        dataset_name: str,
    ) -> None:
        self.config, self.search, self.base = config, config.search, config.train
        self.workspace, self.study, self.path, self.total = workspace, study, path, total
        self.stream, self.poll_s = stream, poll_s
        self.executor = executor
        self.dataset_name = dataset_name
        self.active: list[_Active] = []
        self.ran = 0  # trials this call started (resumed ones included)
        self.budget_cut = False  # the budget stopped a trial or left one unstarted
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
                f"{self.base.workers} worker(s) and more would not fit "
                + ("on the Ray cluster" if self.config.cluster.engine == "ray" else "here")
            )
        tracking.ensure_experiment(self.workspace.home, f"distml-{self.dataset_name}")  # before trials race
        self.parent_run = _start_parent(self.workspace.home, self.study.study_name, self.config)
        if self.parent_run is not None:
            self.study.set_user_attr("mlflow_run_id", self.parent_run)
        try:
            self._run_trials(slots)
        except BaseException as exc:  # interrupted: the jobs stop, their trials stay RUNNING for the next call
            for act in self.active:
                if act.job is not None:
                    self.executor.stop(act.job)
            self.say("interrupted: the same command resumes the study")
            self._end_parent("KILLED" if isinstance(exc, KeyboardInterrupt | SystemExit) else "FAILED")
            raise
        result = from_study(self.study, self.path, self.ran, budget_stopped=self.budget_cut)
        self._finish_parent(result)
        self._check_outcome(result)
        return result

    def _run_trials(self, slots: int) -> None:
        interrupted = self.study.get_trials(deepcopy=False, states=(_state("RUNNING"),))
        existing = self._started()
        new = max(0, self.total - existing)
        self._enqueue(new)
        by_budget = sum(t.user_attrs.get("stopped_by") == BUDGET for t in interrupted)
        stopped = f" ({by_budget} stopped by the budget)" if by_budget else ""
        self.say(
            f"study {self.study.study_name} ({self.path}): {existing - len(interrupted)} trial(s) done, "
            f"{len(interrupted)} interrupted{stopped}, {new} new to run (--trials {self.total})"
        )
        if not new and not interrupted:
            self.say(f"nothing to run: the study has its {existing} trial(s); a larger --trials continues it")
        deadline = time.monotonic() + self.search.budget_minutes * 60 if self.search.budget_minutes else math.inf
        pending = list(interrupted)
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
                stopped_now = self._cut_by_budget()
                left = len(pending) + new
                if left:
                    self.say(f"the budget is spent: {left} trial(s) not started")
                self.budget_cut = self.budget_cut or bool(stopped_now or left)
                pending, new = [], 0
            if self.active:
                time.sleep(self.poll_s)

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
        why = " (the budget stopped it)" if frozen.user_attrs.get("stopped_by") == BUDGET else ""
        self.say(f"resuming trial {frozen.number}{why} {how}")
        trial.set_user_attr("stopped_by", None)  # running again: no longer stopped
        wait_for_run(run_dir, self.say)
        before = float(frozen.user_attrs.get("seconds", 0.0))
        reported = max(frozen.intermediate_values, default=0)
        # Its checkpoint fits the settings it ran with (workers included), not necessarily today's [train].
        self._launch(trial, params, resumed=True, reported=reported, before=before, cfg=recorded_config(run_dir))

    def _launch(
        self,
        trial: optuna.Trial,
        params: Params,
        *,
        resumed: bool,
        reported: int = 0,
        before: float = 0.0,
        cfg: TrainConfig | None = None,
    ) -> None:
        from pydantic import ValidationError

        from distml.config import config_error

        run_dir = trial_run_dir(self.workspace.home, self.study.study_name, trial.number)
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("resumed", resumed)
        self.ran += 1
        try:
            cfg = cfg or TrainConfig.model_validate({**self.base.model_dump(), **params})
        except (ValidationError, DistmlError) as exc:
            message = config_error(exc).message if isinstance(exc, ValidationError) else exc.message
            self._fail(trial, f"invalid trial config: {message}")
            return
        act = _Active(trial, cfg, run_dir, seconds_before=before, reported=reported)
        if not resumed:
            self.say(f"trial {trial.number} started: {params_text(params)} (run {run_dir.name})")
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
        if self._report(act, may_prune=code is None) or code is None:
            return
        self._settle(act, code)

    def _report(self, act: _Active, *, may_prune: bool) -> bool:
        """Report the epochs finished since the last report, in epoch order; True if the pruner stopped it."""
        metric = self.search.metric
        for rec in new_epochs(read_history(act.run_dir), act.reported):
            value = metric_of(rec, metric)
            act.reported = int(rec["epoch"])
            self.epochs_seen += 1
            act.trial.report(value, act.reported)
            act.trial.set_user_attr("epochs_used", act.reported)
            act.trial.set_user_attr("seconds", round(act.seconds(), 1))
            self.say(f"trial {act.number}: epoch {act.reported}/{act.cfg.epochs} {_metric_text(metric, value)}")
            if may_prune and act.reported < act.cfg.epochs and act.trial.should_prune():
                self._stop(act)
                self._tell(act, "PRUNED")
                self.say(f"trial {act.number} pruned at epoch {act.reported} ({_metric_text(metric, value)})")
                return True
        return False

    def _settle(self, act: _Active, code: int) -> None:
        """A job that has ended: COMPLETE with its last epoch's value, or FAIL with its error."""
        from distml.train.candidates import last_error

        metric = self.search.metric
        last = last_epoch(read_history(act.run_dir))
        if code == 0 and (act.run_dir / "result.json").is_file() and last is not None:
            value = metric_of(last, metric)
            if math.isnan(value):
                self._fail(act.trial, f"the final {metric} is NaN", act)
                return
            self._tell(act, "COMPLETE", value)
            self.say(
                f"trial {act.number} complete: {_metric_text(metric, value)} after {act.reported} epoch(s), "
                f"{act.seconds():.0f}s"
            )
            return
        error = last_error(act.run_dir / "train.log") or f"exited with {code}"
        self._fail(act.trial, f"{error} (log {act.run_dir / 'train.log'})", act)

    def _stop(self, act: _Active) -> None:
        if act.job is not None:
            self.executor.stop(act.job)

    def _record(self, act: _Active) -> None:
        """The trial's figures as user attrs (what ``tune show`` and the pipeline read)."""
        last = last_epoch(read_history(act.run_dir))
        attrs: dict[str, object] = {
            "epochs_used": act.reported,
            "seconds": round(act.seconds(), 1),
            "val_accuracy": finite(last, "val_accuracy"),
            "test_accuracy": finite(last, "test_accuracy"),
            "mlflow_run_id": read_text(act.run_dir / "mlflow_run_id"),
        }
        for key, attr in attrs.items():
            act.trial.set_user_attr(key, attr)

    def _tell(self, act: _Active, state: str, value: float | None = None) -> None:
        self._record(act)
        self.study.tell(act.trial, value if state == "COMPLETE" else None, state=_state(state))
        self.active.remove(act)

    def _fail(self, trial: optuna.Trial, error: str, act: _Active | None = None) -> None:
        trial.set_user_attr("error", error[:2000])
        self.say(f"trial {trial.number} failed: {error}")
        if act is not None:
            self._tell(act, "FAIL")
        else:
            self.study.tell(trial, state=_state("FAIL"))

    def _cut_by_budget(self) -> int:
        """Stop the running trials at the budget; returns how many it stopped (none may have finished meanwhile).

        Each is polled first: one that ended a moment ago is settled as it ended (COMPLETE, say), not stopped. A
        stopped one is not judged: it stays RUNNING in the study with ``stopped_by = "budget"``, so the next tune
        resumes it from its checkpoint like an interrupted trial.
        """
        minutes = self.search.budget_minutes or 0
        stopped = 0
        for act in list(self.active):
            self._check(act)
            if act not in self.active:
                continue
            self._stop(act)
            code = self.executor.poll(act.job) if act.job is not None else 0
            self._report(act, may_prune=False)
            if code == 0 and (act.run_dir / "result.json").is_file():  # it finished while being stopped
                self._settle(act, code)
                continue
            self._record(act)
            act.trial.set_user_attr("stopped_by", BUDGET)
            self.active.remove(act)
            stopped += 1
            self.say(
                f"trial {act.number} stopped at the {minutes:g}-minute budget after {act.reported} epoch(s); "
                "the next distml tune resumes it"
            )
        return stopped

    # -- the end --------------------------------------------------------------------------------------------

    def _finish_parent(self, result: StudyResult) -> None:
        if self.parent_run is None:
            return
        from distml.search.tracking import finish_study_run

        finish_study_run(self.workspace.home, self.parent_run, result, ok=result.best is not None)

    def _end_parent(self, status: Literal["KILLED", "FAILED"]) -> None:
        """End the parent run of an interrupted call; what interrupted it is what the user must hear about."""
        if self.parent_run is None:
            return
        from distml.search.tracking import end_study_run

        try:
            end_study_run(self.workspace.home, self.parent_run, status)
        except Exception as exc:  # the store may be what failed; the interruption is what must go on
            self.say(f"could not end the study's MLflow run: {exc}")

    def _check_outcome(self, result: StudyResult) -> None:
        if self.budget_cut and self.ran and self.epochs_seen == 0 and result.best is None:
            minutes = self.search.budget_minutes or 0
            eta = first_eta(result)
            raise TrainingError(
                f"--budget-minutes {minutes:g} is too small for one epoch: no trial finished an epoch in it{eta}",
                hint="give a larger budget, or fewer/smaller epochs",
            )
        ended = [t for t in result.trials if t["state"] in ("COMPLETE", "PRUNED", "FAIL")]
        if result.best is None and ended and all(t["state"] == "FAIL" for t in ended):
            # From the stored errors, so that running the study again says what its first run said.
            failed = self.study.get_trials(deepcopy=False, states=(_state("FAIL"),))
            errors = [f"trial {t.number}: {t.user_attrs.get('error', 'failed')}" for t in failed]
            raise TrainingError(f"every trial of study {result.study} failed: " + "; ".join(errors[-5:]))


def _state(name: str) -> optuna.trial.TrialState:
    import optuna

    return optuna.trial.TrialState[name]


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
