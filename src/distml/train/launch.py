"""``distml train``: check everything a user can get wrong, write the job, run torchrun, report the result."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

from distml._proc import die_with_parent
from distml.config import ClusterConfig, TrainConfig
from distml.data.reader import open_path
from distml.data.store import DatasetStore
from distml.errors import DistmlError, TrainingError, UsageError, WorkspaceError
from distml.model_names import check_model_name
from distml.train import job_run
from distml.train.dist import gpu_count, usable_cores
from distml.train.job import Job, check_resume, check_split
from distml.train.resources import on_ray
from distml.train.runlock import RunLock, lock_run
from distml.workspace import Workspace

if TYPE_CHECKING:
    from distml.train.ray_launch import WorkspaceCheck

# glibc serves each step's multi-MB activation tensors with fresh mmap()s and returns them on free, so every
# step page-faults its memory in again: 1.7x slower on the seed CNN (6.1k -> 10.3k img/s, W=1, measured in
# docs/performance.md). Keeping freed memory in the heap removes that. Set in the environment to override.
MALLOC_DEFAULTS = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}
LOOPBACK = "127.0.0.1"
# A single-host job listens on loopback only. torchrun's agent would host the workers' store itself, on every
# interface; with sharing off, rank 0 hosts it at MASTER_ADDR (dist.init_distributed binds it there). gloo and
# NCCL listen on the address of the interface they are told, else of the host name, which may be a routable one.
_SINGLE_HOST_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo"}


@dataclass(frozen=True)
class Rendezvous:
    """torchrun's multi-host flags, passed through unchanged; the default is one standalone host.

    The host given ``--node-rank 0`` must be the endpoint's host: it serves the rendezvous there.
    torchrun's c10d rendezvous gives out the global ranks in its own order (it sorts the agents by host name and
    pid, and says that it ignores ``--node-rank``), so the host given ``--node-rank 0`` need not run global rank
    0. distml uses the node rank only to choose the one host that opens the job's MLflow run; nothing here
    assumes which ranks run on which host.
    """

    nnodes: int = 1
    node_rank: int = 0
    endpoint: str | None = None

    def check(self) -> None:
        """Raise UsageError for flags that cannot form a job (before anything is written or started)."""
        if self.nnodes < 1:
            raise UsageError(f"--nnodes {self.nnodes} is not a number of hosts", hint="use 1 or more")
        if not 0 <= self.node_rank < self.nnodes:
            raise UsageError(
                f"--node-rank {self.node_rank} is outside 0..{self.nnodes - 1} for --nnodes {self.nnodes}",
                hint="number the hosts 0 to N-1, each once",
            )
        if self.nnodes > 1 and self.endpoint is None:
            raise UsageError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (the same on every node)")
        if self.endpoint is not None:
            host, _, port = self.endpoint.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise UsageError(
                    f"--rdzv-endpoint {self.endpoint!r} is not HOST:PORT",
                    hint="e.g. 10.0.0.1:29400, the same on every host",
                )

    @property
    def single_host(self) -> bool:
        """One host and no endpoint given: the job's rendezvous and traffic stay on this machine's loopback."""
        return self.nnodes == 1 and self.endpoint is None

    def torchrun_args(self, run_id: str, local_store: Path | None = None) -> list[str]:
        """torchrun's rendezvous flags; ``local_store`` is a file in a private folder, used on a single host."""
        if self.single_host:
            if local_store is None:
                raise ValueError("a single-host job needs a file for its rendezvous store")
            # Not --standalone: that serves the rendezvous from a TCPStore on every interface, unauthenticated,
            # and torchrun unpickles the state it reads from it. A FileStore in a folder only this user can read
            # needs no socket; the workers' own store and gloo listen on 127.0.0.1 (see _SINGLE_HOST_ENV).
            return [
                "--nnodes=1",
                "--rdzv-backend=c10d",
                f"--rdzv-endpoint={local_store}",
                "--rdzv-conf=store_type=file",
                f"--rdzv-id={run_id}",
                f"--local-addr={LOOPBACK}",  # becomes the workers' MASTER_ADDR
            ]
        if self.endpoint is None:
            raise UsageError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (the same on every node)")
        return [
            f"--nnodes={self.nnodes}",
            f"--node-rank={self.node_rank}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={self.endpoint}",
            f"--rdzv-id={run_id}",
            # Node 0 hosts the rendezvous store at the endpoint, the others connect to it. torchrun would otherwise
            # guess from the endpoint's name, which in a pod (a headless-service name) may not resolve yet when the
            # first pod starts: then no agent hosts the store and the job times out.
            f"--rdzv-conf=is_host={int(self.node_rank == 0)}",
        ]


class TrainMetrics(TypedDict, total=False):
    """What a finished job reports: its ``result.json``, then the launcher's wall time and MLflow run.

    The ``result.json`` keys (:class:`distml.train.job.RunResult`) are missing when global rank 0 ran on another
    host, which wrote them to its own run folder.
    """

    test_accuracy: float | None
    test_loss: float | None
    epochs: int
    global_step: int
    seconds: float
    parameters: int
    wall_seconds: float  # the whole job, start-up included
    mlflow_run_id: str | None


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    metrics: TrainMetrics
    torchrun_exit: int


def prepare(
    cfg: TrainConfig,
    workspace: Workspace,
    run_name: str | None,
    rdzv: Rendezvous = Rendezvous(),
    cluster: ClusterConfig | None = None,
) -> Job:
    """Validate the request and write the job file; nothing is started yet."""
    job, lock = _prepare_locked(cfg, workspace, run_name, rdzv, cluster)
    lock.release()
    return job


def _prepare_locked(
    cfg: TrainConfig, workspace: Workspace, run_name: str | None, rdzv: Rendezvous, cluster: ClusterConfig | None
) -> tuple[Job, RunLock]:
    """:func:`prepare`, returning the run folder's lock still held (the caller releases it)."""
    rdzv.check()
    check_model_name(cfg.model)
    _check_batch(cfg, rdzv)
    if on_ray(cluster):
        _check_ray(cfg, rdzv, cluster)
    else:
        _check_this_host(cfg)
    dataset = open_path(DatasetStore(workspace).resolve(cfg.dataset))
    check_split(cfg, len(dataset.split("train")))
    name = run_name or f"{cfg.model}-{dataset.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    if not name.replace("-", "").replace("_", "").replace(".", "").isalnum() or name.startswith("."):
        raise UsageError(f"run name {name!r} is not allowed", hint="use letters, digits, '-', '_' and '.'")
    run_dir = workspace.home / "runs" / name
    try:
        workspace.ensure(run_dir)
    except WorkspaceError as exc:
        raise WorkspaceError(f"run folder {run_dir} is not writable", hint=exc.hint) from None
    lock = lock_run(run_dir, rdzv.node_rank)  # before anything in the folder is read or written
    try:
        job = Job(cfg, run_dir, dataset.path, dataset.digest, world_size=cfg.workers * rdzv.nnodes)
        _check_existing(job)
        if rdzv.node_rank == 0 or not _already_written(job):
            # Hosts sharing one run folder (pods on one volume) each prepare the same job. Only node 0 adds the
            # MLflow run to the job file (train() below), after writing it here; a host that prepares later must
            # not replace that file with one without the run, or rank 0 tracks nothing.
            job.write()
    except BaseException:
        lock.release()
        raise
    return job, lock


def _check_this_host(cfg: TrainConfig) -> None:
    """Refuse more workers than this host's GPUs, or (on CPU) than its cores unless oversubscribing is allowed."""
    cores = usable_cores()
    threads = cfg.threads_per_worker or 1
    gpus = gpu_count()  # without an NVIDIA driver: 0 at once, no torch import
    if gpus and cfg.workers > gpus:
        raise UsageError(
            f"--workers {cfg.workers} is more than the {gpus} GPU(s) on this host",
            hint=f"NCCL runs one worker per GPU: use --workers {gpus} or fewer (more hosts: --nnodes)",
        )
    if not gpus and cfg.workers * threads > cores and not cfg.allow_oversubscribe:
        raise UsageError(
            f"--workers {cfg.workers} x {threads} thread(s) is more than the {cores} cores here",
            hint="use fewer workers, or pass --allow-oversubscribe (slower: workers wait for each other)",
        )


def _check_ray(cfg: TrainConfig, rdzv: Rendezvous, cluster: ClusterConfig | None) -> None:
    """A Ray job: Ray places the workers, so no torchrun host flags; the cluster must be able to place them."""
    from distml.train.ray_launch import check_placeable

    if rdzv != Rendezvous():
        raise UsageError(
            "--nnodes, --node-rank and --rdzv-endpoint are torchrun's; with --ray, Ray places the workers",
            hint="drop them, or drop --ray to run under torchrun",
        )
    assert cluster is not None
    check_placeable(cfg, cluster)


def _check_batch(cfg: TrainConfig, rdzv: Rendezvous) -> None:
    """The global batch is split evenly over every worker of every host: refuse one that does not divide."""
    total = cfg.workers * rdzv.nnodes
    if cfg.batch_size % total == 0:
        return
    example = _round_to(cfg.batch_size, total)
    if rdzv.nnodes == 1:
        raise UsageError(
            f"--batch-size {cfg.batch_size} does not divide by --workers {cfg.workers}",
            hint=f"the batch is global: use a multiple of {cfg.workers}, e.g. {example}",
        )
    raise UsageError(
        f"--batch-size {cfg.batch_size} does not divide by --workers {cfg.workers} x --nnodes {rdzv.nnodes} "
        f"= {total} workers",
        hint=f"the batch is global, split over every worker of every host: use a multiple of {total}, e.g. {example}",
    )


def _already_written(job: Job) -> bool:
    """Whether the run folder's job file already describes ``job`` (apart from its MLflow run)."""
    try:
        written = Job.read(job.run_dir)
    except (OSError, ValueError, KeyError):
        return False
    return replace(written, mlflow_uri=None, mlflow_run_id=None) == job


def _check_existing(job: Job) -> None:
    from distml.train.checkpoint import load_latest

    loaded = load_latest(job.checkpoints, warn=lambda m: print(m, file=sys.stderr))
    if loaded is not None:
        check_resume(loaded[1], job, loaded[0].name)


def run_job(
    job: Job,
    rdzv: Rendezvous = Rendezvous(),
    lock: RunLock | None = None,
    cluster: ClusterConfig | None = None,
    check: WorkspaceCheck | None = None,
) -> TrainResult:
    """Run ``job``'s workers (under torchrun; one worker directly; on Ray) and wait; rank 0 prints the progress.

    ``check``: on Ray, the per-node workspace check already under way (:func:`ray_launch.start_workspace_check`).

    ``lock``, the run folder's lock, is shared with the launched process, so the folder stays locked until that
    process has ended, even if this one is killed first. On Ray this process drives the job, so the lock is
    held as long as the job runs.
    """
    status = job.run_dir / "status"
    shutil.rmtree(status, ignore_errors=True)
    (job.run_dir / "result.json").unlink(missing_ok=True)
    if on_ray(cluster):
        from distml.train import ray_launch

        assert cluster is not None
        return _interpret(job, ray_launch.run(job, cluster, check), rdzv, launcher="Ray Train")
    cfg = job.config
    threads = cfg.threads_per_worker or max(1, usable_cores() // cfg.workers)
    worker = ["-m", "distml.train.worker", str(job.run_dir)]
    env = {**MALLOC_DEFAULTS, **os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)  # a launcher inside a worker must not inherit its parent's identity
    with contextlib.ExitStack() as cleanup:
        if direct_launch(cfg, rdzv):
            cmd = [sys.executable, *worker]  # one process, no process group: it opens no socket
        else:
            local_store = None
            if rdzv.single_host:
                private = Path(tempfile.mkdtemp(prefix="distml-rdzv-"))  # mode 0700: this user's alone
                cleanup.callback(shutil.rmtree, private, ignore_errors=True)
                local_store = private / "store"
                env.update(_SINGLE_HOST_ENV)
            torchrun = [sys.executable, "-m", "torch.distributed.run"]
            per_node = [f"--nproc-per-node={cfg.workers}", f"--max-restarts={cfg.max_restarts}"]
            cmd = [*torchrun, *rdzv.torchrun_args(job.run_dir.name, local_store), *per_node, *worker]
        proc = subprocess.Popen(
            cmd,
            env=env,
            start_new_session=True,
            preexec_fn=die_with_parent(),
            pass_fds=(lock.fileno,) if lock is not None else (),
        )
        try:
            code = proc.wait()
        except KeyboardInterrupt:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
            raise
    return _interpret(job, code, rdzv)


def direct_launch(cfg: TrainConfig, rdzv: Rendezvous) -> bool:
    """One worker on one host with no restarts: the worker runs as a plain child process, without torchrun.

    There is nothing to rendezvous or restart; it starts sooner, and part of W=1's gap to a plain loop came with
    torchrun's agent (docs/performance.md, item 6). The worker sees no torchrun variables and runs as rank 0 of
    1, as it would under torchrun.
    """
    return cfg.workers == 1 and rdzv.nnodes == 1 and rdzv.endpoint is None and cfg.max_restarts == 0


def _launcher(job: Job, rdzv: Rendezvous) -> str:
    return "the worker" if direct_launch(job.config, rdzv) else "torchrun"


def _interpret(job: Job, code: int, rdzv: Rendezvous, launcher: str | None = None) -> TrainResult:
    launcher = launcher or _launcher(job, rdzv)
    status = job.run_dir / "status"
    failed = sorted(status.glob("rank-*.failed")) if status.is_dir() else []
    if rdzv.nnodes == 1:
        done = all((status / f"rank-{r}.done").is_file() for r in range(job.config.workers))
    else:
        # Which global ranks ran on this host is torchrun's choice (see Rendezvous), and this host's status
        # folder holds its own ranks' markers, or every rank's when the hosts share the run folder. A rank marks
        # itself done only after a barrier that every rank reaches with its work finished (and rank 0's results
        # written), so any one done marker shows that the whole job's work is complete.
        done = status.is_dir() and any(status.glob("rank-*.done"))
    if failed and not done:
        reason = failed[0].read_text().strip()
        raise TrainingError(f"training run {job.run_dir.name} failed on {failed[0].stem}: {reason}")
    if not done:
        raise TrainingError(
            f"training run {job.run_dir.name} failed: {launcher} exited with {code} before every worker finished",
            hint="see the output above; re-running the same --run-name resumes from the last checkpoint",
        )
    if code != 0:
        # Every rank finished and wrote its results, then something aborted in shutdown (seen with gloo):
        # the work is complete, so this is not a failure, but it is said.
        print(
            f"note: {launcher} exited with {code} after every worker had finished and written its results "
            "(an abort during process-group shutdown); the run is complete",
            file=sys.stderr,
        )
    metrics: TrainMetrics = {}
    result_file = job.run_dir / "result.json"
    if result_file.is_file():
        metrics = json.loads(result_file.read_text())
    return TrainResult(job.run_dir, metrics, code)


def train(
    cfg: TrainConfig,
    workspace: Workspace,
    run_name: str | None = None,
    rdzv: Rendezvous = Rendezvous(),
    cluster: ClusterConfig | None = None,
) -> TrainResult:
    """Validate, then run the whole job: the library form of ``distml train``; on Ray with ``cluster``.

    The run folder is locked from the checks to the end: a second command for the same run (on the same host)
    is refused with the holder's pid instead of training into the same folder.
    """
    if on_ray(cluster):
        # Ray's workers do not start in this process's folder: every path they are given must be absolute.
        workspace = Workspace(workspace.home.resolve())
    job, lock = _prepare_locked(cfg, workspace, run_name, rdzv, cluster)
    try:
        check = None
        if on_ray(cluster):
            from distml.cluster import nodes
            from distml.train import ray_launch

            # Under way on the nodes while this process opens the MLflow run and imports Ray Train.
            check = ray_launch.start_workspace_check(job, nodes())
        # Node 0 opens the MLflow run beside the workers' start, and logs their epochs into it as they end.
        tracked = job_run.JobTracking(job, workspace if rdzv.node_rank == 0 else None)
        start = time.perf_counter()
        try:
            with tracked:
                result = run_job(job, rdzv, lock, cluster, check)
        except BaseException as exc:
            error = str(exc) if isinstance(exc, DistmlError) else type(exc).__name__
            job_run.close_job_run(tracked.job, ok=False, error=error)
            raise
        result.metrics.setdefault("wall_seconds", time.perf_counter() - start)
        job_run.close_job_run(tracked.job, ok=True)
    finally:
        lock.release()
    result.metrics["mlflow_run_id"] = tracked.job.mlflow_run_id
    return result


def _round_to(value: int, multiple: int) -> int:
    return max(multiple, value // multiple * multiple)
