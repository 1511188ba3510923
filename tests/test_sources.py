"""Sources: every bad input gives a clear project error and leaves no dataset behind."""

from __future__ import annotations

import gzip
import io
import struct
import tarfile
import zlib
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import MnistFiles, idx_bytes, make_cifar, make_image_folder
from distml.data import DatasetStore, IngestResult, open_dataset
from distml.data.ingest import ingest
from distml.data.sources import Cifar10Source, FashionMnistSource, FolderOptions, FolderSource, Source
from distml.data.sources.safetar import TarLimits, iter_regular_files
from distml.errors import BadImageError, ChecksumError, FormatError, SourceNotFoundError, UnsafeArchiveError, UsageError
from distml.workspace import Workspace


def _run(home: Path, source: Source) -> IngestResult:
    return ingest(source, store=DatasetStore(Workspace(home)))


def _fashion(home: Path, files: MnistFiles) -> FashionMnistSource:
    return FashionMnistSource(home / "downloads", location=str(files.folder), spec=files.spec)


def _assert_no_dataset(home: Path) -> None:
    store = DatasetStore(Workspace(home))
    assert store.versions() == []
    assert not list(store.root.glob(".tmp-*")) if store.root.exists() else True


# -- Fashion-MNIST (IDX) -------------------------------------------------------------------------------------------


def test_truncated_gz_is_a_format_error(home: Path, mnist: MnistFiles) -> None:
    path = mnist.folder / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(FormatError, match="train-labels-idx1-ubyte.gz: corrupt or truncated gzip"):
        _run(home, _fashion(home, mnist))
    _assert_no_dataset(home)


def test_wrong_checksum_is_refused(home: Path, mnist: MnistFiles) -> None:
    content = idx_bytes(np.ones(len(mnist.labels["test"]), dtype=np.uint8))  # valid IDX, other labels
    (mnist.folder / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(content))
    with pytest.raises(ChecksumError, match="t10k-labels-idx1-ubyte.gz"):
        _run(home, _fashion(home, mnist))
    _assert_no_dataset(home)


def test_recompressed_file_is_accepted_by_content_checksum(home: Path, mnist: MnistFiles) -> None:
    path = mnist.folder / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes()), compresslevel=1, mtime=123))
    assert _run(home, _fashion(home, mnist)).dataset.split("train").info.num_samples == 120


def test_published_gz_md5_is_accepted(home: Path, mnist: MnistFiles) -> None:
    # A spec whose content sha256 is unknown but whose .gz MD5 matches: the MD5 alone vouches for the file.
    files = tuple(replace(f, sha256="0" * 64) for f in mnist.spec.files)
    mnist.spec = replace(mnist.spec, files=files)
    assert _run(home, _fashion(home, mnist)).dataset.split("test").info.num_samples == 40


def test_uncompressed_idx_files_are_accepted(home: Path, mnist: MnistFiles) -> None:
    for gz in mnist.folder.glob("*.gz"):
        gz.with_suffix("").write_bytes(gzip.decompress(gz.read_bytes()))
        gz.unlink()
    assert _run(home, _fashion(home, mnist)).dataset.num_classes == 10


def _rewrite(files: MnistFiles, name: str, content: bytes) -> None:
    """Replace one source file and make the spec accept it, so only the format check can object."""
    gz = gzip.compress(content)
    (files.folder / name).write_bytes(gz)
    import hashlib

    files.spec = replace(
        files.spec,
        files=tuple(
            replace(f, sha256=hashlib.sha256(content).hexdigest()) if f.name == name else f for f in files.spec.files
        ),
    )


def test_wrong_idx_magic_is_a_format_error(home: Path, mnist: MnistFiles) -> None:
    content = bytearray(idx_bytes(mnist.images["train"]))
    content[2] = 0x0D  # float32 instead of unsigned byte
    _rewrite(mnist, "train-images-idx3-ubyte.gz", bytes(content))
    with pytest.raises(FormatError, match="wrong IDX magic 0x00000d03"):
        _run(home, _fashion(home, mnist))
    _assert_no_dataset(home)


def test_idx_length_not_matching_header_is_a_format_error(home: Path, mnist: MnistFiles) -> None:
    _rewrite(mnist, "train-images-idx3-ubyte.gz", idx_bytes(mnist.images["train"])[:-5])
    with pytest.raises(FormatError, match="header declares"):
        _run(home, _fashion(home, mnist))


def test_image_and_label_count_mismatch_is_a_format_error(home: Path, mnist: MnistFiles) -> None:
    _rewrite(mnist, "train-labels-idx1-ubyte.gz", idx_bytes(mnist.labels["train"][:-1]))
    with pytest.raises(FormatError, match="120 images but 119 labels"):
        _run(home, _fashion(home, mnist))
    _assert_no_dataset(home)


def test_missing_source_file_says_what_to_put_where(home: Path, mnist: MnistFiles) -> None:
    (mnist.folder / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(SourceNotFoundError, match="lacks t10k-images-idx3-ubyte.gz") as info:
        _run(home, _fashion(home, mnist))
    assert "put the files" in str(info.value)


# -- CIFAR-10 (binary tar.gz) --------------------------------------------------------------------------------------


def test_cifar_records_become_hwc_images(home: Path, tmp_path: Path) -> None:
    files = make_cifar(tmp_path / "cifar")
    src = Cifar10Source(home / "downloads", location=str(files.archive.parent), spec=files.spec)
    ds = _run(home, src).dataset
    assert ds.image_shape == (32, 32, 3)
    assert ds.class_names[:3] == ("airplane", "automobile", "bird") and ds.num_classes == 10
    for split in ("train", "test"):
        arrays = open_dataset("cifar10", home=home).split(split).arrays()
        np.testing.assert_array_equal(arrays.images, files.images[split])
        np.testing.assert_array_equal(arrays.labels, files.labels[split])


def test_cifar_wrong_checksum_is_refused(home: Path, tmp_path: Path) -> None:
    files = make_cifar(tmp_path / "cifar")
    src = Cifar10Source(home / "downloads", location=str(files.archive.parent), spec=replace(files.spec, md5="0" * 32))
    with pytest.raises(ChecksumError, match="does not match the published"):
        _run(home, src)
    _assert_no_dataset(home)


def _member(name: str, kind: bytes = tarfile.REGTYPE, size: int = 4, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname = kind, size if kind == tarfile.REGTYPE else 0, link
    return info


@pytest.mark.parametrize(
    ("member", "message"),
    [
        (_member("cifar-10-batches-bin/../../evil.sh"), "escape the target"),
        (_member("/etc/cron.d/evil"), "absolute path"),
        (_member("cifar-10-batches-bin/link", tarfile.SYMTYPE, link="/etc/passwd"), "is a link"),
        (_member("cifar-10-batches-bin/hard", tarfile.LNKTYPE, link="../x"), "is a link"),
        (_member("cifar-10-batches-bin/dev", tarfile.CHRTYPE), "device"),
    ],
)
def test_unsafe_tar_members_are_refused(home: Path, tmp_path: Path, member: tarfile.TarInfo, message: str) -> None:
    files = make_cifar(tmp_path / "cifar", extra=[member])
    src = Cifar10Source(home / "downloads", location=str(files.archive.parent), spec=files.spec)
    with pytest.raises(UnsafeArchiveError, match=message):
        _run(home, src)
    _assert_no_dataset(home)
    assert not (tmp_path / "evil.sh").exists()


def test_tar_caps_on_member_count_and_size(tmp_path: Path) -> None:
    files = make_cifar(tmp_path / "cifar")
    with pytest.raises(UnsafeArchiveError, match="more than 3 members"):
        list(iter_regular_files(files.archive, limits=TarLimits(max_members=3)))
    with pytest.raises(UnsafeArchiveError, match="over the cap"):
        list(iter_regular_files(files.archive, limits=TarLimits(max_member_bytes=1000)))


def test_truncated_tar_is_a_format_error(tmp_path: Path) -> None:
    archive = make_cifar(tmp_path / "cifar").archive
    short = archive.with_name("short.tar.gz")
    short.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(FormatError, match="corrupt or truncated archive"):
        list(iter_regular_files(short))


# -- image folders -------------------------------------------------------------------------------------------------


def test_folder_split_by_path_hash_is_deterministic(home: Path, tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "pets")
    opts = FolderOptions(image_size=(16, 16), mode="L", test_fraction=0.25)
    first = _run(home, FolderSource(root, opts)).dataset
    second = _run(tmp_path / "home2", FolderSource(root, opts)).dataset
    assert first.name == "pets" and first.class_names == ("cat", "dog", "fish")
    assert first.image_shape == (16, 16, 1)
    assert first.digest == second.digest
    n_train, n_test = len(first.split("train")), len(first.split("test"))
    assert n_train + n_test == 36 and 0 < n_test < 18
    # Adding a file keeps every existing file in its split: compare per-file assignment via a new class.
    make_image_folder(root, classes=("zebra",), per_class=3)
    third = _run(home, FolderSource(root, opts)).dataset
    assert len(third.split("train")) + len(third.split("test")) == 39
    assert len(third.split("test")) >= n_test


def test_folder_with_train_and_test_dirs(home: Path, tmp_path: Path) -> None:
    make_image_folder(tmp_path / "ds" / "train", per_class=4)
    make_image_folder(tmp_path / "ds" / "test", classes=("cat", "fish"), per_class=2)
    ds = _run(home, FolderSource(tmp_path / "ds", FolderOptions(image_size=(8, 12)))).dataset
    assert (len(ds.split("train")), len(ds.split("test"))) == (12, 4)
    assert ds.image_shape == (8, 12, 3)
    assert set(ds.split("test").arrays().labels.tolist()) == {0, 2}


def test_corrupt_image_fails_the_ingest_or_is_skipped_and_listed(home: Path, tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "pets")
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(BadImageError, match=r"broken\.png.*--on-bad-file skip"):
        _run(home, FolderSource(root, FolderOptions(on_bad_file="fail")))
    _assert_no_dataset(home)
    result = _run(home, FolderSource(root, FolderOptions(on_bad_file="skip")))
    assert [rel for rel, _ in result.skipped] == ["dog/broken.png"]
    assert result.dataset.manifest.source["skipped"] == ["dog/broken.png"]
    assert len(result.dataset.split("train")) + len(result.dataset.split("test")) == 36


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels: a decompression bomb's signature."""
    buf = io.BytesIO()
    from PIL import Image

    Image.new("L", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = 8 + 8  # signature, then length + b"IHDR"
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13])))
    return bytes(data)


def test_pixel_bomb_is_refused_before_decoding(home: Path, tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "pets")
    (root / "cat" / "bomb.png").write_bytes(_png_claiming(100_000, 100_000))
    with pytest.raises(BadImageError, match=r"bomb\.png: over the pixel limit \(decompression bomb"):
        _run(home, FolderSource(root))
    # Under Pillow's own guard but over ours: our limit applies, from the header alone.
    (root / "cat" / "bomb.png").write_bytes(_png_claiming(5_000, 5_000))
    with pytest.raises(BadImageError, match=r"bomb\.png: 5000x5000 = 25000000 pixels is over the 1000000-pixel"):
        _run(home, FolderSource(root, FolderOptions(max_pixels=1_000_000)))
    result = _run(home, FolderSource(root, FolderOptions(on_bad_file="skip")))
    assert [rel for rel, _ in result.skipped] == ["cat/bomb.png"]


def test_folder_without_classes_or_images_is_a_clear_error(home: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceNotFoundError, match="no class folders"):
        _run(home, FolderSource(tmp_path / "empty"))
    (tmp_path / "empty" / "cat").mkdir()
    with pytest.raises(SourceNotFoundError, match="no PNG or JPEG"):
        _run(home, FolderSource(tmp_path / "empty"))
    with pytest.raises(SourceNotFoundError, match="does not exist"):
        _run(home, FolderSource(tmp_path / "nope"))


def test_folder_options_are_validated() -> None:
    with pytest.raises(UsageError, match="test fraction 1.5"):
        FolderOptions(test_fraction=1.5)
    with pytest.raises(UsageError, match="image size 0x8"):
        FolderOptions(image_size=(0, 8))


def test_folder_limits_are_part_of_the_source_key_and_reuse_lists_skipped(home: Path, tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "pets", per_class=4)
    (root / "cat" / "big.png").write_bytes(_png_claiming(3000, 3000))
    strict = FolderOptions(on_bad_file="skip", max_pixels=1_000_000)
    first = _run(home, FolderSource(root, strict))
    assert [rel for rel, _ in first.skipped] == ["cat/big.png"]
    again = _run(home, FolderSource(root, strict))
    assert again.reused
    assert [rel for rel, _ in again.skipped] == ["cat/big.png"]
    loose = _run(home, FolderSource(root, replace(strict, max_pixels=2_000_000_000)))
    assert not loose.reused  # a different limit may decide differently: never reuse silently


def test_symlinked_class_folder_is_not_followed_out_of_root(home: Path, tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "pets", classes=("cat",), per_class=4)
    outside = make_image_folder(tmp_path / "outside", classes=("secret",), per_class=3)
    (root / "dog").symlink_to(outside / "secret")
    (root / "cat" / "sneaky").symlink_to(outside / "secret")
    ds = _run(home, FolderSource(root)).dataset
    assert ds.class_names == ("cat",)
    assert sum(len(split) for split in ds.splits.values()) == 4


@pytest.mark.parametrize("fmt", ["GIF", "BMP"])
def test_other_image_formats_never_reach_their_parsers(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    """A valid image of another format, named .png, is a bad file, refused before Pillow's parser of it runs."""
    from PIL import BmpImagePlugin, GifImagePlugin, Image

    root = make_image_folder(tmp_path / "pets", per_class=4)
    Image.new("RGB", (16, 16), (200, 10, 10)).save(root / "cat" / "other.png", format=fmt)
    parsed: list[str] = []  # watch Pillow's own parsers (they still run: this observes, it does not replace)
    for plugin in (GifImagePlugin.GifImageFile, BmpImagePlugin.BmpImageFile):
        real = plugin._open

        def spy(self: Any, real: Any = real) -> None:
            parsed.append(type(self).__name__)
            real(self)

        monkeypatch.setattr(plugin, "_open", spy)
    with pytest.raises(BadImageError, match=r"other\.png: .*PNG or JPEG.*--on-bad-file skip"):
        _run(home, FolderSource(root, FolderOptions(on_bad_file="fail")))
    assert parsed == []  # refused by the PNG and JPEG parsers alone
    _assert_no_dataset(home)
    result = _run(home, FolderSource(root, FolderOptions(on_bad_file="skip")))
    assert [rel for rel, _ in result.skipped] == ["cat/other.png"]
    assert result.dataset.manifest.source["skipped"] == ["cat/other.png"]
    assert parsed == []
