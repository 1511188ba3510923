"""A training job on a Ray cluster: Ray Train's ``TorchTrainer`` runs distml's own worker on each rank.

Ray does the placing (``--placement pack|spread``), starts the process group (gloo on CPU, NCCL on GPU) and
restarts the worker group after a worker or node is lost (``[train] max_restarts`` times, as torchrun's
``--max-restarts``). Everything else is the torchrun path's: each rank runs
:func:`distml.train.worker.run_rank`, which reads the job file, resumes from distml's newest checkpoint and
leaves the same status markers, ``result.json``, history and checkpoints in the run folder, so the launcher reads
a Ray job exactly as it reads a torchrun one.

The run folder must be on storage every node sees (the workspace on a shared filesystem, at the same path on
every node): the driver writes a random token into it and, before the trainer starts, a zero-CPU task pinned to
each alive node reads it back, so a node that does not see the workspace fails the job within seconds with an
error naming the node. Every rank checks the token again before it trains (a node that joined later).

Each rank also records where it ran: ``placement.json`` holds one entry per rank of the latest attempt.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import re
import secrets
import shutil
import sys
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

from distml.cluster import NodeInfo, connect, nodes, require_ray
from distml.config import ClusterConfig, TrainConfig
from distml.errors import DistmlError, TrainingError, UsageError, WorkspaceError
from distml.files import write_atomic
from distml.train.job import Job
from distml.train.ray_check import CHECK_FILE, sees_workspace

if TYPE_CHECKING:
    from distml.train.dist import DistContext

PLACEMENT_FILE = "placement.json"
ATTEMPTS = "ray-attempts"  # under status/: one file per attempt of the worker group
RAY_FOLDER = "ray"  # Ray Train's own storage (RunConfig), inside the run folder
# Ray retries starting the worker group after a node is lost (waiting for the resources to come back, a minute
# each time): after this many failed starts the job fails rather than waiting for ever.
START_FAILURES = 5
# How long the per-node workspace check may take (a Ray worker process starting on each node); a node that has not
# answered by then is left to the ranks' own check, so a slow node never fails a job here.
CHECK_TIMEOUT_S = 60.0
_PLACEMENT = {"pack": "PACK", "spread": "STRICT_SPREAD"}
# Ray Train's defaults that do not fit distml (set unless the environment says otherwise): its print patch sends
# every line a worker prints through its logger as well, so rank 0's progress reached the terminal twice; its
# preemption watcher serves spot-instance draining, which distml's restarts do not use, and logs an error line on
# every start. Its controller polls the workers every 2 s: every change of state (the group started, a rank
# finished or failed) waited a second on average for the next poll; a poll is one small call per worker.
_TRAIN_ENV = {
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
}


class Placement(TypedDict):
    """One entry of ``placement.json``: where one rank of the latest attempt ran."""

    rank: int
    local_rank: int
    node_id: str
    node_ip: str
    pid: int
    attempt: int  # 0 for the first start of the worker group, 1 after the first restart, ...


def check_placeable(cfg: TrainConfig, cluster: ClusterConfig) -> list[NodeInfo]:
    """Connect and refuse, within seconds, a job that the cluster can never place; the cluster's nodes.

    Ray would otherwise wait for the resources for ever. A job the cluster can place but not now (other jobs
    hold the resources) waits, as it should.
    """
    connect(_address(cluster))
    found = nodes()
    gpu = uses_gpu(found)
    need = worker_resources(cfg, gpu)
    per_node = [_fits(node, need) for node in found]
    if cluster.placement == "spread":
        able = sum(1 for n in per_node if n >= 1)
        if cfg.workers > able:
            raise UsageError(
                f"--workers {cfg.workers} with --placement spread needs {cfg.workers} nodes with "
                f"{_text(need)} each; the cluster at {cluster.address} has {able} (of {len(found)} nodes)",
                hint=f"use --workers {max(1, able)} or fewer, --placement pack, or add nodes",
            )
    elif cfg.workers > sum(per_node):
        raise UsageError(
            f"--workers {cfg.workers} x {_text(need)} is more than the cluster at {cluster.address} can ever place "
            f"({sum(per_node)} such workers on its {len(found)} node(s): {_capacity(found)})",
            hint=f"use --workers {max(1, sum(per_node))} or fewer, fewer --threads-per-worker, or add nodes",
        )
    return found


def uses_gpu(found: list[NodeInfo]) -> bool:
    """Whether a job on these nodes trains on GPUs (one per worker, NCCL): when the cluster has any."""
    return any(node.gpus >= 1 for node in found)


def worker_resources(cfg: TrainConfig, gpu: bool) -> dict[str, float]:
    """What Ray reserves for one worker: its threads' CPUs, and a GPU when the cluster has them."""
    need = {"CPU": float(cfg.threads_per_worker or 1)}
    if gpu:
        need["GPU"] = 1.0
    return need


def run(job: Job, cluster: ClusterConfig, check: WorkspaceCheck | None = None) -> int:
    """Run ``job`` on the cluster and wait; 0 when the worker group finished (the markers say the rest).

    ``check``: the per-node workspace check, started earlier by :func:`start_workspace_check` (else started here).
    A failed job (a rank's error, a node lost more often than ``max_restarts`` allows, a node that cannot see
    the workspace) is a TrainingError with Ray's reason on one line.
    """
    found = check_placeable(job.config, cluster)
    gpu = uses_gpu(found)
    cfg = job.config
    check = check or start_workspace_check(job, found)
    token = check.token
    shutil.rmtree(job.run_dir / RAY_FOLDER, ignore_errors=True)  # Ray's bookkeeping of an earlier command
    for name, value in _TRAIN_ENV.items():
        os.environ.setdefault(name, value)  # read when the trainer starts its controller, which inherits them
    check.wait()
    train = importlib.import_module("ray.train")
    # Ray Train's TorchTrainer without torch in this process, its autoscaling request and more (ray_trainer.py).
    trainer = importlib.import_module("distml.train.ray_trainer").DistmlTorchTrainer(
        _worker,
        train_loop_config={"run_dir": str(job.run_dir), "token": token},
        scaling_config=train.ScalingConfig(
            num_workers=cfg.workers,
            use_gpu=gpu,
            resources_per_worker=worker_resources(cfg, gpu),
            placement_strategy=_PLACEMENT[cluster.placement],
        ),
        run_config=train.RunConfig(
            name=RAY_FOLDER,
            storage_path=str(job.run_dir),
            failure_config=train.FailureConfig(max_failures=cfg.max_restarts, controller_failure_limit=START_FAILURES),
            worker_runtime_env={"env_vars": worker_env(cfg, found)},
            logging_config=train.LoggingConfig(log_level="WARNING"),
        ),
    )
    try:
        trainer.fit()
    except train.TrainingFailedError as exc:
        # Ray's account, not the markers: after a lost node the other ranks' markers hold only what followed
        # (a broken connection), and a rank that cannot see the run folder leaves none.
        raise TrainingError(
            f"training run {job.run_dir.name} failed on Ray after {_attempts(job.run_dir)} attempt(s) "
            f"([train] max_restarts = {cfg.max_restarts}): {failure_reason(exc)}",
            hint="re-running the same --run-name resumes from the last checkpoint",
        ) from None
    return 0


@dataclass(frozen=True)
class WorkspaceCheck:
    """The per-node workspace check under way: one zero-CPU task per alive node reading the driver's token back.

    Started by :func:`start_workspace_check` as soon as the job file is written, so that the nodes start the
    tasks' worker processes while the driver opens the job's MLflow run; :meth:`wait` then judges the answers.
    """

    run_dir: Path
    token: str
    asked: dict[Any, NodeInfo]  # the task's ObjectRef -> the node it is pinned to

    def wait(self) -> None:
        """Fail within seconds, naming them, when alive nodes do not see ``run_dir`` (with the driver's ``token``).

        Without this the job learnt it only once Ray Train had started its controller and every worker, and the
        ranks had imported torch and formed their process group: ~45 s on a busy 2-core test machine. A node that
        does not answer within :data:`CHECK_TIMEOUT_S` (or dies meanwhile) is not judged here: the ranks' check
        still runs.
        """
        ray = require_ray()
        ready, late = ray.wait(list(self.asked), num_returns=len(self.asked), timeout=CHECK_TIMEOUT_S)
        for ref in late:
            ray.cancel(ref, force=True)
        blind = []
        for ref in ready:
            try:
                sees = bool(ray.get(ref))
            except ray.exceptions.RayError:
                continue  # the node (or its worker) died meanwhile: Ray's placement and the ranks' check handle it
            if not sees:
                blind.append(self.asked[ref])
        if blind:
            raise WorkspaceError(_blind_message(self.run_dir, [(node.ip, node.node_id) for node in blind]))


def start_workspace_check(job: Job, found: list[NodeInfo]) -> WorkspaceCheck:
    """Write a new token into the run folder and ask each of the nodes ``found`` to read it back (not waiting).

    One zero-CPU task pinned to each node (``soft=False``: on that node or not at all). Each costs a Ray worker
    process on its node, which imports only the standard library and :mod:`distml.train.ray_check`: Ray 2.60 never
    hands a task's process on to an actor, even one with the same runtime environment (measured), so the training
    workers start their own.
    """
    ray = require_ray()
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    token = secrets.token_hex(16)
    write_atomic(job.run_dir / CHECK_FILE, token.encode())
    check = ray.remote(num_cpus=0, max_retries=0)(sees_workspace)
    asked = {
        check.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node.node_id, soft=False)).remote(
            str(job.run_dir), token
        ): node
        for node in found
    }
    return WorkspaceCheck(job.run_dir, token, asked)


def worker_env(cfg: TrainConfig, found: list[NodeInfo]) -> dict[str, str]:
    """The workers' environment: as the torchrun launcher sets it, loopback sockets when every node is local."""
    from distml.train.launch import MALLOC_DEFAULTS

    env = {**MALLOC_DEFAULTS, "OMP_NUM_THREADS": str(cfg.threads_per_worker or 1), "PYTHONUNBUFFERED": "1"}
    if found and all(node.ip.startswith("127.") for node in found):
        # gloo and NCCL bind to the host name's address unless told an interface; on a cluster whose nodes are
        # all on this host's loopback that may be a routable one (or none that the other nodes can reach).
        env.update(GLOO_SOCKET_IFNAME="lo", NCCL_SOCKET_IFNAME="lo")
    return env


def failure_reason(exc: BaseException) -> str:
    """Ray's failure as one line: a lost worker first (the others' errors follow from it), then distml's own
    error when a rank raised one, else the first line of Ray's message."""
    failures: dict[int, BaseException] = getattr(exc, "worker_failures", None) or {}
    ranked = sorted(failures.items())
    for rank, error in ranked:
        lost = _lost(error)
        if lost:
            return f"rank {rank}: {lost}"
    for rank, error in ranked:
        if isinstance(error, DistmlError):
            return f"rank {rank}: {error}"
    for rank, error in ranked:
        return f"rank {rank}: {_first_line(error)}"
    cause = getattr(exc, "controller_failure", None)
    return _first_line(cause if isinstance(cause, BaseException) else exc)


def _worker(config: dict[str, str]) -> None:
    """Ray Train's per-worker function: one rank of the job, as ``python -m distml.train.worker`` runs it."""
    try:
        _run_rank_on_ray(Path(config["run_dir"]), config["token"])
    except DistmlError:
        # Already said on one line (run_rank prints its rank's error; the workspace check below prints its own);
        # Ray Train would log the traceback too, from this logger, before it reports the error to the driver.
        logging.getLogger("ray.train.v2._internal.util").setLevel(logging.CRITICAL)
        raise


def _run_rank_on_ray(run_dir: Path, token: str) -> None:
    import torch.distributed as dist

    from distml.train.dist import context_from_env, init_distributed

    ctx = context_from_env()  # the trainer's backend set RANK, LOCAL_RANK, WORLD_SIZE, ... and MASTER_* (ray_trainer)
    # Each attempt of the worker group has its own store (a new port on rank 0's node): no prefix to keep apart.
    init_distributed(ctx, timeout=timedelta(minutes=10))
    try:
        _run_rank_in_group(run_dir, token, ctx)
    finally:
        dist.destroy_process_group()


def _run_rank_in_group(run_dir: Path, token: str, ctx: DistContext) -> None:
    import torch.distributed as dist

    from distml.train.worker import run_rank

    ray = require_ray()
    node_id = str(ray.get_runtime_context().get_node_id())
    node_ip = str(ray.util.get_node_ip_address())
    # Every rank checks that it sees the run folder, and all learn each other's answer before anything else: a rank
    # that stopped alone would leave the others waiting in their next collective until Ray tears them down.
    problem = _visibility_problem(run_dir, token, node_ip, node_id)
    problems: list[str | None] = [None] * ctx.world_size
    dist.all_gather_object(problems, problem)
    first = next((p for p in problems if p), None)
    if first:
        if problem:
            print(f"error: {problem}", file=sys.stderr, flush=True)
        raise WorkspaceError(first)
    attempt = _next_attempt(run_dir, ctx.rank)
    mine: Placement = {
        "rank": ctx.rank,
        "local_rank": ctx.local_rank,
        "node_id": node_id,
        "node_ip": node_ip,
        "pid": os.getpid(),
        "attempt": attempt,
    }
    everyone: list[Placement | None] = [None] * ctx.world_size
    dist.all_gather_object(everyone, mine)
    if ctx.rank == 0:
        write_atomic(run_dir / PLACEMENT_FILE, (json.dumps(everyone, indent=2) + "\n").encode())
    # The group exists (join=None); the attempt keeps the shared-memory segments of two attempts apart, as
    # torchrun's restart count does.
    reason = run_rank(run_dir, replace(ctx, restart=attempt, job_id=f"ray-{ctx.job_id}"), join=None)
    if reason is not None:
        raise TrainingError(reason)


def _visibility_problem(run_dir: Path, token: str, node_ip: str, node_id: str) -> str | None:
    """Why this node does not see the driver's run folder (it must be on storage every node sees), or None."""
    return None if sees_workspace(str(run_dir), token) else _blind_message(run_dir, [(node_ip, node_id)])


def _blind_message(run_dir: Path, nodes: list[tuple[str, str]]) -> str:
    """The one line for nodes (ip, node id) that do not see the run folder."""
    who = " and ".join(f"node {ip} ({node_id[:12]})" for ip, node_id in nodes)
    verb = "does" if len(nodes) == 1 else "do"
    return (
        f"{who} {verb} not see the workspace: {run_dir} there is not the folder the driver wrote; the workspace "
        "must be a shared filesystem path, the same on every node (docs/ray.md)"
    )


def _next_attempt(run_dir: Path, rank: int) -> int:
    """Which start of the worker group this is (0 first): rank 0 counts the starts in the run folder, all agree."""
    import torch.distributed as dist

    number = [0]
    if rank == 0:
        folder = run_dir / "status" / ATTEMPTS
        folder.mkdir(parents=True, exist_ok=True)
        number[0] = sum(1 for _ in folder.iterdir())
        (folder / str(number[0])).touch()
    dist.broadcast_object_list(number, src=0)
    return int(number[0])


def _attempts(run_dir: Path) -> int:
    folder = run_dir / "status" / ATTEMPTS
    return sum(1 for _ in folder.iterdir()) if folder.is_dir() else 0


def _lost(error: BaseException) -> str | None:
    """For a rank whose process or node died (no exception of its own): that, and Ray's cause, on one line."""
    inner = getattr(error, "health_check_failure", None) or error
    if not isinstance(inner, require_ray().exceptions.RayActorError):
        return None
    # Ray's text: "The actor died unexpectedly...", then "\tfield: value" lines, then the cause in words.
    lines = [line.strip() for line in str(inner).splitlines() if line.strip()]
    fields = dict(line.split(": ", 1) for line in lines[1:] if re.match(r"^[a-z_]+: ", line))
    causes = [line for line in lines[1:] if not re.match(r"^[a-z_]+: ", line)]
    where = f" on node {fields['ip']}" if "ip" in fields else ""
    return f"its worker{where} was lost" + (f" ({causes[0].rstrip('.')})" if causes else "")


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def _address(cluster: ClusterConfig) -> str:
    if cluster.address is None:
        raise UsageError("a Ray job needs the cluster's address", hint="--ray auto, or --ray HOST:PORT")
    return cluster.address


def _fits(node: NodeInfo, need: dict[str, float]) -> int:
    """How many workers needing ``need`` fit on ``node`` when it is otherwise empty."""
    fit = math.floor(node.cpus / need["CPU"]) if need["CPU"] else 1 << 30
    if "GPU" in need:
        fit = min(fit, math.floor(node.gpus / need["GPU"]))
    return fit


def _text(need: dict[str, float]) -> str:
    return " + ".join(f"{value:g} {name}" for name, value in need.items())


def _capacity(found: list[NodeInfo]) -> str:
    return ", ".join(f"{n.ip} {n.cpus:g} CPU" + (f" {n.gpus:g} GPU" if n.gpus else "") for n in found)
