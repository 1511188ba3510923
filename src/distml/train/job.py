"""The job file a launcher writes and every worker reads: resolved config, dataset, where to write.

Also the resume rules, shared by the launcher (to refuse early, before any process starts) and the workers, and
the records a job writes back (``history.json``, ``result.json``), read by the launcher and the candidate table.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypedDict, get_args

from distml.config import TrainConfig
from distml.data.split import ValidationRecord
from distml.errors import ResumeError, UsageError
from distml.files import write_atomic

if TYPE_CHECKING:
    from distml.train.checkpoint import CheckpointState

JOB_FILE = "job.json"
# Fields that may change between a checkpoint and the job that resumes it; any other change is incompatible.
RESUMABLE_CHANGES = frozenset(
    {
        "epochs",
        "checkpoint_every_steps",
        "log_every_steps",
        "max_restarts",
        "allow_oversubscribe",
        "compile",
        "bucket_cap_mb",
        "threads_per_worker",
        "eval_test",  # when the test split is measured, not what is trained
    }
)

# Fields added after checkpoints were first written, with the value that does what a checkpoint without them did:
# such a checkpoint resumes as if it had them.
LATER_FIELDS: dict[str, object] = {"tta": "none", "eval_test": "epoch"}

# The per-epoch numbers that also go to MLflow and TensorBoard, in the order they are logged.
EpochMetric = Literal[
    "train_loss",
    "train_accuracy",
    "val_loss",
    "val_accuracy",
    "test_loss",
    "test_accuracy",
    "lr",
    "images_per_s",
    "seconds",
]
EPOCH_METRICS: tuple[EpochMetric, ...] = get_args(EpochMetric)


class EpochRecord(TypedDict):
    """One entry of ``history.json``, written by rank 0 at the end of each epoch."""

    epoch: int  # 1-based: the epoch just completed
    global_step: int
    train_loss: float  # the mean of step_losses
    train_accuracy: float
    val_loss: float  # on the validation split carved from train (distml.data.split); NaN without one
    val_accuracy: float
    test_loss: float  # NaN when the dataset has no test split, or before the last epoch with eval_test = "end"
    test_accuracy: float
    lr: float  # of the epoch's last step
    images_per_s: float  # training only, not evaluation
    seconds: float  # training and evaluation
    step_losses: list[float]  # global mean loss of each step this process ran (from resumed_at_step on)
    resumed_at_step: int  # 0, or the step of the epoch a resumed run started from


class RunResult(TypedDict):
    """``result.json``: what one worker process's training returns (the same on every rank)."""

    val_accuracy: float | None  # None when no epoch ran or there is no validation split (val_fraction 0)
    val_loss: float | None
    test_accuracy: float | None  # None when no epoch ran; reported, never used to choose a model
    test_loss: float | None
    validation: ValidationRecord  # which train images were held out (images 0 with val_fraction 0)
    tta: Literal["none", "flip"]  # how the val_* and test_* figures were predicted (as the exported model does)
    epochs: int
    global_step: int
    seconds: float
    parameters: int


@dataclass(frozen=True)
class Job:
    config: TrainConfig
    run_dir: Path
    dataset_path: Path
    dataset_digest: str
    world_size: int
    mlflow_uri: str | None = None
    mlflow_run_id: str | None = None

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / "checkpoints"

    def write(self) -> None:
        doc = {
            "config": self.config.model_dump(mode="json"),
            "dataset_path": str(self.dataset_path),
            "dataset_digest": self.dataset_digest,
            "world_size": self.world_size,
            "mlflow_uri": self.mlflow_uri,
            "mlflow_run_id": self.mlflow_run_id,
        }
        write_atomic(self.run_dir / JOB_FILE, (json.dumps(doc, indent=2) + "\n").encode())

    @classmethod
    def read(cls, run_dir: Path) -> Job:
        doc = json.loads((run_dir / JOB_FILE).read_text())
        return cls(
            config=TrainConfig.model_validate(doc["config"]),
            run_dir=run_dir,
            dataset_path=Path(doc["dataset_path"]),
            dataset_digest=doc["dataset_digest"],
            world_size=int(doc["world_size"]),
            mlflow_uri=doc.get("mlflow_uri"),
            mlflow_run_id=doc.get("mlflow_run_id"),
        )


def check_split(cfg: TrainConfig, train_images: int) -> None:
    """Refuse, before any process starts, a validation split that holds out nothing or leaves no batch to train on.

    ``train_images`` is the size of the dataset's train split, before the validation images are taken from it.
    """
    held_out = round(train_images * cfg.val_fraction)  # as distml.data.split.validation_indices takes them
    if cfg.val_fraction > 0 and held_out == 0 and train_images > 0:
        raise UsageError(
            f"val_fraction {cfg.val_fraction} of {train_images:,} train images holds out no image "
            f"(round({train_images:,} x {cfg.val_fraction}) = 0)",
            hint=f"set val_fraction = 0 to train on all of them, or at least {1 / train_images:.2g} for one image",
        )
    left = train_images - held_out
    if left >= cfg.batch_size:
        return
    if held_out == 0:
        raise UsageError(
            f"the train split has {train_images:,} images, fewer than one batch of {cfg.batch_size}",
            hint=f"use --batch-size {train_images} or smaller"
            if train_images
            else "ingest a dataset with train images",
        )
    fixes = ["set val_fraction = 0"] if train_images >= cfg.batch_size else []
    # The largest fraction that leaves one batch, rounded down so that it does.
    most = math.floor((train_images - cfg.batch_size) / train_images * 1000) / 1000
    if most > 0:
        fixes.append(f"set val_fraction to at most {most:g}")
    raise UsageError(
        f"val_fraction {cfg.val_fraction} holds out {held_out:,} of {train_images:,} train images and leaves "
        f"{left:,}, fewer than one batch of {cfg.batch_size}",
        hint=", or ".join([*fixes, f"use a --batch-size of {left} or less"]),
    )


def check_resume(state: CheckpointState, job: Job, checkpoint: str) -> None:
    """Raise ResumeError if the checkpoint ``state`` must not be continued by ``job``."""
    where = f"run {job.run_dir.name}: checkpoint {checkpoint}"
    if state.get("dataset_digest") != job.dataset_digest:
        raise ResumeError(
            f"{where} was trained on dataset {str(state.get('dataset_digest'))[:12]}, "
            f"this job uses {job.dataset_digest[:12]} (the dataset changed since)",
            hint="use a new --run-name, or the dataset version the run started with",
        )
    if state.get("world_size") != job.world_size:
        raise ResumeError(
            f"{where} was written by {state.get('world_size')} workers, this job has {job.world_size}",
            hint="resume with the same --workers, or use a new --run-name",
        )
    saved = {**LATER_FIELDS, **state.get("config", {})}
    current = job.config.model_dump(mode="json")
    changed = sorted(k for k in current if k not in RESUMABLE_CHANGES and saved.get(k) != current[k])
    if changed:
        diffs = ", ".join(f"{k} {saved.get(k)!r} -> {current[k]!r}" for k in changed)
        raise ResumeError(f"{where} has an incompatible config: {diffs}", hint="use a new --run-name to start over")
