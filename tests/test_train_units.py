"""Training building blocks: models for any shape, the epoch order, augmentation, schedules, checkpoints."""

from __future__ import annotations

import json
import mmap
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from distml.errors import UsageError
from distml.train.batches import Batcher, EpochOrder, random_crop, step_generator
from distml.train.checkpoint import KEEP, list_checkpoints, load_latest, save_checkpoint
from distml.train.models import MODELS, ModelSpec, build_model
from distml.train.schedule import lr_at
from distml.train.shm_allreduce import SHM_DIR


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize(("channels", "size"), [(1, 28), (3, 32), (3, 20)])
def test_every_model_takes_the_datasets_shape(name: str, channels: int, size: int) -> None:
    model = build_model(name, ModelSpec(channels, size, size, 10)).eval()
    assert model(torch.zeros(2, channels, size, size)).shape == (2, 10)


def test_unknown_model_names_the_choices() -> None:
    with pytest.raises(UsageError, match="unknown model 'vgg'.*cnn, cnn-dropout, cnn-batchnorm, resnet, resnet-small"):
        build_model("vgg", ModelSpec(1, 28, 28, 10))


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_epoch_order_sees_each_sample_once_across_ranks(world_size: int) -> None:
    orders = [EpochOrder(1000, 64, r, world_size, seed=3) for r in range(world_size)]
    perm = orders[0].permutation(5)
    seen = torch.cat([o.indices(perm, s) for s in range(orders[0].steps_per_epoch) for o in orders])
    assert len(seen) == len(set(seen.tolist())) == 15 * 64  # 1000 // 64 full global batches, no repeats
    assert not torch.equal(orders[0].permutation(5), orders[0].permutation(6))  # reshuffled every epoch
    assert torch.equal(perm, EpochOrder(1000, 64, 0, world_size, seed=3).permutation(5))  # and reproducible


def test_batch_is_normalised_and_crop_keeps_the_shape() -> None:
    images = torch.randint(0, 256, (10, 6, 5, 3), dtype=torch.uint8)
    batcher = Batcher(images, torch.arange(10), mean=[0.5] * 3, std=[0.25] * 3, device=torch.device("cpu"))
    x, y = batcher.batch(torch.tensor([0, 3]))
    assert x.shape == (2, 3, 6, 5) and y.tolist() == [0, 3]
    expected = (images[0].permute(2, 0, 1).float() / 255 - 0.5) / 0.25
    assert torch.allclose(x[0], expected, atol=1e-5)
    cropped = random_crop(x, pad=2, gen=step_generator(0, 1))
    assert cropped.shape == x.shape
    again = random_crop(x, pad=2, gen=step_generator(0, 1))
    assert torch.equal(cropped, again)  # a pure function of the generator's seed


def test_crop_moves_pixels_by_at_most_the_padding() -> None:
    x = torch.zeros(64, 1, 9, 9)
    x[:, :, 4, 4] = 1.0
    out = random_crop(x, pad=2, gen=step_generator(1, 2))
    where = out[:, 0].flatten(1).argmax(1)
    rows, cols = where // 9, where % 9
    assert rows.min() >= 2 and rows.max() <= 6 and cols.min() >= 2 and cols.max() <= 6
    assert len(set(zip(rows.tolist(), cols.tolist(), strict=True))) > 5


@pytest.mark.parametrize("schedule", ["constant", "step", "cosine", "onecycle"])
def test_schedules_are_pure_and_bounded(schedule: str) -> None:
    lrs = [lr_at(s, total_steps=100, base_lr=0.1, schedule=schedule) for s in range(100)]
    assert max(lrs) <= 0.1 + 1e-12 and min(lrs) >= 0
    assert lrs == [lr_at(s, total_steps=100, base_lr=0.1, schedule=schedule) for s in range(100)]
    if schedule != "constant":
        assert lrs[-1] < lrs[len(lrs) // 4]


def test_checkpoints_are_atomic_rotated_and_safe_to_load(tmp_path: Path) -> None:
    for step in range(1, 6):
        save_checkpoint(tmp_path, {"model": {"w": torch.full((2,), float(step))}}, epoch=step, step=step * 10)
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert len(names) == KEEP and names[-1] == "ckpt-000005-000000050.pt"
    assert not list(tmp_path.glob(".*.tmp"))
    # A pickle that would run code is refused by weights_only loading and skipped like any corrupt file.
    import pickle

    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (print, ("owned",))

    (tmp_path / "ckpt-000009-000000090.pt").write_bytes(pickle.dumps({"model": Evil()}))
    warnings: list[str] = []
    loaded = load_latest(tmp_path, warn=warnings.append)
    assert loaded is not None and loaded[0].name == "ckpt-000005-000000050.pt"
    assert "ckpt-000009-000000090.pt cannot be loaded" in warnings[0]


def test_rendezvous_flags_go_to_torchrun_unchanged() -> None:
    from distml.train.launch import Rendezvous

    # One host: no --standalone (its rendezvous store listens on every interface); a file store instead, and
    # 127.0.0.1 as the workers' MASTER_ADDR. test_train.py checks the sockets of a real job.
    assert Rendezvous().torchrun_args("run", Path("/private/store")) == [
        "--nnodes=1", "--rdzv-backend=c10d", "--rdzv-endpoint=/private/store", "--rdzv-conf=store_type=file",
        "--rdzv-id=run", "--local-addr=127.0.0.1",
    ]  # fmt: skip
    assert Rendezvous(nnodes=2, node_rank=1, endpoint="10.0.0.1:29400").torchrun_args("run") == [
        "--nnodes=2", "--node-rank=1", "--rdzv-backend=c10d", "--rdzv-endpoint=10.0.0.1:29400", "--rdzv-id=run",
        "--rdzv-conf=is_host=0",
    ]  # fmt: skip
    assert Rendezvous(nnodes=2, node_rank=0, endpoint="10.0.0.1:29400").torchrun_args("run")[-1] == (
        "--rdzv-conf=is_host=1"  # node 0 serves the rendezvous: no guessing from the endpoint's host name
    )
    with pytest.raises(UsageError, match="--rdzv-endpoint"):
        Rendezvous(nnodes=2).torchrun_args("run")


def _torchrun(tmp_path: Path, nproc: int, *args: str) -> list[str]:
    """torchrun on this host as ``distml train`` runs it: rendezvous and process group on loopback only."""
    from distml.train.launch import Rendezvous

    flags = Rendezvous().torchrun_args("test", tmp_path / "rdzv-store")
    return [sys.executable, "-m", "torch.distributed.run", *flags, f"--nproc-per-node={nproc}", *args]


def _torchrun_env() -> dict[str, str]:
    from distml.train.launch import _SINGLE_HOST_ENV

    return {**os.environ, **_SINGLE_HOST_ENV, "OMP_NUM_THREADS": "1"}


_SHM_WORKER = str(Path(__file__).with_name("_shm_allreduce_worker.py"))
x86_only = pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64"), reason="the shm path is x86-64 only"
)


@x86_only
def test_shared_memory_allreduce_matches_gloo_on_three_ranks(tmp_path: Path) -> None:
    # Three real processes under torchrun, 60 buckets of varied sizes: the mean equals gloo's all-reduce / W,
    # every rank gets the same values, a bucket over capacity is refused, and nothing is left in /dev/shm.
    before = set(SHM_DIR.glob("distml-test-*"))
    proc = subprocess.run(
        _torchrun(tmp_path, 3, _SHM_WORKER), capture_output=True, text=True, timeout=120, env=_torchrun_env()
    )
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert proc.returncode == 0 and line is not None, proc.stderr[-3000:]
    result = json.loads(line.split(" ", 1)[1])
    assert result["max_abs_diff"] <= 1e-6  # summation order differs from gloo's ring for W=3
    assert result["too_big"] == "refused"
    assert set(SHM_DIR.glob("distml-test-*")) == before


def _can_mount_private_tmpfs() -> bool:
    try:
        probe = ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /dev/shm"]
        return subprocess.run(probe, capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@x86_only
@pytest.mark.skipif(not _can_mount_private_tmpfs(), reason="needs unshare -rm (user and mount namespaces)")
def test_a_too_small_dev_shm_is_a_clear_error_not_a_sigbus(tmp_path: Path) -> None:
    # A real 1 MiB tmpfs over /dev/shm, in a mount namespace of this test's own; two ranks need 16 MB of slots.
    # Without the pages reserved up front, rank 1's first write lands past the end of the tmpfs: SIGBUS.
    command = shlex.join([*_torchrun(tmp_path, 2, _SHM_WORKER), "--capacity", "1000000"])
    proc = subprocess.run(
        ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs /dev/shm && exec {command}"],
        capture_output=True, text=True, timeout=120, env=_torchrun_env(),
    )  # fmt: skip
    errors = sorted(ln for ln in proc.stdout.splitlines() if ln.startswith("ERROR "))
    assert proc.returncode != 0
    assert len(errors) == 2, f"each rank should report the error\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    assert errors[0].startswith("ERROR rank 0: cannot reserve 15.3 MiB in /dev/shm for the shared-memory all-reduce")
    assert "No space left on device" in errors[0] and 'cpu_allreduce = "gloo"' in errors[0]
    assert errors[1] == "ERROR rank 1: local rank 0 could not create the shared-memory gradient segment (see its error)"
    assert "SIGBUS" not in proc.stderr


def test_a_rank_waiting_for_a_hung_peer_sleeps_and_gives_up(monkeypatch: pytest.MonkeyPatch) -> None:
    from distml.errors import TrainingError
    from distml.train import shm_allreduce

    def rank0() -> shm_allreduce.SharedGradients:
        flags = np.zeros(2, dtype=np.int64)
        return shm_allreduce.SharedGradients(0, 2, 1, flags, torch.zeros(2, 2, 1), mmap.mmap(-1, 4096))

    # A peer that arrives late: the wait ends soon after it does (sleeps are a fraction of the time waited).
    state = rank0()
    timer = threading.Timer(0.3, lambda: state.flags.__setitem__(1, 1))
    timer.start()
    start = time.monotonic()
    state._barrier(1)
    assert 0.3 <= time.monotonic() - start < 0.6
    timer.join()

    # A peer that never arrives: the rank gives up after the timeout, having slept, not spun, all the while.
    monkeypatch.setattr(shm_allreduce, "WAIT_TIMEOUT_S", 1.5)
    state = rank0()
    cpu, start = time.thread_time(), time.monotonic()
    with pytest.raises(TrainingError, match="rank 0 waited .* s for the other workers"):
        state._barrier(1)
    wall, cpu = time.monotonic() - start, time.thread_time() - cpu
    assert 1.5 <= wall < 3.0
    assert cpu < 0.25, f"{cpu:.2f} s of CPU in {wall:.2f} s of waiting: a busy wait"


def test_a_checkpoint_that_fails_to_save_leaves_no_temp_file(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, {"model": {"w": torch.ones(2)}}, epoch=1, step=10)
    unsaveable = {"model": {"w": torch.ones(2)}, "lock": threading.Lock()}  # pickling fails midway through
    with pytest.raises(TypeError, match="lock"):
        save_checkpoint(tmp_path, unsaveable, epoch=2, step=20)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-000001-000000010.pt"]


# -- the validation split ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "fraction"), [(1000, 0.1), (7, 0.5), (60000, 0.1), (1, 0.3)])
def test_the_validation_split_is_deterministic_disjoint_and_covers_train(n: int, fraction: float) -> None:
    from distml.data.split import validation_indices, validation_record

    train_idx, val_idx = validation_indices(n, fraction, seed=3)
    again_train, again_val = validation_indices(n, fraction, seed=3)
    assert np.array_equal(train_idx, again_train) and np.array_equal(val_idx, again_val)
    assert train_idx.dtype == val_idx.dtype == np.int64
    assert len(val_idx) == round(n * fraction)
    assert np.all(np.diff(train_idx) > 0) and np.all(np.diff(val_idx) > 0)  # sorted, no repeats
    assert not set(train_idx.tolist()) & set(val_idx.tolist())
    assert np.array_equal(np.sort(np.concatenate([train_idx, val_idx])), np.arange(n))
    record = validation_record(n, fraction, 3)
    assert record["images"] == len(val_idx) and record["fraction"] == fraction and record["seed"] == 3
    assert record == validation_record(n, fraction, 3)


def test_the_validation_split_depends_on_its_seed_and_fraction_zero_is_empty() -> None:
    from distml.data.split import validation_indices, validation_record

    _, a = validation_indices(1000, 0.1, seed=0)
    _, b = validation_indices(1000, 0.1, seed=1)
    assert not np.array_equal(a, b)
    assert validation_record(1000, 0.1, 0)["indices_sha256"] != validation_record(1000, 0.1, 1)["indices_sha256"]
    train_idx, val_idx = validation_indices(1000, 0.0, seed=0)
    assert len(val_idx) == 0 and np.array_equal(train_idx, np.arange(1000))
    assert validation_record(1000, 0.0, 0)["images"] == 0
    # Pinned: the same numpy draws on any machine, so a recorded split can be recomputed and compared later.
    assert validation_indices(10, 0.3, seed=0)[1].tolist() == [2, 4, 6]


_REFUSED_SPLITS = [
    (
        40,
        0.01,
        32,
        "val_fraction 0.01 of 40 train images holds out no image (round(40 x 0.01) = 0); set val_fraction "
        "= 0 to train on all of them, or at least 0.025 for one image",
    ),
    (3000, 0.0001, 32, "or at least 0.00033 for one image"),
    (
        256,
        0.9,
        32,
        "val_fraction 0.9 holds out 230 of 256 train images and leaves 26, fewer than one batch of 32; "
        "set val_fraction = 0, or set val_fraction to at most 0.875, or use a --batch-size of 26 or less",
    ),
    (40, 0.5, 64, "leaves 20, fewer than one batch of 64; use a --batch-size of 20 or less"),
    (20, 0.0, 32, "the train split has 20 images, fewer than one batch of 32; use --batch-size 20 or smaller"),
]


@pytest.mark.parametrize(("n", "fraction", "batch", "needle"), _REFUSED_SPLITS)
def test_a_validation_split_that_holds_out_nothing_or_leaves_no_batch_is_refused(
    n: int, fraction: float, batch: int, needle: str
) -> None:
    from distml.config import TrainConfig
    from distml.data.split import validation_indices
    from distml.train.job import check_split

    with pytest.raises(UsageError) as refused:
        check_split(TrainConfig(val_fraction=fraction, batch_size=batch), n)
    assert needle in f"{refused.value.message}; {refused.value.hint}"
    # The fractions the hint offers do what it says, by the split's own arithmetic.
    for offered in (0.025, 0.00033, 0.875):
        if f"{offered} " in f"{refused.value.hint} ":
            train_idx, val_idx = validation_indices(n, offered, seed=0)
            assert len(val_idx) >= 1 and len(train_idx) >= batch


@pytest.mark.parametrize(("n", "fraction", "batch"), [(40, 0.025, 32), (60000, 0.1, 256), (32, 0.0, 32), (10, 0.1, 9)])
def test_a_validation_split_with_an_image_and_a_batch_left_is_accepted(n: int, fraction: float, batch: int) -> None:
    from distml.config import TrainConfig
    from distml.train.job import check_split

    check_split(TrainConfig(val_fraction=fraction, batch_size=batch), n)
