"""Training building blocks: models for any shape, the epoch order, augmentation, schedules, checkpoints."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

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

    assert Rendezvous().torchrun_args("run") == ["--standalone"]
    assert Rendezvous(nnodes=2, node_rank=1, endpoint="10.0.0.1:29400").torchrun_args("run") == [
        "--nnodes=2", "--node-rank=1", "--rdzv-backend=c10d", "--rdzv-endpoint=10.0.0.1:29400", "--rdzv-id=run",
        "--rdzv-conf=is_host=0",
    ]  # fmt: skip
    assert Rendezvous(nnodes=2, node_rank=0, endpoint="10.0.0.1:29400").torchrun_args("run")[-1] == (
        "--rdzv-conf=is_host=1"  # node 0 serves the rendezvous: no guessing from the endpoint's host name
    )
    with pytest.raises(UsageError, match="--rdzv-endpoint"):
        Rendezvous(nnodes=2).torchrun_args("run")


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="the shm path is x86-64 only")
def test_shared_memory_allreduce_matches_gloo_on_three_ranks() -> None:
    # Three real processes under torchrun, 60 buckets of varied sizes: the mean equals gloo's all-reduce / W,
    # every rank gets the same values, a bucket over capacity is refused, and nothing is left in /dev/shm.
    before = set(SHM_DIR.glob("distml-test-*"))
    worker = Path(__file__).with_name("_shm_allreduce_worker.py")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=3", str(worker)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert proc.returncode == 0 and line is not None, proc.stderr[-3000:]
    result = json.loads(line.split(" ", 1)[1])
    assert result["max_abs_diff"] <= 1e-6  # summation order differs from gloo's ring for W=3
    assert result["too_big"] == "refused"
    assert set(SHM_DIR.glob("distml-test-*")) == before
