"""Where a trial's training runs: the seam between the tuner's ask/tell loop and the machines.

The tuner only starts, polls and stops jobs through :class:`TrialExecutor`; :class:`LocalExecutor` runs each
trial as a ``distml train`` job on this host through the candidate scheduler's :func:`start_job`, sized by the
same core counting as its :func:`~distml.train.candidates.plan`. A cluster executor (the Ray issue) replaces it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from distml.config import TrainConfig
from distml.errors import UsageError
from distml.workspace import Workspace

STOP_GRACE_S = 20.0  # a stopped trial gets this long to end its workers before it is killed


class TrialJob(Protocol):
    """A started trial, as the executor that started it knows it."""

    run_dir: Path


class TrialExecutor(Protocol):
    """Runs trials: ``start`` a job in a run folder, ``poll`` it (None while it runs, else its exit code), ``stop``."""

    def capacity(self, base: TrainConfig, wanted: int) -> int:
        """How many trials like ``base`` may run at once, at most ``wanted``."""
        ...

    def start(self, cfg: TrainConfig, run_dir: Path, env: Mapping[str, str]) -> TrialJob: ...

    def poll(self, job: TrialJob) -> int | None: ...

    def stop(self, job: TrialJob) -> None: ...


@dataclass
class LocalJob:
    run_dir: Path
    proc: subprocess.Popen[bytes]
    gpus: list[int]


class LocalExecutor:
    """Trials as local processes: K at once within the cores (each with its W workers), or W GPUs each."""

    def __init__(self, workspace: Workspace, cores: int, gpus: int) -> None:
        self.workspace = workspace
        self.cores = cores
        self.free_gpus = list(range(gpus))
        self.gpus = gpus
        self.threads = 1
        self.jobs_at_once = 1

    def capacity(self, base: TrainConfig, wanted: int) -> int:
        from distml.train.candidates import share_cores

        if self.gpus:
            if base.workers > self.gpus:
                raise UsageError(f"[train] workers {base.workers} is more than the {self.gpus} GPU(s) here")
            self.jobs_at_once = min(wanted, self.gpus // base.workers)
            return self.jobs_at_once
        if base.workers > self.cores and not base.allow_oversubscribe:
            raise UsageError(
                f"[train] workers {base.workers} is more than the {self.cores} cores here",
                hint="use fewer workers, or allow_oversubscribe",
            )
        fit = wanted if base.allow_oversubscribe else max(1, min(wanted, self.cores // base.workers))
        self.threads, _ = share_cores(base, fit, self.cores)
        self.jobs_at_once = fit
        return fit

    def start(self, cfg: TrainConfig, run_dir: Path, env: Mapping[str, str]) -> LocalJob:
        from distml.train.candidates import start_job

        gpus: list[int] = []
        if self.gpus:
            gpus, self.free_gpus = self.free_gpus[: cfg.workers], self.free_gpus[cfg.workers :]
        try:
            proc = start_job(cfg, self.workspace, run_dir, self.threads, gpus, env)
        except BaseException:  # not started: its GPUs go back, or every later trial would find fewer
            self.free_gpus.extend(gpus)
            raise
        return LocalJob(run_dir, proc, gpus)

    def poll(self, job: TrialJob) -> int | None:
        assert isinstance(job, LocalJob)
        code = job.proc.poll()
        if code is not None and job.gpus:
            self.free_gpus.extend(job.gpus)
            job.gpus = []
        return code

    def stop(self, job: TrialJob) -> None:
        """SIGTERM the job's process group (it stops its workers and keeps its checkpoint), SIGKILL if it lingers."""
        assert isinstance(job, LocalJob)
        if job.proc.poll() is None:
            _signal_group(job.proc.pid, signal.SIGTERM)
            try:
                job.proc.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                _signal_group(job.proc.pid, signal.SIGKILL)
                job.proc.wait(timeout=STOP_GRACE_S)
        self.poll(job)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):  # it ended on its own meanwhile
        os.killpg(pid, sig)
