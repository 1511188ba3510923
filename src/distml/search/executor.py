"""Where a trial's training runs: the seam between the tuner's ask/tell loop and the machines.

The tuner only starts, polls and stops jobs through :class:`TrialExecutor`; :class:`LocalExecutor` runs each
trial as a ``distml train`` job on this host through the candidate scheduler's :func:`start_job`, sized by the
same core counting as its :func:`~distml.train.candidates.plan`. :class:`RayExecutor` is the same with a Ray
cluster's CPUs and GPUs counted in place of this host's: each trial's job still starts here (the Ray driver of its
run) and Ray places its workers on the nodes, so K concurrent trials spread over the cluster. The study, its run
folders, records and MLflow runs do not depend on which one ran the trials.
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

from distml.config import ClusterConfig, TrainConfig
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
    """Trials as processes started here: K at once within the cores (each with its W workers), or W GPUs each.

    ``cores`` and ``gpus`` are this host's; :class:`RayExecutor` gives a cluster's, with ``node_cores`` (its
    largest node's CPUs, the most one worker can hold) and ``cluster`` (passed to each job: its workers run there).
    """

    def __init__(
        self,
        workspace: Workspace,
        cores: int,
        gpus: int,
        *,
        node_cores: int | None = None,
        cluster: ClusterConfig | None = None,
    ) -> None:
        self.workspace = workspace
        self.cores = cores
        self.free_gpus = list(range(gpus))  # on Ray: a count of the cluster's free GPUs (Ray names them to workers)
        self.gpus = gpus
        self.node_cores = node_cores
        self.cluster = cluster
        self.where = "on the Ray cluster" if cluster is not None else "here"
        self.threads = 1
        self.jobs_at_once = 1

    def capacity(self, base: TrainConfig, wanted: int) -> int:
        from distml.train.candidates import check_cluster_fits, share_cores

        if self.gpus:
            if base.workers > self.gpus:
                raise UsageError(f"[train] workers {base.workers} is more than the {self.gpus} GPU(s) {self.where}")
            self.jobs_at_once = min(wanted, self.gpus // base.workers)
            return self.jobs_at_once
        if self.node_cores is not None:
            check_cluster_fits(base, self.cores, self.node_cores, "[train] workers")
        elif base.workers > self.cores and not base.allow_oversubscribe:
            raise UsageError(
                f"[train] workers {base.workers} is more than the {self.cores} cores here",
                hint="use fewer workers, or allow_oversubscribe",
            )
        oversubscribe = base.allow_oversubscribe and self.cluster is None  # Ray would only queue the extra jobs
        fit = wanted if oversubscribe else max(1, min(wanted, self.cores // base.workers))
        self.threads, _ = share_cores(base, fit, self.cores, self.node_cores)
        self.jobs_at_once = fit
        return fit

    def start(self, cfg: TrainConfig, run_dir: Path, env: Mapping[str, str]) -> LocalJob:
        from distml.train.candidates import start_job

        gpus: list[int] = []
        if self.gpus:
            gpus, self.free_gpus = self.free_gpus[: cfg.workers], self.free_gpus[cfg.workers :]
        try:
            proc = start_job(cfg, self.workspace, run_dir, self.threads, gpus, env, cluster=self.cluster)
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


class RayExecutor(LocalExecutor):
    """Trials whose workers run on a Ray cluster: K at once within the cluster's CPUs (or GPUs), not this host's.

    Each trial's job starts here as its run's Ray driver and Ray places its workers (``threads`` CPUs each, or a
    GPU) on the nodes; polling and stopping are the local executor's, on that driver process.
    """

    def __init__(self, workspace: Workspace, cluster: ClusterConfig) -> None:
        from distml.train.resources import count_resources

        res = count_resources(cluster)
        super().__init__(workspace, res.cores, res.gpus, node_cores=res.node_cores, cluster=cluster)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):  # it ended on its own meanwhile
        os.killpg(pid, sig)
