"""Several candidate training jobs at once: a small scheduler that knows the cores (and GPUs) the jobs share.

Each candidate is a whole ``distml train`` job (W workers under torchrun) in its own process, with its output in
``<run>/train.log``. Jobs start as long as they fit: on CPU a job takes ``workers x threads`` cores and the jobs
running together never take more than the host has (unless ``allow_oversubscribe``); on GPU a job takes
``workers`` GPUs, named to it through ``CUDA_VISIBLE_DEVICES``. One failing candidate does not stop the others;
it is reported at the end with its log.

On a Ray cluster (``[cluster] engine = "ray"``) the same scheduler counts the cluster's CPUs and GPUs
(:func:`~distml.train.resources.count_resources`, from ``cluster.nodes()``) instead of this host's: each job's
process still starts here, as the Ray driver of its run, and Ray places the job's workers (``threads`` CPUs each,
or a GPU) on the nodes, so N candidates spread over the cluster as far as its CPUs hold them. Where each rank ran
is in the run's ``placement.json`` (:func:`placement_line`).

While the jobs run, a table shows each one's state, epoch, test accuracy and ETA, read from the files the jobs
write (``history.json``, ``status/``, the log's last progress line). On a terminal it is redrawn in place;
otherwise a line is printed whenever a candidate's state or epoch changes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Literal, TextIO

from distml._proc import die_with_parent
from distml.config import ClusterConfig, TrainConfig
from distml.errors import TrainingError, UsageError
from distml.pipeline.shape import candidate_labels
from distml.train.job import EpochRecord, RunResult
from distml.train.ray_launch import PLACEMENT_FILE, Placement
from distml.train.resources import count_resources, on_ray
from distml.workspace import Workspace

_ETA = re.compile(r"ETA (\d+)m(\d+)s")
CLUSTER_KEY = "cluster"  # candidate.json: the job's [cluster] settings, beside its [train] ones
# queued -> running -> done (it wrote result.json) or failed (it did not; ``error`` says why)
CandidateState = Literal["queued", "running", "done", "failed"]


@dataclass
class Candidate:
    label: str
    config: TrainConfig
    run_dir: Path
    slots: int = 0  # cores (CPU) or GPUs this job holds while it runs
    threads: int = 1
    gpus: list[int] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    state: CandidateState = "queued"
    started: float = 0.0
    ended: float = 0.0
    result: RunResult | None = None  # its result.json, once done
    error: str = ""

    @property
    def log(self) -> Path:
        return self.run_dir / "train.log"


def plan(
    configs: list[TrainConfig],
    cores: int,
    gpus: int,
    prefix: str,
    home: Path,
    *,
    node_cores: int | None = None,
    where: str = "here",
) -> list[Candidate]:
    """Name the candidates and size each job: threads per worker on CPU (jobs share the cores), GPUs on GPU.

    ``cores`` and ``gpus`` are this host's, or a Ray cluster's (then ``node_cores`` is its largest node's CPUs,
    the most one worker can hold, and ``where`` says "on the Ray cluster" in the errors).
    """
    labels = candidate_labels(configs)
    out = []
    for label, cfg in zip(labels, configs, strict=True):
        if gpus:
            if cfg.workers > gpus:
                raise UsageError(f"candidate {label}: --workers {cfg.workers} is more than the {gpus} GPU(s) {where}")
            out.append(Candidate(label, cfg, home / "runs" / f"{prefix}-{label}", slots=cfg.workers))
            continue
        if node_cores is not None:
            check_cluster_fits(cfg, cores, node_cores, f"candidate {label}: --workers")
        elif cfg.workers > cores and not cfg.allow_oversubscribe:
            raise UsageError(
                f"candidate {label}: --workers {cfg.workers} is more than the {cores} cores here",
                hint="use fewer workers, or pass --allow-oversubscribe",
            )
        threads, slots = share_cores(cfg, len(configs), cores, node_cores)
        out.append(Candidate(label, cfg, home / "runs" / f"{prefix}-{label}", slots=slots, threads=threads))
    return out


def check_cluster_fits(cfg: TrainConfig, cpus: int, node_cores: int, setting: str) -> None:
    """Refuse a CPU job that a Ray cluster can never place: more workers than its CPUs, or a worker's threads more
    than its largest node has. ``setting`` names the workers as the user gave them (``--workers``).

    Unlike this host's cores, ``allow_oversubscribe`` cannot help: each Ray worker holds at least one CPU.
    """
    if cfg.workers > cpus:
        raise UsageError(
            f"{setting} {cfg.workers} is more than the {cpus} CPUs of the Ray cluster", hint="use fewer workers"
        )
    if cfg.threads_per_worker > node_cores:
        raise UsageError(
            f"threads_per_worker {cfg.threads_per_worker} is more than the {node_cores} CPUs of the largest Ray "
            "node: such a worker can never be placed",
            hint=f"set threads_per_worker to {node_cores} or less (0: share the CPUs)",
        )


def share_cores(cfg: TrainConfig, jobs: int, cores: int, node_cores: int | None = None) -> tuple[int, int]:
    """(threads per worker, cores held) of one of ``jobs`` CPU jobs like ``cfg`` sharing ``cores``.

    As many jobs as fit side by side share the cores; each worker gets an equal part of its job's share, but no
    more than ``node_cores`` (on Ray: a worker runs on one node, and holds its threads as that node's CPUs).
    """
    side_by_side = max(1, min(jobs, cores // max(1, cfg.workers)))
    threads = cfg.threads_per_worker or max(1, cores // side_by_side // cfg.workers)
    if node_cores is not None:
        threads = max(1, min(threads, node_cores))
    return threads, min(cores, cfg.workers * threads)


def run_candidates(
    configs: list[TrainConfig],
    workspace: Workspace,
    prefix: str,
    *,
    stream: TextIO = sys.stdout,
    poll_s: float = 1.0,
    cluster: ClusterConfig | None = None,
) -> list[Candidate]:
    """Run every candidate, as many at once as fit; returns them with their state, result or error.

    With ``cluster`` on Ray, "fit" is the cluster's CPUs (or GPUs), and each job's workers run where Ray puts them.
    """
    res = count_resources(cluster)
    cores, gpus = res.cores, res.gpus
    jobs = plan(configs, cores, gpus, prefix, workspace.home, node_cores=res.node_cores, where=res.where)
    from distml import tracking
    from distml.data.reader import open_path
    from distml.data.store import DatasetStore

    for name in sorted({open_path(DatasetStore(workspace).resolve(c.dataset)).name for c in configs}):
        tracking.ensure_experiment(workspace.home, f"distml-{name}")  # before jobs race to create it
    capacity = gpus or cores
    free_gpus = list(range(gpus))
    table = _Table(stream)
    try:
        while any(j.state in ("queued", "running") for j in jobs):
            for job in jobs:
                if job.state == "running" and job.proc is not None and job.proc.poll() is not None:
                    _finish(job)
                    free_gpus.extend(job.gpus)
            in_use = sum(j.slots for j in jobs if j.state == "running")
            for job in jobs:
                if job.state != "queued":
                    continue
                nothing_running = in_use == 0
                fits = in_use + job.slots <= capacity or job.config.allow_oversubscribe
                if fits or nothing_running:
                    if gpus:
                        job.gpus, free_gpus = free_gpus[: job.slots], free_gpus[job.slots :]
                    _start(job, workspace, res.cluster)
                    in_use += job.slots
            table.draw(jobs)
            if any(j.state == "running" for j in jobs):
                time.sleep(poll_s)
    except KeyboardInterrupt:
        for job in jobs:
            if job.proc is not None and job.proc.poll() is None:
                job.proc.terminate()
        for job in jobs:
            if job.proc is not None:
                job.proc.wait()
        raise
    table.draw(jobs, final=True)
    placed = placement_lines(j.run_dir for j in jobs) if res.cluster is not None else []
    if placed:  # on Ray: which node ran which rank of each job
        stream.write("where the jobs ran:\n" + "".join(f"  {line}\n" for line in placed))
    return jobs


def _start(job: Candidate, workspace: Workspace, cluster: ClusterConfig | None) -> None:
    job.proc = start_job(job.config, workspace, job.run_dir, job.threads, job.gpus, cluster=cluster)
    job.state, job.started = "running", time.monotonic()


def start_job(
    cfg: TrainConfig,
    workspace: Workspace,
    run_dir: Path,
    threads: int,
    gpus: list[int],
    env: Mapping[str, str] | None = None,
    cluster: ClusterConfig | None = None,
) -> subprocess.Popen[bytes]:
    """Start one candidate's job, ``python -m distml.train.candidates``, its output appended to ``<run>/train.log``.

    The process dies with its caller (and stops its workers then), so a killed scheduler or pipeline leaves no
    training running on into a run folder that the next invocation resumes. ``env`` is added to the job's
    environment (a search trial's MLflow parent run). ``cluster`` goes into ``candidate.json`` (``"cluster"``)
    and from there to the job's :func:`~distml.train.launch.train`: on Ray the job's workers run on the cluster,
    each given its GPU by Ray, so ``gpus`` (this host's devices) are not named to it.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    job_file = run_dir / "candidate.json"
    doc: dict[str, object] = {**cfg.model_dump(mode="json"), "threads_per_worker": threads}
    if cluster is not None:
        doc[CLUSTER_KEY] = cluster.model_dump(mode="json")
    job_file.write_text(json.dumps(doc, indent=2) + "\n")
    cmd = [sys.executable, "-m", "distml.train.candidates", str(workspace.home), str(job_file), run_dir.name]
    job_env = {**os.environ, **(env or {})}
    if gpus and not on_ray(cluster):
        job_env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
    with (run_dir / "train.log").open("ab") as log:
        log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
        log.flush()
        return subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=job_env, start_new_session=True, preexec_fn=die_with_parent()
        )


def _finish(job: Candidate) -> None:
    assert job.proc is not None
    job.ended = time.monotonic()
    result_file = job.run_dir / "result.json"
    if job.proc.returncode == 0 and result_file.is_file():
        job.state, job.result = "done", json.loads(result_file.read_text())
        return
    job.state = "failed"
    job.error = last_error(job.log) or f"exited with {job.proc.returncode}"


def last_error(log: Path) -> str | None:
    """The last ``error:`` line a job printed to its log (what ``distml train`` would have said), without the
    prefix; None when it printed none (it was killed, say) or the log is missing."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return None
    lines = [ln.removeprefix("error: ") for ln in text.splitlines() if ln.startswith("error:")]
    return lines[-1] if lines else None


def _live(job: Candidate) -> tuple[str, str, str, str]:
    """(epoch, validation accuracy, test accuracy, ETA) of a job from the files it writes."""
    epochs = job.config.epochs
    history: list[EpochRecord] = []
    with contextlib.suppress(OSError, ValueError):  # not written yet, or being replaced
        history = json.loads((job.run_dir / "history.json").read_text())
    epoch = f"{len(history)}/{epochs}"
    val = _percent(history[-1].get("val_accuracy")) if history else "-"
    acc = _percent(history[-1]["test_accuracy"]) if history else "-"
    eta = "-"
    if job.state == "running":
        try:
            tail = job.log.read_bytes()[-2000:].decode(errors="replace")
            found = _ETA.findall(tail)
            if found:
                eta = f"{found[-1][0]}m{found[-1][1]}s"
        except OSError:
            pass
    elif job.state in ("done", "failed"):
        eta = f"took {job.ended - job.started:.0f}s"
    return epoch, val, acc, eta


def _percent(value: float | None) -> str:
    """A percentage, or "-" when not measured (no epoch yet; NaN: no such split)."""
    return "-" if value is None or value != value else f"{value:.2%}"


class _Table:
    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.lines_drawn = 0
        self.last: dict[str, tuple[str, str]] = {}

    def draw(self, jobs: list[Candidate], final: bool = False) -> None:
        rows = [(j, *_live(j)) for j in jobs]
        if self.tty or final:
            text = [f"{'CANDIDATE':<22} {'STATE':<8} {'EPOCH':>7} {'VAL ACC':>8} {'TEST ACC*':>9}  ETA"]
            text += [f"{j.label:<22} {j.state:<8} {e:>7} {v:>8} {a:>9}  {t}" for j, e, v, a, t in rows]
            text.append("* test accuracy: reported, not used to choose (candidates are chosen on VAL ACC)")
            if self.tty and self.lines_drawn:
                self.stream.write(f"\x1b[{self.lines_drawn}F\x1b[J")  # back to the table's first line, clear
            self.stream.write("\n".join(text) + "\n")
            self.lines_drawn = len(text) if self.tty else 0
        else:
            for j, e, v, a, _ in rows:
                if self.last.get(j.label) != (j.state, e):
                    self.last[j.label] = (j.state, e)
                    self.stream.write(f"{j.label}: {j.state}, epoch {e}, val accuracy {v}, test accuracy {a}\n")
        self.stream.flush()


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _main(argv: list[str]) -> int:
    """One candidate's job in its own process: ``python -m distml.train.candidates HOME CONFIG RUN_NAME``."""
    from distml.errors import DistmlError
    from distml.train.launch import train

    home, config_file, run_name = Path(argv[0]), Path(argv[1]), argv[2]
    signal.signal(signal.SIGTERM, _interrupt)  # so torchrun and its workers are stopped too, not orphaned
    try:
        doc = json.loads(config_file.read_text())
        cluster_doc = doc.pop(CLUSTER_KEY, None)
        cluster = ClusterConfig.model_validate(cluster_doc) if cluster_doc is not None else None
        cfg = TrainConfig.model_validate(doc)
        result = train(cfg, Workspace(home), run_name, cluster=cluster)
    except DistmlError as exc:
        print(f"error: {exc.message}" + (f"; {exc.hint}" if exc.hint else ""), flush=True)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted; run again to resume from the last checkpoint", flush=True)
        return 130
    print(f"run {run_name}: test accuracy {result.metrics.get('test_accuracy')}", flush=True)
    return 0


def read_placement(run_dir: Path) -> list[Placement]:
    """Where each rank of the run's latest attempt ran, by rank; [] for a run without ``placement.json`` (local)."""
    try:
        ranks: list[Placement] = json.loads((run_dir / PLACEMENT_FILE).read_text())
    except (OSError, ValueError):
        return []
    return sorted(ranks, key=lambda r: r["rank"])


def placement_line(run_dir: Path) -> str | None:
    """``pl-cnn-1a2b: rank 0 on node 5f3c9a1e (127.0.0.1), rank 1 on node 0b7d44c2 (127.0.0.1)``, or None.

    Nodes are named by the first 8 hex digits of their Ray node id: on one machine every node has the same IP.
    """
    ranks = read_placement(run_dir)
    if not ranks:
        return None
    where = ", ".join(f"rank {r['rank']} on node {r['node_id'][:8]} ({r['node_ip']})" for r in ranks)
    attempt = max(r["attempt"] for r in ranks)
    return f"{run_dir.name}: {where}" + (f" (attempt {attempt + 1})" if attempt else "")


def placement_lines(run_dirs: Iterable[Path]) -> list[str]:
    """:func:`placement_line` of each run that has a ``placement.json``, in the order given, each run once."""
    seen: set[Path] = set()
    lines = []
    for run_dir in run_dirs:
        line = placement_line(run_dir) if run_dir not in seen else None
        seen.add(run_dir)
        if line:
            lines.append(line)
    return lines


def summarise(jobs: list[Candidate]) -> None:
    """Raise if no candidate succeeded; the caller prints the failures of a partial success."""
    if not any(j.state == "done" for j in jobs):
        details = "; ".join(f"{j.label}: {j.error} (log {j.log})" for j in jobs)
        raise TrainingError(f"no candidate succeeded: {details}")


if __name__ == "__main__":
    try:
        sys.exit(_main(sys.argv[1:]))
    finally:
        from distml._proc import skip_final_collection

        skip_final_collection()  # the pipeline's step waits for this process to end
