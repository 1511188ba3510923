"""What a trial's run folder says: where it is, its epochs so far, its error, whether its job let go of it.

The tuner reads these files while the trial's job writes them (``history.json`` is replaced atomically, so a read
sees the last complete version or nothing yet).
"""

from __future__ import annotations

import glob
import json
import math
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from distml.errors import TrainingError

if TYPE_CHECKING:
    from distml.config import TrainConfig
    from distml.search.result import StudyResult
    from distml.train.job import EpochRecord

_ETA = re.compile(r"ETA (\d+)m(\d+)s")


def trial_run_name(study: str, number: int) -> str:
    """``<S>-t<NNN>``: the run name (and folder under ``<home>/runs``) of trial ``number`` of ``study``."""
    return f"{study}-t{number:03d}"


def trial_run_dir(home: Path, study: str, number: int) -> Path:
    """``<home>/runs/<S>-t<NNN>``: where trial ``number`` of ``study`` trains."""
    return home / "runs" / trial_run_name(study, number)


def trial_runs(home: Path, study: str) -> list[Path]:
    """The run folders of ``study``'s trials that exist, by number (not those of a study named ``<S>-t001``)."""
    runs = home / "runs"
    pattern = re.compile(re.escape(study) + r"-t\d{3,}")
    if not runs.is_dir():
        return []
    return sorted(p for p in runs.glob(f"{glob.escape(study)}-t*") if pattern.fullmatch(p.name) and p.is_dir())


def wait_for_run(run_dir: Path, say: Callable[[str], None], timeout_s: float = 90.0) -> None:
    """Wait until the interrupted job of a run has let go of its folder (it stops when the tuner dies, not at once).

    Without this, restarting the trial right after a kill could find the folder still locked by the job that is
    saving and stopping, and record a failure that is none.
    """
    from distml.train.runlock import lock_run

    if not run_dir.is_dir():  # killed before its job started
        return
    deadline = time.monotonic() + timeout_s
    said = False
    while True:
        try:
            lock_run(run_dir).release()
            return
        except TrainingError:
            if time.monotonic() > deadline:
                raise
            if not said:
                say(f"waiting for the interrupted job in {run_dir.name} to stop")
                said = True
            time.sleep(0.5)


def read_history(run_dir: Path) -> list[EpochRecord]:
    """The epochs the run has finished so far (``history.json``), or none yet."""
    try:
        records: list[EpochRecord] = json.loads((run_dir / "history.json").read_text())
    except (OSError, ValueError):  # not written yet, or being replaced
        return []
    return records


def new_epochs(history: list[EpochRecord], after: int) -> list[EpochRecord]:
    """The records of epochs after epoch ``after``, in epoch order, each once (the last record of an epoch wins).

    By the ``epoch`` field, not by position: a job killed between its checkpoint and its history write resumes
    past an epoch the file never got, so position ``n`` is not always epoch ``n + 1``.
    """
    latest = {int(rec["epoch"]): rec for rec in history if int(rec["epoch"]) > after}
    return [latest[epoch] for epoch in sorted(latest)]


def last_epoch(history: list[EpochRecord]) -> EpochRecord | None:
    """The record of the latest epoch, or None before the first."""
    return max(history, key=lambda rec: int(rec["epoch"])) if history else None


def recorded_config(run_dir: Path) -> TrainConfig | None:
    """The config a trial's job ran with (its ``job.json``), or None when no job got as far as writing it.

    An interrupted trial resumes with it: its checkpoint only fits those settings (the workers, say), whatever
    ``[train]`` says now.
    """
    from distml.train.job import JOB_FILE, Job

    if not (run_dir / JOB_FILE).is_file():
        return None
    try:
        return Job.read(run_dir).config
    except (OSError, ValueError, KeyError):  # torn or from another version: the trial starts from [train]
        return None


def metric_of(rec: EpochRecord, metric: str) -> float:
    """One epoch's ``metric`` (``val_accuracy``...), NaN when the record lacks it."""
    value = rec.get(metric)
    return float(value) if isinstance(value, int | float) else math.nan


def finite(rec: EpochRecord | None, key: str) -> float | None:
    """``key`` of ``rec`` when it is a finite number, else None (as a trial's user attr)."""
    if rec is None:
        return None
    value = metric_of(rec, key)
    return value if math.isfinite(value) else None


def read_text(path: Path) -> str | None:
    """A small file's stripped text, or None when it is missing or empty."""
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def first_eta(result: StudyResult) -> str:
    """`` (trial 0's first epoch was to take 1m20s)`` from the ETA its log printed, when it printed one."""
    for rec in result.trials:
        found = _ETA.findall(read_text(Path(rec["run_dir"]) / "train.log") or "") if rec["run_dir"] else []
        if found:
            return f" (trial {rec['number']}'s first epoch was to take about {found[-1][0]}m{found[-1][1]}s)"
    return ""
