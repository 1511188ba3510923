"""The training loop of one rank, top to bottom: data, model, optimizer, resume, epochs, checkpoints, results.

:func:`run` reads in one sitting: :func:`build` makes everything a rank needs (data, model, optimizer, the DDP
wrapper, tracker) and restores the newest checkpoint; then each epoch is :func:`start_epoch`, a
:func:`train_step` and :func:`after_step` per step, and :func:`end_of_epoch`. Their shared state is one
:class:`Training` and one :class:`Epoch`.

Everything random is a pure function of (seed, epoch, step, rank): the epoch order, augmentation and dropout.
Together with the model and optimizer state in the checkpoint, that makes a resumed run bit-identical on CPU
to one that never stopped, wherever it was interrupted.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
import torch.distributed as dist
import torch.nn.functional as F  # noqa: N812
from torch import nn

from distml.config import TrainConfig
from distml.data.reader import Dataset, open_path
from distml.data.split import ValidationRecord, validation_indices, validation_record
from distml.errors import ResumeError, TrainingError
from distml.files import write_atomic
from distml.train import shm_allreduce
from distml.train.batches import Batcher, EpochOrder, step_generator
from distml.train.checkpoint import CheckpointState, load_latest, save_checkpoint
from distml.train.dist import DistContext, RankLogger, usable_cores
from distml.train.evaluation import evaluate, share_buffers
from distml.train.job import EPOCH_METRICS, EpochRecord, Job, RunResult, check_resume
from distml.train.models import ModelSpec, build_model, count_parameters, for_prediction
from distml.train.schedule import lr_at
from distml.train.tracking import RankTracker


@dataclass
class Position:
    epoch: int = 0  # the epoch in progress (or the next to start)
    step_in_epoch: int = 0
    global_step: int = 0


@dataclass
class Training:
    """One rank's training as :func:`build` made it, and where it has got to."""

    job: Job
    ctx: DistContext
    log: RankLogger
    train: Batcher  # the train split less the validation images: all that training ever sees
    val: Batcher | None  # the validation images (None with val_fraction 0): what a search chooses on
    test: Batcher | None  # reported, never used to choose
    validation: ValidationRecord
    model: nn.Module  # the bare model: what checkpoints hold
    step_model: nn.Module  # what the steps call: the model, wrapped in DDP and/or compiled
    # What evaluation calls: the bare model (no DDP: its forward may hold a collective, which a rank with nothing
    # to evaluate would never join), behind the run's test-time augmentation, as the exported graph predicts.
    predictor: nn.Module
    optimizer: torch.optim.Optimizer
    order: EpochOrder
    autocast: AbstractContextManager[object]  # bfloat16 on a GPU, nothing on CPU
    tracker: RankTracker
    pos: Position
    history: list[EpochRecord]  # rank 0's history.json; empty on other ranks
    started: float  # time.perf_counter() when the first epoch began
    images_done: int = 0  # by all ranks since ``started``, for the progress line's rate

    @property
    def cfg(self) -> TrainConfig:
        return self.job.config

    @property
    def on_gpu(self) -> bool:
        return self.ctx.device.type == "cuda"

    @property
    def total_steps(self) -> int:
        return self.order.steps_per_epoch * self.cfg.epochs

    @property
    def warmup_steps(self) -> int:
        return int(self.cfg.warmup_epochs * self.order.steps_per_epoch)


@dataclass
class Epoch:
    """What one epoch accumulates on this rank until :func:`end_of_epoch` reduces it."""

    epoch: int  # 0-based
    perm: torch.Tensor  # the epoch's sample order, the same on every rank
    losses: torch.Tensor  # per step, on the device: read once at the end, not each step
    correct: torch.Tensor
    first_step: int  # 0, or the step a resumed run starts from
    started: float  # time.perf_counter() at its start
    lr: float = float("nan")  # of the latest step


def run(job: Job, ctx: DistContext) -> RunResult:
    """Train ``job`` as rank ``ctx.rank``; returns the final metrics (the same on every rank)."""
    t = build(job, ctx)
    while t.pos.epoch < t.cfg.epochs:
        ep = start_epoch(t)
        for s in range(ep.first_step, t.order.steps_per_epoch):
            loss = train_step(t, ep, s)
            after_step(t, ep, loss)
        end_of_epoch(t, ep)
    t.tracker.close()
    final = t.history[-1] if t.history else None
    return {
        "val_accuracy": _number(final["val_accuracy"]) if final else None,
        "val_loss": _number(final["val_loss"]) if final else None,
        "test_accuracy": final["test_accuracy"] if final else None,
        "test_loss": final["test_loss"] if final else None,
        "validation": t.validation,
        "tta": t.cfg.tta,
        "epochs": t.cfg.epochs,
        "global_step": t.pos.global_step,
        "seconds": time.perf_counter() - t.started,
        "parameters": count_parameters(t.model),
    }


def build(job: Job, ctx: DistContext) -> Training:
    """Data, model, optimizer and the DDP wrapper for this rank, resumed from the newest checkpoint if any."""
    cfg = job.config
    log = RankLogger(ctx)
    threads = cfg.threads_per_worker or max(1, usable_cores() // max(1, min(job.world_size, usable_cores())))
    torch.set_num_threads(threads)
    dataset = _open_dataset(job)
    on_gpu = ctx.device.type == "cuda"
    if on_gpu:
        torch.cuda.set_device(ctx.device)  # this rank's GPU is the current one: NCCL and the dropout seed use it
    train, val, test = _batchers(dataset, cfg, ctx)

    h, w, c = dataset.image_shape
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank (DDP also broadcasts rank 0's)
    spec = ModelSpec(c, h, w, dataset.num_classes)
    model: nn.Module = build_model(cfg.model, spec, width=cfg.width, dropout=cfg.dropout).to(ctx.device)
    # NHWC everywhere: oneDNN's convolutions take it without reordering (resnet-fast trains ~1.3x faster on one
    # CPU thread; the seed CNNs neither gain nor lose), and cuDNN's tensor-core kernels want it on a GPU.
    model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # stubs lack it
    optimizer = _optimizer(model, cfg)
    order = EpochOrder(len(train), cfg.batch_size, ctx.rank, job.world_size, cfg.seed)
    if order.steps_per_epoch < 1:
        raise TrainingError(f"the train split has {len(train)} samples, fewer than one batch of {cfg.batch_size}")
    pos = _resume(job, model, optimizer, log)

    step_model, allreduce = _wrap(model, ctx, cfg)
    predictor = for_prediction(model, cfg.tta)
    tta = ", flip test-time augmentation" if cfg.tta == "flip" else ""
    log.info(
        f"training {cfg.model} ({count_parameters(model):,} parameters) on "
        f"{dataset.name}@{dataset.manifest.short_digest}: {job.world_size} worker(s) x {order.local_batch} = "
        f"batch {cfg.batch_size}, {order.steps_per_epoch} steps/epoch, {cfg.epochs} epochs, "
        f"{len(val) if val else 0:,} validation images{tta}, "
        f"{allreduce} on {ctx.device}, "
        f"{threads} thread(s)/worker"
    )
    return Training(
        job=job,
        ctx=ctx,
        log=log,
        train=train,
        val=val,
        test=test,
        validation=validation_record(len(dataset.split("train")), cfg.val_fraction, cfg.val_seed),
        model=model,
        step_model=step_model,
        predictor=cast(nn.Module, torch.compile(predictor)) if cfg.compile else predictor,
        optimizer=optimizer,
        order=order,
        autocast=torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu else nullcontext(),
        tracker=RankTracker(ctx, tensorboard_dir=job.run_dir / "tensorboard"),
        pos=pos,
        history=_read_history(job.run_dir) if ctx.is_main and pos.global_step else [],
        started=time.perf_counter(),
    )


def start_epoch(t: Training) -> Epoch:
    """The epoch at ``t.pos``: its sample order and zeroed accumulators, from the step a resume left off at."""
    # On a GPU every per-step index and random draw stays on the device: a host-to-device copy of pageable
    # memory would wait for the queued work each step and stop the host from running ahead.
    perm = t.order.permutation(t.pos.epoch).to(t.ctx.device)
    t.model.train()
    return Epoch(
        epoch=t.pos.epoch,
        perm=perm,
        losses=torch.zeros(t.order.steps_per_epoch, dtype=torch.float64, device=t.ctx.device),
        correct=torch.zeros((), dtype=torch.float64, device=t.ctx.device),
        first_step=t.pos.step_in_epoch,
        started=time.perf_counter(),
    )


def train_step(t: Training, ep: Epoch, s: int) -> float:
    """Step ``s`` of the epoch: one optimizer step; returns the loss if it was read this step, else NaN."""
    cfg, ctx = t.cfg, t.ctx
    gen = step_generator(cfg.seed, 2, ep.epoch, s, ctx.rank)
    _seed_dropout(int(torch.randint(0, 2**62, (1,), generator=gen)), ctx.device)
    aug_gen = step_generator(cfg.seed, 3, ep.epoch, s, ctx.rank, device=ctx.device) if t.on_gpu else gen
    x, y = t.train.batch(t.order.indices(ep.perm, s), augment=cfg.augment, gen=aug_gen)
    lr = lr_at(
        t.pos.global_step, total_steps=t.total_steps, base_lr=cfg.lr, schedule=cfg.schedule, warmup_steps=t.warmup_steps
    )
    for group in t.optimizer.param_groups:
        group["lr"] = lr
    with t.autocast:
        logits = t.step_model(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
    # On a GPU, .item() every step would stall the device: read the loss only when it is printed.
    sampled = not t.on_gpu or (s + 1) % cfg.log_every_steps == 0
    value = loss.item() if sampled else float("nan")
    if sampled and not math.isfinite(value):
        raise TrainingError(
            f"loss is {value} at step {t.pos.global_step} (epoch {ep.epoch + 1}, step {s + 1} of the epoch)",
            hint="lower --lr, or check the data",
        )
    t.optimizer.zero_grad(set_to_none=True)
    loss.backward()  # type: ignore[no-untyped-call]
    t.optimizer.step()
    ep.losses[s] = loss.detach()
    ep.correct += (logits.argmax(1) == y).sum()
    ep.lr = lr
    t.pos.step_in_epoch, t.pos.global_step = s + 1, t.pos.global_step + 1
    t.images_done += cfg.batch_size
    return value


def after_step(t: Training, ep: Epoch, loss: float) -> None:
    """Every ``log_every_steps``: the progress line and step metrics; every ``checkpoint_every_steps``: a checkpoint."""
    cfg, step = t.cfg, t.pos.step_in_epoch
    if t.ctx.is_main and step % cfg.log_every_steps == 0:
        _progress(t, ep, loss)
        t.tracker.step(t.pos.global_step, loss, ep.lr)
    every = cfg.checkpoint_every_steps
    # Not at the epoch's last step: end_of_epoch checkpoints then, with the epoch's position.
    if every and t.pos.global_step % every == 0 and step < t.order.steps_per_epoch:
        _save(t)


def end_of_epoch(t: Training, ep: Epoch) -> EpochRecord:
    """Reduce the epoch over the ranks, evaluate, and (rank 0) checkpoint, record and print it."""
    record = _epoch_record(t, ep)
    t.tracker.epoch(record["epoch"], {k: float(record[k]) for k in EPOCH_METRICS})
    if t.ctx.is_main:
        _save(t)
        t.history.append(record)
        write_atomic(t.job.run_dir / "history.json", json.dumps(t.history).encode())
        t.log.info(
            f"epoch {record['epoch']}/{t.cfg.epochs}: train loss {record['train_loss']:.4f} "
            f"acc {record['train_accuracy']:.2%} | val loss {record['val_loss']:.4f} acc {record['val_accuracy']:.2%} "
            f"| {_test_text(record, t.test is not None)} "
            f"| {record['images_per_s']:,.0f} img/s | {record['seconds']:.1f} s"
        )
    return record


def _test_text(record: EpochRecord, has_test: bool) -> str:
    if not has_test:
        return "no test split"
    if math.isnan(record["test_accuracy"]):
        return "test: after the last epoch"  # eval_test = "end"
    return f"test loss {record['test_loss']:.4f} acc {record['test_accuracy']:.2%}"


def _epoch_record(t: Training, ep: Epoch) -> EpochRecord:
    """The epoch's global numbers (one all-reduce, then validation and test); moves ``t.pos`` to the next epoch."""
    if t.on_gpu:
        torch.cuda.synchronize(t.ctx.device)  # the queued steps belong to this epoch's time
    train_seconds = time.perf_counter() - ep.started
    sums = torch.cat([ep.losses, ep.correct.view(1)])
    if t.ctx.distributed:
        dist.all_reduce(sums)
    sums = sums.cpu()
    steps_run = t.order.steps_per_epoch - ep.first_step
    step_losses = (sums[:-1] / t.job.world_size)[ep.first_step :].tolist()
    train_acc = float(sums[-1]) / max(1, steps_run * t.cfg.batch_size)
    if t.ctx.distributed:
        share_buffers(t.model)
    val_loss, val_acc = _evaluate(t, t.val)
    last = ep.epoch + 1 == t.cfg.epochs
    test_loss, test_acc = _evaluate(t, t.test if t.cfg.eval_test == "epoch" or last else None)
    seconds = time.perf_counter() - ep.started
    t.pos.epoch, t.pos.step_in_epoch = ep.epoch + 1, 0
    return {
        "epoch": ep.epoch + 1,
        "global_step": t.pos.global_step,
        "train_loss": sum(step_losses) / max(1, len(step_losses)),
        "train_accuracy": train_acc,
        "val_loss": val_loss,
        "val_accuracy": val_acc,
        "test_loss": test_loss,
        "test_accuracy": test_acc,
        "lr": ep.lr,
        "images_per_s": steps_run * t.cfg.batch_size / train_seconds,
        "seconds": seconds,
        "step_losses": step_losses,
        "resumed_at_step": ep.first_step,
    }


def _open_dataset(job: Job) -> Dataset:
    dataset = open_path(job.dataset_path)
    if dataset.digest != job.dataset_digest:
        raise ResumeError(
            f"dataset at {job.dataset_path} is {dataset.digest[:12]}, the job expects {job.dataset_digest[:12]}"
        )
    return dataset


def _batchers(dataset: Dataset, cfg: TrainConfig, ctx: DistContext) -> tuple[Batcher, Batcher | None, Batcher | None]:
    """Train (less the validation images), validation (if any) and test (if any), held on this rank's device."""
    stats = dataset.manifest.stats

    def batcher(images: torch.Tensor, labels: torch.Tensor) -> Batcher:
        return Batcher(images, labels, mean=stats["mean"], std=stats["std"], device=ctx.device, channels_last=True)

    images, labels = dataset.split("train").to_torch()
    train_idx, val_idx = (torch.from_numpy(i) for i in validation_indices(len(labels), cfg.val_fraction, cfg.val_seed))
    val = batcher(images[val_idx], labels[val_idx]) if len(val_idx) else None
    train = batcher(images[train_idx], labels[train_idx]) if len(val_idx) else batcher(images, labels)
    test_split = dataset.splits.get("test")
    return train, val, (batcher(*test_split.to_torch()) if test_split is not None else None)


def _resume(job: Job, model: nn.Module, optimizer: torch.optim.Optimizer, log: RankLogger) -> Position:
    """Load the newest usable checkpoint into ``model`` and ``optimizer``; where it left off (or the start)."""
    loaded = load_latest(job.checkpoints, warn=log.info)
    if loaded is None:
        return Position()
    path, state = loaded
    check_resume(state, job, path.name)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    pos = Position(state["epoch"], state["step_in_epoch"], state["global_step"])
    log.info(f"resuming {job.run_dir.name} from {path.name} (epoch {pos.epoch + 1}, step {pos.global_step})")
    return pos


def _wrap(model: nn.Module, ctx: DistContext, cfg: TrainConfig) -> tuple[nn.Module, str]:
    """What the steps call (DDP over ``model`` when distributed, compiled if asked), and how gradients are reduced."""
    if not ctx.distributed:
        return (cast(nn.Module, torch.compile(model)) if cfg.compile else model), "one process"
    # Gradients as views into the all-reduce buckets: no copy into and out of the buckets each step.
    ddp = nn.parallel.DistributedDataParallel(
        model,
        device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
        gradient_as_bucket_view=True,
        bucket_cap_mb=cfg.bucket_cap_mb,
    )
    allreduce = f"{ctx.backend} all-reduce"
    if cfg.cpu_allreduce == "shm" and shm_allreduce.available(ctx):
        shm_allreduce.install(ddp, ctx, name=f"distml-grads-{ctx.job_id}-{ctx.restart}")
        allreduce = "shared-memory all-reduce"
    return (cast(nn.Module, torch.compile(ddp)) if cfg.compile else ddp), allreduce


def _seed_dropout(seed: int, device: torch.device) -> None:
    """Seed the stream dropout draws from in this step (on the device that runs the model).

    Only that one generator: ``torch.manual_seed`` also visits every other backend's generators and cost 66 µs
    a step here, over 1% of a seed-cnn step on CPU; this costs about 1 µs.
    """
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)  # the current device's generator
    else:
        torch.default_generator.manual_seed(seed)


def _evaluate(t: Training, data: Batcher | None) -> tuple[float, float]:
    """Loss and accuracy of the model in training on ``data``; NaN for a split the dataset does not have."""
    if data is None:
        return float("nan"), float("nan")
    return evaluate(t.predictor, data, t.ctx, t.job.world_size, t.autocast)


def _number(value: float) -> float | None:
    """``value``, or None for NaN (``result.json`` says "not measured" as null, not NaN)."""
    return None if math.isnan(value) else value


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # fused: one vectorised kernel per parameter instead of PyTorch's default on CPU, a loop of ~10 small ops per
    # parameter; the seed cnn trains 3-11% faster on this 2-core CPU (docs/performance.md), same math.
    lr, wd = cfg.lr, cfg.weight_decay
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=lr, momentum=cfg.momentum, nesterov=True, weight_decay=wd, fused=True
        )
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd, fused=True)


def _save(t: Training) -> None:
    """Checkpoint the model, optimizer and position (rank 0 only: every rank holds the same state)."""
    if not t.ctx.is_main:
        return
    state: CheckpointState = {
        "model": t.model.state_dict(),
        "optimizer": t.optimizer.state_dict(),
        "epoch": t.pos.epoch,
        "step_in_epoch": t.pos.step_in_epoch,
        "global_step": t.pos.global_step,
        # Randomness is re-derived from (seed, epoch, step); the generator states are kept for inspection.
        "rng": {"torch": torch.get_rng_state()},
        "config": t.job.config.model_dump(mode="json"),
        "world_size": t.job.world_size,
        "dataset_digest": t.job.dataset_digest,
        "format": 1,
    }
    save_checkpoint(t.job.checkpoints, state, epoch=t.pos.epoch, step=t.pos.global_step)


def _read_history(run_dir: Path) -> list[EpochRecord]:
    """The records of the epochs before a resume (the file this loop wrote); none if it is missing or torn."""
    try:
        return list(json.loads((run_dir / "history.json").read_text()))
    except (OSError, ValueError):
        return []


def _progress(t: Training, ep: Epoch, loss: float) -> None:
    """The progress line: where in the run, the loss and lr, the rate since the start and the time left."""
    cfg = t.cfg
    elapsed = time.perf_counter() - t.started
    rate = t.images_done / max(1e-9, elapsed)
    eta = (t.total_steps - t.pos.global_step) * cfg.batch_size / max(1e-9, rate)
    t.log.info(
        f"  epoch {ep.epoch + 1}/{cfg.epochs} step {t.pos.step_in_epoch}/{t.order.steps_per_epoch} loss {loss:.4f} "
        f"lr {ep.lr:.2e} {rate:,.0f} img/s ETA {int(eta // 60)}m{int(eta % 60):02d}s"
    )
