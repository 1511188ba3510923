"""The dataset store: atomic versions named by content, cheap checks on open, full verify, rank shards."""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import MnistFiles, make_mnist
from distml.data import DatasetStore, IngestResult, open_dataset, open_path
from distml.data.ingest import ingest
from distml.data.manifest import content_digest
from distml.data.sources import FashionMnistSource
from distml.errors import CorruptDatasetError, NotFoundError
from distml.files import write_atomic
from distml.workspace import Workspace


def _ingest(home: Path, files: MnistFiles, shard_bytes: int = 16 << 20, name: str | None = None) -> IngestResult:
    store = DatasetStore(Workspace(home), shard_bytes=shard_bytes)
    src = FashionMnistSource(home / "downloads", location=str(files.folder), spec=files.spec)
    return ingest(src, store=store, name=name)


def test_roundtrip_preserves_every_pixel_and_label(home: Path, mnist: MnistFiles) -> None:
    result = _ingest(home, mnist)
    ds = open_dataset("fashion-mnist", home=home)
    assert ds.digest == result.dataset.digest
    assert ds.image_shape == (28, 28, 1)
    assert ds.class_names == mnist.spec.class_names
    for split in ("train", "test"):
        arrays = ds.split(split).arrays()
        np.testing.assert_array_equal(arrays.images[..., 0], mnist.images[split])
        np.testing.assert_array_equal(arrays.labels, mnist.labels[split])
        assert arrays.labels.dtype == np.int64
    stats = ds.manifest.stats
    assert stats["mean"][0] == pytest.approx(mnist.images["train"].mean() / 255, abs=1e-6)
    assert stats["std"][0] == pytest.approx(mnist.images["train"].std() / 255, abs=1e-6)


def test_same_sources_give_the_same_digest_and_reingest_is_a_lookup(tmp_path: Path, mnist: MnistFiles) -> None:
    first = _ingest(tmp_path / "a", mnist)
    second = _ingest(tmp_path / "b", mnist)
    again = _ingest(tmp_path / "a", mnist)
    assert first.dataset.digest == second.dataset.digest == again.dataset.digest
    assert not first.reused and again.reused
    assert again.seconds < 0.5
    assert len(DatasetStore(Workspace(tmp_path / "a")).versions()) == 1


def test_different_content_or_name_gives_a_new_version(home: Path, tmp_path: Path, mnist: MnistFiles) -> None:
    other = make_mnist(tmp_path / "other", seed=1)
    a = _ingest(home, mnist)
    b = _ingest(home, other)
    c = _ingest(home, mnist, name="fmnist-copy")
    assert len({a.dataset.digest, b.dataset.digest, c.dataset.digest}) == 3
    # The name resolves to its newest version; a digest prefix to exactly one.
    assert open_dataset("fashion-mnist", home=home).digest in {a.dataset.digest, b.dataset.digest}
    assert open_dataset(c.dataset.digest[:8], home=home).name == "fmnist-copy"


@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
def test_rank_shards_partition_the_split(home: Path, mnist: MnistFiles, world_size: int) -> None:
    _ingest(home, mnist, shard_bytes=28 * 28 * 25)  # ~25 images per shard file -> several files
    split = open_dataset("fashion-mnist", home=home).split("train")
    assert len(split.info.shards) > 3
    parts = [split.shard(r, world_size) for r in range(world_size)]
    assert sum(len(p) for p in parts) == len(split)
    assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1
    np.testing.assert_array_equal(np.concatenate([p.images for p in parts])[..., 0], mnist.images["train"])
    np.testing.assert_array_equal(np.concatenate([p.labels for p in parts]), mnist.labels["train"])
    with pytest.raises(ValueError, match="rank"):
        split.shard(world_size, world_size)


def test_a_rank_touches_only_the_shard_files_it_overlaps(home: Path, mnist: MnistFiles) -> None:
    result = _ingest(home, mnist, shard_bytes=28 * 28 * 30)  # 120 train images -> 4 files of 30
    ds = result.dataset
    last = ds.manifest.splits["train"].shards[-1]
    # Garble the last shard in place (same size, so the cheap open check passes): rank 0 of 4 must not read it.
    path = ds.path / last.images
    path.write_bytes(b"\0" * path.stat().st_size)
    split = open_path(ds.path).split("train")
    np.testing.assert_array_equal(split.shard(0, 4).images[..., 0], mnist.images["train"][:30])
    with pytest.raises(CorruptDatasetError, match=last.images):
        split.shard(3, 4)


def test_to_torch_single_shard_shares_memory_and_multi_shard_is_exact(home: Path, mnist: MnistFiles) -> None:
    torch = pytest.importorskip("torch")
    _ingest(home, mnist)
    images, labels = open_dataset("fashion-mnist", home=home).split("train").to_torch()
    assert images.dtype == torch.uint8 and labels.dtype == torch.int64
    assert tuple(images.shape) == (120, 28, 28, 1)
    np.testing.assert_array_equal(images[..., 0].numpy(), mnist.images["train"])
    # Copy-on-write map: writing to the tensor must not change the stored shard.
    images[0] = 7
    again, _ = open_dataset("fashion-mnist", home=home).split("train").to_torch()
    np.testing.assert_array_equal(again[0, ..., 0].numpy(), mnist.images["train"][0])

    multi_home = home.parent / "multi"
    _ingest(multi_home, mnist, shard_bytes=28 * 28 * 50)
    images, labels = open_dataset("fashion-mnist", home=multi_home).split("train").to_torch()
    np.testing.assert_array_equal(images[..., 0].numpy(), mnist.images["train"])
    np.testing.assert_array_equal(labels.numpy(), mnist.labels["train"])


def test_manifest_edited_by_hand_is_refused_on_open(home: Path, mnist: MnistFiles) -> None:
    ds = _ingest(home, mnist).dataset
    manifest = ds.path / "manifest.json"
    doc = json.loads(manifest.read_text())
    doc["class_names"][0] = "renamed"
    manifest.write_text(json.dumps(doc))
    with pytest.raises(CorruptDatasetError, match="edited by hand"):
        open_dataset("fashion-mnist", home=home)


def test_shard_changed_on_disk_is_caught(home: Path, mnist: MnistFiles) -> None:
    ds = _ingest(home, mnist).dataset
    shard = ds.path / ds.manifest.splits["train"].shards[0].images
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # same size: only the full verify can see it
    shard.write_bytes(bytes(data))
    assert open_path(ds.path).verify() == [shard.name]
    shard.write_bytes(bytes(data[:-10]))  # truncated: every open sees it
    with pytest.raises(CorruptDatasetError, match="bytes, the manifest says"):
        open_path(ds.path)


def test_damaged_version_is_replaced_by_the_next_ingest(home: Path, mnist: MnistFiles) -> None:
    ds = _ingest(home, mnist).dataset
    (ds.path / ds.manifest.splits["test"].shards[0].labels).unlink()
    again = _ingest(home, mnist)
    assert not again.reused and again.dataset.digest == ds.digest
    assert open_path(ds.path).verify() == []


def test_unknown_refs_name_what_exists(home: Path, mnist: MnistFiles) -> None:
    with pytest.raises(NotFoundError, match="store is empty"):
        open_dataset("fashion-mnist", home=home)
    _ingest(home, mnist)
    with pytest.raises(NotFoundError, match=r"known: fashion-mnist"):
        open_dataset("mnist", home=home)
    with pytest.raises(NotFoundError, match="no split"):
        open_dataset("fashion-mnist", home=home).split("validation")


def test_stale_temp_folders_are_invisible_and_cleaned(home: Path, mnist: MnistFiles) -> None:
    stale = home / "datasets" / ".tmp-999999999-dead"
    stale.mkdir(parents=True)
    (stale / "train-00000-images.npy").write_bytes(b"partial")
    store = DatasetStore(Workspace(home))
    assert store.versions() == []
    _ingest(home, mnist)
    assert not stale.exists()


def _forge(ds_path: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    """Edit a manifest *and* recompute its digest and folder name, as an attacker could."""
    doc = json.loads((ds_path / "manifest.json").read_text())
    edit(doc)
    doc["digest"] = content_digest(doc)
    forged = ds_path.parent / doc["digest"]
    shutil.copytree(ds_path, forged)
    (forged / "manifest.json").write_text(json.dumps(doc))
    return forged


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["files"].update({"/etc/shadow": {"sha256": "0" * 64, "bytes": 1}}), "not a plain file name"),
        (lambda d: d["files"].update({"../escape.npy": {"sha256": "0" * 64, "bytes": 1}}), "not a plain file name"),
        (lambda d: next(iter(d["files"].values())).pop("bytes"), "no valid byte count"),
        (lambda d: next(iter(d["files"].values())).update({"sha256": "x"}), "no valid sha256"),
    ],
)
def test_forged_manifest_cannot_point_outside_its_folder(
    home: Path, mnist: MnistFiles, edit: Callable[[dict[str, Any]], None], message: str
) -> None:
    forged = _forge(_ingest(home, mnist).dataset.path, edit)
    with pytest.raises(CorruptDatasetError, match=message):
        open_path(forged)


def test_symlinked_shard_file_is_refused(home: Path, mnist: MnistFiles, tmp_path: Path) -> None:
    ds = _ingest(home, mnist).dataset
    shard = ds.path / ds.manifest.splits["test"].shards[0].labels
    outside = tmp_path / "outside.npy"
    shutil.move(shard, outside)
    shard.symlink_to(outside)
    with pytest.raises(CorruptDatasetError, match="symbolic link"):
        open_path(ds.path)


def test_shard_layout_is_part_of_the_source_key(home: Path, mnist: MnistFiles) -> None:
    big = _ingest(home, mnist)
    small = _ingest(home, mnist, shard_bytes=28 * 28 * 30)
    assert not small.reused
    assert small.dataset.digest != big.dataset.digest
    assert len(small.dataset.manifest.splits["train"].shards) == 4


def test_no_empty_shards_when_one_image_exceeds_the_shard_size(home: Path, mnist: MnistFiles) -> None:
    ds = _ingest(home, mnist, shard_bytes=1024).dataset  # one 784-byte image... and still never empty shards
    counts = [s.num_samples for s in ds.manifest.splits["test"].shards]
    assert min(counts) >= 1
    assert sum(counts) == 40


def test_the_newest_version_wins_even_within_one_second(home: Path, tmp_path: Path) -> None:
    digests = [_ingest(home, make_mnist(tmp_path / f"v{i}", seed=i)).dataset.digest for i in range(5)]
    assert open_dataset("fashion-mnist", home=home).digest == digests[-1]


def test_a_live_ingests_temp_folder_is_not_removed(home: Path, mnist: MnistFiles) -> None:
    store = DatasetStore(Workspace(home))
    with store.begin() as live:
        assert live.tmp.is_dir()
        assert store.remove_stale_temps() == []
        assert live.tmp.is_dir()
        _ingest(home, mnist)  # another ingest runs its own cleanup meanwhile
        assert live.tmp.is_dir()
    assert not live.tmp.exists()
    assert list((home / "datasets" / ".locks").iterdir()) == []


# -- write_atomic: the one way small files (manifests, indexes, cache entries, run records) are written -----------
def test_write_atomic_failure_keeps_the_old_content_and_leaves_no_temp_file(tmp_path: Path) -> None:
    """A real failed write (the file-size limit, EFBIG: what a full disk or a quota looks like to the writer)."""
    import resource

    target = tmp_path / "index.json"
    write_atomic(target, b"old content\n")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))  # Python ignores SIGXFSZ: the write raises EFBIG
    try:
        with pytest.raises(OSError, match="too large") as failed:
            write_atomic(target, b"x" * (1 << 20))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert failed.value.errno == errno.EFBIG
    assert target.read_bytes() == b"old content\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.json"]  # no .index.json.<pid>.tmp left


def test_write_atomic_fsyncs_the_file_then_its_folder_after_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rename is durable only once the folder is synced: watch the real calls, in order."""
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        events.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    write_atomic(tmp_path / "manifest.json", b"{}\n")
    assert events == ["fsync file", "rename", "fsync folder"]
    assert (tmp_path / "manifest.json").read_bytes() == b"{}\n"
