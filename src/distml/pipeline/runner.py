"""A small local DAG runner: cached steps, run concurrently as the cores allow, with a record of every run.

For each step, once the steps it needs have finished, the runner computes its key (:class:`KeyParts`) and
either takes the cache entry (after verifying it: ``hit``) or runs it (``ran``, with the reason). Steps whose
needs are met run at the same time while their core budget fits (a training job takes ``workers x threads``
cores, or its GPUs); the others take none. A failed step stops the steps after it; independent steps finish
and keep their results. Ctrl-C (or SIGTERM) stops the running steps, records them as interrupted and exits;
the next run finds the finished steps in the cache and the interrupted training resumes from its checkpoint.

The run record, ``<home>/pipeline/runs/<id>/run.json`` (:class:`~distml.pipeline.outcome.RunRecord`), is
rewritten (atomically) at every change: the resolved config, the DAG, each step's status, cache decision and
reason, timings, outputs and key metric, and at the end the lineage from dataset to champion. One run per
workspace at a time: :func:`~distml.pipeline.lock.workspace_lock`.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, TextIO

from distml.errors import DistmlError, PipelineError
from distml.files import write_atomic
from distml.pipeline.cache import (
    Entry,
    KeyParts,
    StepCache,
    bookkeeping_error,
    explain_miss,
    file_record,
    verify_files,
)
from distml.pipeline.lock import workspace_lock as workspace_lock  # its old home: callers may import it from here
from distml.pipeline.outcome import Outcome, RunRecord

if TYPE_CHECKING:
    from distml.pipeline.steps import StepResult

Log = Callable[[str], None]


@dataclass
class StepContext:
    """What a step's function gets: its key, the outputs of the steps it needs, a log, and a process slot."""

    name: str
    parts: KeyParts
    upstream: dict[str, dict[str, Any]]
    log: Log
    runner: Runner
    threads: int = 1
    gpus: list[int] = field(default_factory=list)
    forced: bool = False  # --force / --no-cache: start over, do not build on an earlier attempt

    @property
    def key(self) -> str:
        return self.parts.key

    def started(self, proc: subprocess.Popen[bytes]) -> None:
        """Register a child process, so that an interrupted run stops it."""
        self.runner.track(proc)


@dataclass
class Step:
    name: str
    needs: tuple[str, ...]
    code: tuple[str, ...]  # root modules of the step's code (their import closure is hashed)
    libs: tuple[str, ...]
    params: dict[str, Any]
    inputs: Callable[[dict[str, dict[str, Any]], dict[str, dict[str, Any]]], dict[str, str]]  # (outputs, files)
    run: Callable[[StepContext], StepResult]
    verify: Callable[[dict[str, Any]], str | None] | None = None  # more checks of a hit's outputs
    cores: int = 0  # cores it holds while it runs (CPU training jobs)
    gpus: int = 0
    threads: int = 1
    progress: Callable[[str], str] | None = None  # a live line while it runs (given its key)
    log_path: Callable[[str], Path] | None = None  # where its output goes (by key), when not the run's log
    # Why a miss must run, in the step's own words (None: the parts that differ, as explain_miss says them).
    explain: Callable[[KeyParts, list[Entry]], str | None] | None = None
    # What a hit should add, from its cached outputs (e.g. that a budget ended the cached study early).
    explain_hit: Callable[[dict[str, Any]], str | None] | None = None


def key_parts(step: Step, upstream: dict[str, dict[str, Any]], files: dict[str, dict[str, Any]]) -> KeyParts:
    """What a step's cache key hashes: its code, parameters, input digests (from ``upstream``) and libraries.

    The runner decides hits with it; ``distml step key`` prints it for Argo's ``memoize`` (the same key).
    """
    from distml.pipeline.cache import library_versions
    from distml.pipeline.codever import code_version

    return KeyParts(
        step.name, code_version(step.code), step.params, step.inputs(upstream, files), library_versions(step.libs)
    )


class Runner:
    def __init__(
        self,
        steps: list[Step],
        *,
        home: Path,
        config: dict[str, Any],
        force: set[str] = frozenset(),  # type: ignore[assignment]
        no_cache: bool = False,
        cores: int = 1,
        gpus: int = 0,
        stream: TextIO | None = None,
        argv: list[str] | None = None,
    ) -> None:
        self.steps = {s.name: s for s in steps}
        self.order = [s.name for s in steps]
        self.width = max(len(n) for n in self.order)
        self.cache = StepCache(home / "pipeline" / "cache")
        self.force, self.no_cache = force, no_cache
        self.cores, self.gpus = cores, gpus
        self.stream = stream or sys.stdout  # looked up now, so a redirected stdout is honoured
        self.id = time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)
        self.dir = home / "pipeline" / "runs" / self.id
        self.outcomes = {name: Outcome() for name in self.order}
        self._procs: list[subprocess.Popen[bytes]] = []
        self._lock = threading.Lock()
        self._save_lock = threading.Lock()
        self._gpus_of: dict[str, list[int]] = {}  # step -> the GPUs it was given
        self._parts: dict[str, KeyParts] = {}  # step -> its key, once decided
        self.record: RunRecord = {
            "id": self.id,
            "argv": argv or sys.argv,
            "pid": os.getpid(),
            "started": time.time(),
            "ended": None,
            "status": "running",
            "config": config,
            "dag": {s.name: list(s.needs) for s in steps},
            "steps": {},
            "lineage": {},
        }

    # -- output ----------------------------------------------------------------------------------------------
    def say(self, text: str) -> None:
        with self._lock:
            self.stream.write(text + "\n")
            self.stream.flush()

    def track(self, proc: subprocess.Popen[bytes]) -> None:
        with self._lock:
            self._procs.append(proc)

    def save(self, finished: tuple[Outcome, dict[str, Any]] | None = None) -> None:
        """Rewrite the run record, or raise :class:`PipelineError` naming it and why it cannot be written.

        ``finished`` is a step's outcome and its final fields: they are written first and set on the outcome
        only once the record holds them, so no step after it starts on a result the record does not show.
        """
        path = self.dir / "run.json"
        with self._save_lock:  # steps finish on their own threads; one writer at a time
            steps = {n: {k: v for k, v in vars(o).items() if not k.startswith("_")} for n, o in self.outcomes.items()}
            if finished is not None:
                name = next(n for n, o in self.outcomes.items() if o is finished[0])
                steps[name].update(finished[1])
            self.record["steps"] = steps
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
                write_atomic(path, (json.dumps(self.record, indent=2, default=str) + "\n").encode())
            except OSError as exc:
                raise bookkeeping_error("the run record", path, exc) from None
            if finished is not None:
                for key, value in finished[1].items():
                    setattr(finished[0], key, value)

    def _try_save(self) -> None:
        """Save where a failure must not stop the runner: the final save rewrites everything, or raises."""
        with contextlib.suppress(PipelineError):
            self.save()

    # -- execution -------------------------------------------------------------------------------------------
    def execute(self) -> dict[str, Outcome]:
        """Run the DAG to the end (or the first failure's dependents); returns every step's outcome."""
        self.save()
        threads: dict[str, threading.Thread] = {}
        previous_sigterm = signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            while True:
                progressed = self._schedule(threads)
                for name, thread in list(threads.items()):
                    if not thread.is_alive():
                        thread.join()
                        del threads[name]
                        progressed = True
                if not threads and not progressed:
                    break
                if threads and not progressed:
                    self._show_progress()
                    time.sleep(0.2)
        except KeyboardInterrupt:
            self._interrupt(threads)
            raise
        finally:
            signal.signal(signal.SIGTERM, previous_sigterm)
        for name, out in self.outcomes.items():
            if out.status in ("waiting", "running"):  # its thread ended without a result: never call that done
                self._fail(name, out, f"the step ended without a result (status {out.status})")
        # A run is done only if every step is: a skipped step is as unfinished as a failed one.
        self.record["status"] = "done" if all(o.status == "done" for o in self.outcomes.values()) else "failed"
        self.record["ended"] = time.time()
        self.save()
        from distml.pipeline.record import lineage

        self.record["lineage"] = lineage(self.record["steps"])
        self.save()
        return self.outcomes

    def _schedule(self, threads: dict[str, threading.Thread]) -> bool:
        """Decide every step that can be decided now; start those that run and fit. True if anything changed."""
        changed = False
        for name in self.order:
            out, step = self.outcomes[name], self.steps[name]
            if out.status != "waiting":
                continue
            needs = [self.outcomes[n] for n in step.needs]
            blocked = [n for n in step.needs if self.outcomes[n].status in ("failed", "skipped", "interrupted")]
            if blocked:
                out.status, out.why = "skipped", f"{blocked[0]} did not finish"
                self.say(f"{name:<{self.width}} skipped: {out.why}")
                changed = True
                continue
            if any(o.status != "done" for o in needs):
                continue
            if not out.key and not self._decide(name, step, out):
                changed = True
                continue
            if not self._fits(step):
                continue
            out.status, out.started = "running", time.time()
            ctx = StepContext(
                name,
                self._parts[name],
                self._upstream(step),
                self._step_log(name),
                self,
                threads=step.threads,
                forced=self._forced(name),
            )
            if step.gpus:
                ctx.gpus = self._gpus_of[name] = self._take_gpus(step.gpus)
            thread = threading.Thread(target=self._run_step, args=(step, ctx), name=f"step-{name}", daemon=True)
            threads[name] = thread
            thread.start()
            self._try_save()
            changed = True
        return changed

    def _decide(self, name: str, step: Step, out: Outcome) -> bool:
        """Compute the key and take a verified hit (-> False: decided) or note why it must run (-> True)."""
        upstream = self._upstream(step)
        files = {n: self.outcomes[n].files for n in step.needs}
        try:
            parts = key_parts(step, upstream, files)
        except DistmlError as exc:
            self._fail(name, out, _reason(exc))
            return False
        self._parts[name] = parts
        out.key = parts.key
        forced = self._forced(name)
        entry = None if forced else self.cache.get(name, parts.key)
        if entry is not None:
            problem = verify_files(entry.files) or (step.verify(entry.outputs) if step.verify else None)
            if problem is None:
                out.status, out.cache, out.outputs, out.files = "done", "hit", entry.outputs, entry.files
                said = step.explain_hit(entry.outputs) if step.explain_hit else None
                out.why = f"same inputs as run {entry.run_id}" + (f"; {said}" if said else "")
                out.metric = entry.outputs.get("_metric", "")
                self.say(f"{name:<{self.width}} hit: {out.why}" + (f"  [{out.metric}]" if out.metric else ""))
                try:
                    self.save()
                except PipelineError as exc:  # the steps after it start on a hit the record must show
                    self._fail(name, out, _reason(exc))
                return False
            self.cache.drop(name, parts.key)
            out.why = f"the cached result failed verification: {problem}"
        elif forced:
            out.why = "--no-cache" if self.no_cache else "--force"
        else:
            earlier = self.cache.entries(name)
            own = step.explain(parts, earlier) if step.explain else None
            out.why = own or explain_miss(parts, earlier[0] if earlier else None)
        out.cache = "ran"
        return True

    def _forced(self, name: str) -> bool:
        return self.no_cache or name in self.force or name.split("[")[0] in self.force

    def _fits(self, step: Step) -> bool:
        running = [self.steps[n] for n, o in self.outcomes.items() if o.status == "running"]
        if step.gpus:
            return sum(s.gpus for s in running) + step.gpus <= self.gpus or not any(s.gpus for s in running)
        used = sum(s.cores for s in running)
        return used + step.cores <= self.cores or used == 0

    def _take_gpus(self, n: int) -> list[int]:
        """GPUs no running step holds (a step's GPUs are free again once it is no longer running)."""
        busy = {g for name, gs in self._gpus_of.items() if self.outcomes[name].status == "running" for g in gs}
        return [g for g in range(self.gpus) if g not in busy][:n]

    def _upstream(self, step: Step) -> dict[str, dict[str, Any]]:
        return {n: self.outcomes[n].outputs for n in step.needs}

    def _step_log(self, name: str) -> Log:
        """Print a step's progress line, and keep it in the step's log file (steps that run in this process)."""
        path = self.dir / "logs" / f"{_safe(name)}.log"

        def log(text: str) -> None:
            text = text.strip("\n").rstrip()  # leading spaces kept: they align a table's rows (the trial table)
            self.say(f"  {name}: {text}")
            if self.steps[name].log_path is None:
                path.parent.mkdir(parents=True, exist_ok=True)
                with path.open("a") as fh:
                    fh.write(f"{time.strftime('%H:%M:%S')} {text}\n")

        return log

    def _run_step(self, step: Step, ctx: StepContext) -> None:
        """A step's thread: whatever goes wrong, the step ends failed with a reason, never silently "running"."""
        out = self.outcomes[step.name]
        try:
            self._run_step_body(step, ctx, out)
        except Exception as exc:  # the runner's own bookkeeping (or a bug in it): the step did not finish
            self._fail(step.name, out, _reason(exc))

    def _run_step_body(self, step: Step, ctx: StepContext, out: Outcome) -> None:
        self.say(f"{step.name:<{self.width}} ran: {out.why}")
        started = time.perf_counter()
        log_file = step.log_path(ctx.key) if step.log_path else self.dir / "logs" / f"{_safe(step.name)}.log"
        out.log = str(log_file)
        try:
            result = step.run(ctx)
            files = {label: file_record(path) for label, path in result.files.items()}
        except DistmlError as exc:
            if step.log_path is None:
                _append(log_file, f"{time.strftime('%H:%M:%S')} error: {_reason(exc)}\n")
            self._fail(step.name, out, _reason(exc))
            return
        except KeyboardInterrupt:
            return
        except Exception as exc:  # a bug: keep the traceback in the step's log, say where it is
            _append(log_file, traceback.format_exc())
            self._fail(step.name, out, _reason(exc))
            return
        seconds = time.perf_counter() - started
        if out.status == "interrupted":
            return
        outputs = {**result.outputs, "_metric": result.metric}
        why = out.why + (f"; {result.note}" if result.note else "")
        # Bookkeeping: a result that is not in the cache and the record is not done (the next run redoes it).
        try:
            self.cache.put(Entry(step.name, ctx.key, ctx.parts.to_json(), outputs, files, self.id, seconds, note=why))
            self.save(
                finished=(
                    out,
                    {
                        "status": "done",
                        "outputs": outputs,
                        "files": files,
                        "seconds": seconds,
                        "metric": result.metric,
                        "why": why,
                    },
                )
            )
        except PipelineError as exc:
            out.seconds = seconds
            self._fail(step.name, out, _reason(exc))
            return
        self.say(
            f"{step.name:<{self.width}} done in {seconds:.1f} s"
            + (f": {result.metric}" if result.metric else "")
            + (f" ({result.note})" if result.note else "")
        )

    def _fail(self, name: str, out: Outcome, error: str) -> None:
        if out.status == "interrupted":  # its process was stopped by us: not a failure of the step
            return
        out.status, out.error = "failed", error
        if out.started:
            out.seconds = time.time() - out.started
        self.say(f"{name:<{self.width}} FAILED: {error}" + (f"\n{'':<{self.width}} log: {out.log}" if out.log else ""))
        self._try_save()

    def _show_progress(self) -> None:
        for name, out in self.outcomes.items():
            step = self.steps[name]
            if out.status == "running" and step.progress is not None:
                line = step.progress(out.key)
                if line and line != getattr(out, "_shown", None):
                    out._shown = line  # type: ignore[attr-defined]
                    self.say(f"  {name}: {line}")

    def _interrupt(self, threads: dict[str, threading.Thread]) -> None:
        for out in self.outcomes.values():
            if out.status == "running":
                out.status, out.error = "interrupted", "interrupted"
                out.seconds = time.time() - out.started
        with self._lock:
            procs = list(self._procs)
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 30
        for proc in procs:
            with contextlib.suppress(Exception):
                proc.wait(max(0.1, deadline - time.monotonic()))
            if proc.poll() is None:
                proc.kill()
        self.record["status"] = "interrupted"
        self.record["ended"] = time.time()
        self._try_save()  # the interrupt is what the user must hear about


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _reason(exc: BaseException) -> str:
    """One line saying why, for a step's error field and the FAILED line."""
    if isinstance(exc, DistmlError):
        return exc.message + (f" ({exc.hint})" if exc.hint else "")
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    return f"{type(exc).__name__}: {exc}"


def _append(path: Path, text: str) -> None:
    """Add to a step's log; a log that cannot be written must not hide the error being logged."""
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as fh:
            fh.write(text)


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
