"""Checkpoints: written to a temp name, fsynced and renamed; loaded with ``weights_only=True``.

A checkpoint holds everything needed to continue bit-exactly: model and optimizer state, epoch and step, the RNG
states, the resolved config, the world size and the dataset digest. The newest loadable checkpoint wins; a
corrupt newest one is skipped with a warning.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Required, TypedDict, cast

if TYPE_CHECKING:
    import torch

_NAME = re.compile(r"ckpt-(\d{6})-(\d{9})\.pt")
KEEP = 3


class CheckpointState(TypedDict, total=False):
    """What a checkpoint file holds (format 1).

    Loading checks only ``model``; :func:`distml.train.job.check_resume` checks the rest before a job continues.
    """

    model: Required[dict[str, torch.Tensor]]
    optimizer: dict[str, Any]  # torch's own optimizer state_dict format
    epoch: int  # completed epochs
    step_in_epoch: int
    global_step: int
    rng: dict[str, torch.Tensor]  # for inspection: randomness is re-derived from (seed, epoch, step)
    config: dict[str, object]  # the resolved TrainConfig, as JSON
    world_size: int
    dataset_digest: str
    format: int


def checkpoint_name(epoch: int, step: int) -> str:
    """``epoch`` = completed epochs, ``step`` = global optimizer steps taken so far."""
    return f"ckpt-{epoch:06d}-{step:09d}.pt"


def save_checkpoint(folder: Path, state: CheckpointState, *, epoch: int, step: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / checkpoint_name(epoch, step)
    tmp = folder / f".{final.name}.{os.getpid()}.tmp"
    import torch  # here, not at the top: a launcher lists checkpoints without loading torch (~1.8 CPU-s)

    try:
        with tmp.open("wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except BaseException:
        # A full disk or a state that cannot be saved: leave no partial file behind (a run that keeps failing
        # would otherwise fill the disk with them), and let the error go on.
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    for old in list_checkpoints(folder)[:-KEEP]:
        old.unlink(missing_ok=True)
    return final


def list_checkpoints(folder: Path) -> list[Path]:
    """Checkpoints in ``folder``, oldest first (by step, then epoch)."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(2)), int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.fullmatch(p.name))]
    return [p for _, _, p in sorted(found)]


def load_latest(folder: Path, warn: Callable[[str], None]) -> tuple[Path, CheckpointState] | None:
    """The newest checkpoint that loads, falling back past corrupt ones (with a warning for each)."""
    checkpoints = list_checkpoints(folder)
    if not checkpoints:
        return None  # without importing torch: a fresh run's launcher never needs it
    import torch

    for path in reversed(checkpoints):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # any failure to load means "corrupt": fall back
            warn(f"warning: checkpoint {path.name} cannot be loaded ({type(exc).__name__}: {exc}); trying an older one")
            continue
        if not isinstance(state, dict) or "model" not in state:
            warn(f"warning: checkpoint {path.name} is not a distml checkpoint; trying an older one")
            continue
        return path, cast(CheckpointState, state)
    return None
