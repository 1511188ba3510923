"""The training loop of one rank, top to bottom: data, model, optimizer, resume, epochs, checkpoints, results.

Everything random is a pure function of (seed, epoch, step, rank): the epoch order, augmentation and dropout.
Together with the model and optimizer state in the checkpoint, that makes a resumed run bit-identical on CPU
to one that never stopped, wherever it was interrupted.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
import torch.nn.functional as F  # noqa: N812
from torch import nn

from distml.data import open_path
from distml.errors import ResumeError, TrainingError
from distml.files import write_atomic
from distml.train import shm_allreduce
from distml.train.batches import Batcher, EpochOrder, step_generator
from distml.train.checkpoint import load_latest, save_checkpoint
from distml.train.dist import DistContext, RankLogger, usable_cores
from distml.train.job import Job, check_resume
from distml.train.models import ModelSpec, build_model, count_parameters
from distml.train.schedule import lr_at
from distml.train.tracking import RankTracker

EVAL_BATCH = 1024
_EPOCH_METRICS = ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "lr", "images_per_s", "seconds")


@dataclass
class Position:
    epoch: int = 0  # the epoch in progress (or the next to start)
    step_in_epoch: int = 0
    global_step: int = 0


def run(job: Job, ctx: DistContext) -> dict[str, Any]:
    """Train ``job`` as rank ``ctx.rank``; returns the final metrics (the same on every rank)."""
    cfg = job.config
    log = RankLogger(ctx)
    threads = cfg.threads_per_worker or max(1, usable_cores() // max(1, min(job.world_size, usable_cores())))
    torch.set_num_threads(threads)

    dataset = open_path(job.dataset_path)
    if dataset.digest != job.dataset_digest:
        raise ResumeError(
            f"dataset at {job.dataset_path} is {dataset.digest[:12]}, the job expects {job.dataset_digest[:12]}"
        )
    stats = dataset.manifest.stats
    on_gpu = ctx.device.type == "cuda"
    if on_gpu:
        torch.cuda.set_device(ctx.device)  # this rank's GPU is the current one: NCCL and the dropout seed use it
    train_images, train_labels = dataset.split("train").to_torch()
    train = Batcher(
        train_images, train_labels, mean=stats["mean"], std=stats["std"], device=ctx.device, channels_last=on_gpu
    )
    test_split = dataset.splits.get("test")
    test = None
    if test_split is not None:
        ti, tl = test_split.to_torch()
        test = Batcher(ti, tl, mean=stats["mean"], std=stats["std"], device=ctx.device, channels_last=on_gpu)

    h, w, c = dataset.image_shape
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank (DDP also broadcasts rank 0's)
    model: nn.Module = build_model(cfg.model, ModelSpec(c, h, w, dataset.num_classes)).to(ctx.device)
    if on_gpu:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # stubs lack it
    optimizer = _optimizer(model, cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.momentum)
    order = EpochOrder(len(train), cfg.batch_size, ctx.rank, job.world_size, cfg.seed)
    if order.steps_per_epoch < 1:
        raise TrainingError(f"the train split has {len(train)} samples, fewer than one batch of {cfg.batch_size}")
    total_steps = order.steps_per_epoch * cfg.epochs
    warmup = int(cfg.warmup_epochs * order.steps_per_epoch)

    pos = Position()
    loaded = load_latest(job.checkpoints, warn=log.info)
    if loaded is not None:
        path, state = loaded
        check_resume(state, job, path.name)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        pos = Position(state["epoch"], state["step_in_epoch"], state["global_step"])
        log.info(f"resuming {job.run_dir.name} from {path.name} (epoch {pos.epoch + 1}, step {pos.global_step})")

    ddp: nn.Module = model
    allreduce = f"{ctx.backend} all-reduce" if ctx.distributed else "one process"
    if ctx.distributed:
        # Gradients as views into the all-reduce buckets: no copy into and out of the buckets each step.
        ddp = nn.parallel.DistributedDataParallel(
            model,
            device_ids=[ctx.device.index] if on_gpu else None,
            gradient_as_bucket_view=True,
            bucket_cap_mb=cfg.bucket_cap_mb,
        )
        if cfg.cpu_allreduce == "shm" and shm_allreduce.available(ctx):
            shm_allreduce.install(ddp, ctx, name=f"distml-grads-{ctx.job_id}-{ctx.restart}")
            allreduce = "shared-memory all-reduce"
    step_model = cast(nn.Module, torch.compile(ddp)) if cfg.compile else ddp
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu else nullcontext()
    log.info(
        f"training {cfg.model} ({count_parameters(model):,} parameters) on "
        f"{dataset.name}@{dataset.manifest.short_digest}: {job.world_size} worker(s) x {order.local_batch} = "
        f"batch {cfg.batch_size}, {order.steps_per_epoch} steps/epoch, {cfg.epochs} epochs, "
        f"{allreduce} on {ctx.device}, "
        f"{threads} thread(s)/worker"
    )

    tracker = RankTracker(
        ctx, uri=job.mlflow_uri, run_id=job.mlflow_run_id, tensorboard_dir=job.run_dir / "tensorboard"
    )
    history: list[dict[str, Any]] = _read_history(job.run_dir) if ctx.is_main and pos.global_step else []
    run_start = time.perf_counter()
    images_done = 0
    while pos.epoch < cfg.epochs:
        epoch = pos.epoch
        # On a GPU every per-step index and random draw stays on the device: a host-to-device copy of pageable
        # memory would wait for the queued work each step and stop the host from running ahead.
        perm = order.permutation(epoch).to(ctx.device)
        model.train()
        losses = torch.zeros(order.steps_per_epoch, dtype=torch.float64, device=ctx.device)
        correct = torch.zeros((), dtype=torch.float64, device=ctx.device)
        first_step = pos.step_in_epoch
        epoch_start = time.perf_counter()
        for s in range(first_step, order.steps_per_epoch):
            gen = step_generator(cfg.seed, 2, epoch, s, ctx.rank)
            _seed_dropout(int(torch.randint(0, 2**62, (1,), generator=gen)), ctx.device)
            aug_gen = step_generator(cfg.seed, 3, epoch, s, ctx.rank, device=ctx.device) if on_gpu else gen
            x, y = train.batch(order.indices(perm, s), augment=cfg.augment, gen=aug_gen)
            lr = lr_at(
                pos.global_step, total_steps=total_steps, base_lr=cfg.lr, schedule=cfg.schedule, warmup_steps=warmup
            )
            for group in optimizer.param_groups:
                group["lr"] = lr
            with autocast:
                logits = step_model(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
            # On a GPU, .item() every step would stall the device: read the loss only when it is printed.
            sampled = not on_gpu or (s + 1) % cfg.log_every_steps == 0
            value = loss.item() if sampled else float("nan")
            if sampled and not math.isfinite(value):
                raise TrainingError(
                    f"loss is {value} at step {pos.global_step} (epoch {epoch + 1}, step {s + 1} of the epoch)",
                    hint="lower --lr, or check the data",
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            losses[s] = loss.detach()
            correct += (logits.argmax(1) == y).sum()
            pos.step_in_epoch, pos.global_step = s + 1, pos.global_step + 1
            images_done += cfg.batch_size
            if ctx.is_main and (s + 1) % cfg.log_every_steps == 0:
                _progress(
                    log, cfg, epoch, s + 1, order.steps_per_epoch, value, lr, images_done, run_start, pos, total_steps
                )
                tracker.step(pos.global_step, value, lr)
            if (
                cfg.checkpoint_every_steps
                and pos.global_step % cfg.checkpoint_every_steps == 0
                and s + 1 < order.steps_per_epoch
            ):
                _save(ctx, job, model, optimizer, pos)
        if on_gpu:
            torch.cuda.synchronize(ctx.device)  # the queued steps belong to this epoch's time
        train_seconds = time.perf_counter() - epoch_start
        # Epoch end: global per-step losses and train accuracy (one all-reduce), then the test split.
        sums = torch.cat([losses, correct.view(1)])
        if ctx.distributed:
            dist.all_reduce(sums)
        sums = sums.cpu()
        steps_run = order.steps_per_epoch - first_step
        step_losses = (sums[:-1] / job.world_size)[first_step:].tolist()
        train_acc = float(sums[-1]) / max(1, steps_run * cfg.batch_size)
        test_loss, test_acc = (
            evaluate(step_model, test, ctx, job.world_size, autocast) if test else (float("nan"), float("nan"))
        )
        seconds = time.perf_counter() - epoch_start
        pos.epoch, pos.step_in_epoch = epoch + 1, 0
        record = {
            "epoch": epoch + 1,
            "global_step": pos.global_step,
            "train_loss": sum(step_losses) / max(1, len(step_losses)),
            "train_accuracy": train_acc,
            "test_loss": test_loss,
            "test_accuracy": test_acc,
            "lr": lr,
            "images_per_s": steps_run * cfg.batch_size / train_seconds,  # training only, not evaluation
            "seconds": seconds,
            "step_losses": step_losses,
            "resumed_at_step": first_step,
        }
        tracker.epoch(epoch + 1, {k: float(v) for k, v in record.items() if k in _EPOCH_METRICS})
        if ctx.is_main:
            _save(ctx, job, model, optimizer, pos)
            history.append(record)
            write_atomic(job.run_dir / "history.json", json.dumps(history).encode())
            log.info(
                f"epoch {epoch + 1}/{cfg.epochs}: train loss {record['train_loss']:.4f} acc {train_acc:.2%} | "
                f"test loss {test_loss:.4f} acc {test_acc:.2%} | {record['images_per_s']:,.0f} img/s | {seconds:.1f} s"
            )
    tracker.close()
    final = history[-1] if history else {}
    return {
        "test_accuracy": final.get("test_accuracy"),
        "test_loss": final.get("test_loss"),
        "epochs": cfg.epochs,
        "global_step": pos.global_step,
        "seconds": time.perf_counter() - run_start,
        "parameters": count_parameters(model),
    }


def _seed_dropout(seed: int, device: torch.device) -> None:
    """Seed the stream dropout draws from in this step (on the device that runs the model).

    Only that one generator: ``torch.manual_seed`` also visits every other backend's generators and cost 66 µs
    a step here, over 1% of a seed-cnn step on CPU; this costs about 1 µs.
    """
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)  # the current device's generator
    else:
        torch.default_generator.manual_seed(seed)


def evaluate(model: nn.Module, data: Batcher, ctx: DistContext, world_size: int, autocast: Any) -> tuple[float, float]:
    """Loss and accuracy on the whole split: each rank takes a contiguous part, sums are all-reduced."""
    n = len(data)
    lo, hi = ctx.rank * n // world_size, (ctx.rank + 1) * n // world_size
    sums = torch.zeros(3, dtype=torch.float64, device=ctx.device)
    model.eval()
    with torch.no_grad(), autocast:
        for start in range(lo, hi, EVAL_BATCH):
            idx = torch.arange(start, min(hi, start + EVAL_BATCH), device=ctx.device)
            x, y = data.batch(idx)
            logits = model(x).float()
            sums[0] += F.cross_entropy(logits, y, reduction="sum").double()
            sums[1] += (logits.argmax(1) == y).sum()
            sums[2] += len(y)
    model.train()
    if ctx.distributed:
        dist.all_reduce(sums)
    total = max(1.0, float(sums[2]))
    return float(sums[0]) / total, float(sums[1]) / total


def _optimizer(model: nn.Module, name: str, lr: float, wd: float, momentum: float) -> torch.optim.Optimizer:
    # fused: one vectorised kernel per parameter instead of PyTorch's default on CPU, a loop of ~10 small ops per
    # parameter; the seed cnn trains 3-11% faster on this 2-core CPU (docs/performance.md), same math.
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, nesterov=True, weight_decay=wd,
                               fused=True)  # fmt: skip
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd, fused=True)


def _save(ctx: DistContext, job: Job, model: nn.Module, optimizer: torch.optim.Optimizer, pos: Position) -> None:
    if not ctx.is_main:
        return
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": pos.epoch,
        "step_in_epoch": pos.step_in_epoch,
        "global_step": pos.global_step,
        # Randomness is re-derived from (seed, epoch, step); the generator states are kept for inspection.
        "rng": {"torch": torch.get_rng_state()},
        "config": job.config.model_dump(mode="json"),
        "world_size": job.world_size,
        "dataset_digest": job.dataset_digest,
        "format": 1,
    }
    save_checkpoint(job.checkpoints, state, epoch=pos.epoch, step=pos.global_step)


def _read_history(run_dir: Path) -> list[dict[str, Any]]:
    try:
        return list(json.loads((run_dir / "history.json").read_text()))
    except (OSError, ValueError):
        return []


def _progress(
    log: RankLogger, cfg: Any, epoch: int, step: int, steps: int, loss: float, lr: float,
    images: int, start: float, pos: Position, total_steps: int,
) -> None:  # fmt: skip
    elapsed = time.perf_counter() - start
    rate = images / max(1e-9, elapsed)
    eta = (total_steps - pos.global_step) * cfg.batch_size / max(1e-9, rate)
    log.info(
        f"  epoch {epoch + 1}/{cfg.epochs} step {step}/{steps} loss {loss:.4f} lr {lr:.2e} "
        f"{rate:,.0f} img/s ETA {int(eta // 60)}m{int(eta % 60):02d}s"
    )
