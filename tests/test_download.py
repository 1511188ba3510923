"""Downloads from mirrors, against a real HTTP server on 127.0.0.1 serving generated files."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest

from conftest import MnistFiles, make_cifar
from distml.data import DatasetStore
from distml.data.ingest import ingest
from distml.data.sources import Cifar10Source, FashionMnistSource
from distml.errors import DownloadError
from distml.workspace import Workspace


def _mirror(www: Path, name: str, files: MnistFiles) -> Path:
    folder = www / name
    shutil.copytree(files.folder, folder)
    return folder


def test_corrupt_mirror_then_good_mirror(home: Path, mnist: MnistFiles, http_root: tuple[Path, str]) -> None:
    www, base = http_root
    bad = _mirror(www, "bad", mnist)
    (bad / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b" + b"not really gzip")
    (bad / "t10k-labels-idx1-ubyte.gz").unlink()  # a 404 on the first mirror too
    _mirror(www, "good", mnist)
    log: list[str] = []
    src = FashionMnistSource(home / "downloads", mirrors=(f"{base}/bad", f"{base}/good"), spec=mnist.spec)
    result = ingest(src, store=DatasetStore(Workspace(home)), log=log.append)
    assert len(result.dataset.split("train")) == 120
    assert any(
        "bad/train-images-idx3-ubyte.gz failed (train-images-idx3-ubyte.gz: corrupt or truncated" in m for m in log
    )
    assert any("bad/t10k-labels-idx1-ubyte.gz failed (HTTP 404)" in m for m in log)
    # Only verified files are kept in the cache, under their own names; no partial downloads remain.
    cached = sorted(p.name for p in (home / "downloads").iterdir())
    assert cached == sorted(f.name for f in mnist.spec.files)
    assert (home / "downloads" / "train-images-idx3-ubyte.gz").read_bytes() == (
        mnist.folder / "train-images-idx3-ubyte.gz"
    ).read_bytes()


def test_second_ingest_uses_the_download_cache(home: Path, mnist: MnistFiles, http_root: tuple[Path, str]) -> None:
    www, base = http_root
    mirror = _mirror(www, "m", mnist)
    store = DatasetStore(Workspace(home))
    first = ingest(FashionMnistSource(home / "downloads", mirrors=(f"{base}/m",), spec=mnist.spec), store=store)
    shutil.rmtree(mirror)  # the mirror disappears: the cache must be enough
    again = ingest(FashionMnistSource(home / "downloads", mirrors=(f"{base}/m",), spec=mnist.spec), store=store)
    assert again.reused and again.dataset.digest == first.dataset.digest


def test_source_url_is_used_as_the_mirror(home: Path, tmp_path: Path, http_root: tuple[Path, str]) -> None:
    www, base = http_root
    files = make_cifar(www / "cifar")
    src = Cifar10Source(home / "downloads", location=f"{base}/cifar/", spec=files.spec)
    assert ingest(src, store=DatasetStore(Workspace(home))).dataset.image_shape == (32, 32, 3)


def test_every_mirror_failing_says_where_to_put_the_files(home: Path, mnist: MnistFiles) -> None:
    with socket.socket() as s:  # a port with nobody listening: what "offline" looks like
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    src = FashionMnistSource(home / "downloads", mirrors=(dead,), spec=mnist.spec, timeout_s=2)
    with pytest.raises(DownloadError) as info:
        ingest(src, store=DatasetStore(Workspace(home)))
    text = str(info.value)
    assert "could not get train-images-idx3-ubyte.gz from any mirror" in text
    assert "copy the files train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz" in text
    assert str(home / "downloads") in text and "--source DIR" in text


def test_checksum_failure_on_every_mirror_is_a_download_error(
    home: Path, mnist: MnistFiles, http_root: tuple[Path, str]
) -> None:
    www, base = http_root
    bad = _mirror(www, "bad", mnist)
    (bad / "train-labels-idx1-ubyte.gz").write_bytes((bad / "t10k-labels-idx1-ubyte.gz").read_bytes())
    src = FashionMnistSource(home / "downloads", mirrors=(f"{base}/bad",), spec=mnist.spec)
    with pytest.raises(DownloadError, match="checksum mismatch for train-labels-idx1-ubyte.gz"):
        ingest(src, store=DatasetStore(Workspace(home)))
    assert not (home / "downloads" / "train-labels-idx1-ubyte.gz").exists()
    assert not list((home / "downloads").glob(".*.part"))
