"""Shared fixtures: generated datasets in their real on-disk formats, a real HTTP server, a CLI runner."""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import http.server
import io
import json
import secrets
import socket
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from distml.data.sources import Cifar10Spec, IdxSpec, MnistLikeSpec

SHARED_FASHION = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "fashion-mnist"
MNIST_NAMES = {
    ("train", 3): "train-images-idx3-ubyte.gz",
    ("train", 1): "train-labels-idx1-ubyte.gz",
    ("test", 3): "t10k-images-idx3-ubyte.gz",
    ("test", 1): "t10k-labels-idx1-ubyte.gz",
}


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


@dataclass
class MnistFiles:
    folder: Path
    spec: MnistLikeSpec
    images: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]


def make_mnist(folder: Path, n_train: int = 120, n_test: int = 40, seed: int = 0) -> MnistFiles:
    """Write four IDX gz files in the Fashion-MNIST layout and return a spec with their real checksums."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    images = {s: rng.integers(0, 256, (n, 28, 28), dtype=np.uint8) for s, n in (("train", n_train), ("test", n_test))}
    labels = {s: rng.integers(0, 10, n, dtype=np.uint8) for s, n in (("train", n_train), ("test", n_test))}
    specs = []
    for (split, ndim), name in MNIST_NAMES.items():
        content = idx_bytes(images[split] if ndim == 3 else labels[split])
        gz = gzip.compress(content, mtime=0)
        (folder / name).write_bytes(gz)
        specs.append(IdxSpec(name, hashlib.sha256(content).hexdigest(), hashlib.md5(gz).hexdigest(), split, ndim))
    spec = MnistLikeSpec(files=tuple(specs), class_names=tuple(f"class{i}" for i in range(10)))
    return MnistFiles(folder, spec, images, labels)


@dataclass
class CifarFiles:
    archive: Path
    spec: Cifar10Spec
    images: dict[str, np.ndarray]  # N x 32 x 32 x 3, as the store should hold them
    labels: dict[str, np.ndarray]


def make_cifar(
    folder: Path, per_batch: int = 20, seed: int = 0, extra: list[tarfile.TarInfo] | None = None
) -> CifarFiles:
    """Write a cifar-10-binary.tar.gz in the real record layout (label byte + R, G, B planes)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    images: dict[str, list[np.ndarray]] = {"train": [], "test": []}
    labels: dict[str, list[np.ndarray]] = {"train": [], "test": []}
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:

        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        meta = "airplane\nautomobile\nbird\ncat\ndeer\ndog\nfrog\nhorse\nship\ntruck\n\n"
        add("batches.meta.txt", meta.encode())
        batches = [(f"data_batch_{i}.bin", "train") for i in range(1, 6)] + [("test_batch.bin", "test")]
        for name, split in batches:
            hwc = rng.integers(0, 256, (per_batch, 32, 32, 3), dtype=np.uint8)
            lab = rng.integers(0, 10, per_batch, dtype=np.uint8)
            records = np.concatenate([lab[:, None], hwc.transpose(0, 3, 1, 2).reshape(per_batch, -1)], axis=1)
            add(name, records.tobytes())
            images[split].append(hwc)
            labels[split].append(lab)
        for info in extra or []:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isfile() else None)
    archive = folder / "cifar-10-binary.tar.gz"
    archive.write_bytes(buf.getvalue())
    spec = Cifar10Spec(md5=hashlib.md5(buf.getvalue()).hexdigest())
    return CifarFiles(
        archive,
        spec,
        {k: np.concatenate(v) for k, v in images.items()},
        {k: np.concatenate(v).astype(np.int64) for k, v in labels.items()},
    )


def make_image_folder(root: Path, classes: tuple[str, ...] = ("cat", "dog", "fish"), per_class: int = 12) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)
            fmt = "png" if i % 2 else "jpg"
            Image.fromarray(pixels).save(root / c / f"img{i:03d}.{fmt}")
    return root


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


# -- the pipeline tests' small workspace (tests/test_pipeline.py, tests/test_pipeline_search.py) ----------------
@pytest.fixture
def images(tmp_path: Path) -> Path:
    """A tiny image folder: 3 classes of 16 images (a batch of 16 is left after the validation split)."""
    return make_image_folder(tmp_path / "images", per_class=16)


def pipeline_config(tmp_path: Path, images: Path, extra: str = "") -> Path:
    """``tmp_path/distml.toml`` over the image folder (16x16 grey, a quarter for test); ``extra`` ends ``[train]``."""
    path = tmp_path / "distml.toml"
    path.write_text(
        f"""
[pipeline]
dataset = "folder"
source = "{images}"
image_size = [16, 16]
mode = "L"
test_fraction = 0.25

[train]
batch_size = 16
log_every_steps = 1000
{extra}
"""
    )
    return path


def step_decisions(out: str) -> dict[str, str]:
    """step -> 'hit: why' / 'ran: why' / 'FAILED: why' / 'skipped: why', from the pipeline runner's own lines."""
    found = {}
    for line in out.splitlines():
        parts = line.split(maxsplit=1)
        if len(parts) == 2 and parts[1].split(":")[0] in ("hit", "ran", "FAILED", "skipped"):
            found[parts[0]] = parts[1]
    return found


@pytest.fixture
def mnist(tmp_path: Path) -> MnistFiles:
    return make_mnist(tmp_path / "mnist-src")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A real HTTP server on 127.0.0.1 serving a temp folder; yields (folder, base URL)."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@dataclass
class CliResult:
    code: int
    out: str
    err: str


def run_cli(*args: str | Path) -> CliResult:
    """Run ``distml ARGS`` in-process through the real entry point (error handler included)."""
    from distml.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
        except SystemExit as exc:
            code = int(exc.code or 0)
    return CliResult(code, out.getvalue(), err.getvalue())


# Runs the CLI as ``python -m distml`` does (main() reads sys.argv, and the process ends without Python's last
# collection), then writes the names of every module it imported to the file named by argv[1].
_FRESH = """
import json, sys
from distml.cli.main import main
report = sys.argv.pop(1)
try:
    main()
finally:
    with open(report, "w") as fh:
        json.dump(sorted(sys.modules), fh)
"""


def run_cli_fresh(
    tmp_path: Path, *args: str | Path, timeout_s: float = 300, env: dict[str, str] | None = None
) -> tuple[CliResult, set[str]]:
    """Run ``distml ARGS`` in a new interpreter, as a user's command runs (its imports included); ``env``: its
    environment (default: this one's).

    Returns its result and the top-level packages it imported (``torch``, ``mlflow``... when it did).
    """
    report = tmp_path / f"modules-{secrets.token_hex(4)}.json"
    proc = subprocess.run(
        [sys.executable, "-c", _FRESH, str(report), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
        env=env,
    )
    loaded = {name.split(".")[0] for name in json.loads(report.read_text())} if report.is_file() else set()
    return CliResult(proc.returncode, proc.stdout, proc.stderr), loaded


requires_fashion = pytest.mark.skipif(
    not (SHARED_FASHION / "train-images-idx3-ubyte.gz").is_file(), reason="no ../shared/datasets/fashion-mnist"
)


@pytest.fixture(autouse=True)
def _no_outside_tracking_server(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests track into their own workspace's SQLite store, never a server named by the environment."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def champion(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A workspace with a 1-epoch ``cnn`` registered as the champion: (home, exported artifact folder).

    One per test session, shared by the server tests (training it takes ~30 s on the CI box); tests that change a
    model copy the artifact first.
    """
    from serve_support import make_champion

    return make_champion(tmp_path_factory.mktemp("champion"))
