"""Support for the model-server tests: a real trained artifact, a real ``distml serve`` process, HTTP helpers."""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from conftest import make_mnist

MODEL = "fashion-mnist-classifier"


def make_champion(root: Path) -> tuple[Path, Path]:
    """A workspace with a 1-epoch ``cnn`` registered as the champion; returns (home, exported artifact folder)."""
    from distml.config import TrainConfig
    from distml.data import DatasetStore
    from distml.data.ingest import ingest
    from distml.data.sources import FashionMnistSource
    from distml.registry import Registry, export_run, find_run
    from distml.train import train
    from distml.workspace import Workspace

    home = root / "home"
    files = make_mnist(root / "src", n_train=256, n_test=1200)
    src = FashionMnistSource(home / "downloads", location=str(files.folder), spec=files.spec)
    ingest(src, store=DatasetStore(Workspace(home)), name="fashion-mnist")
    cfg = TrainConfig.model_validate({"dataset": "fashion-mnist", "model": "cnn", "workers": 1, "epochs": 1,
                                      "batch_size": 32, "log_every_steps": 1000})  # fmt: skip
    train(cfg, Workspace(home), "run0")
    artifact, _ = export_run(find_run("run0", Workspace(home)), root / "model")
    Registry(Workspace(home)).register(artifact)
    return home, artifact.path


def reference_probabilities(model_dir: Path, images: np.ndarray) -> np.ndarray:
    """What ONNX Runtime itself says for ``uint8`` N x 28 x 28 x 1 images (no distml code involved)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(["probabilities"], {"images": images})[0])


def sample_images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 28, 28, 1), dtype=np.uint8)


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image.reshape(image.shape[0], image.shape[1])).save(buf, format="PNG")
    return buf.getvalue()


def gif(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image.reshape(image.shape[0], image.shape[1])).save(buf, format="GIF")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def raw_png(width: int, height: int, *, rows: int | None = None) -> bytes:
    """A grayscale PNG built by hand: ``rows`` rows of zero pixels (all of them when None) for a header of
    ``width`` x ``height``. A large header over few bytes is a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    n = height if rows is None else rows
    idat = zlib.compress(bytes((width + 1) * n), 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def request(
    base: str, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> Reply:
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        conn.close()


def post_json(base: str, path: str, doc: Any, headers: dict[str, str] | None = None) -> Reply:
    return request(
        base, "POST", path, json.dumps(doc).encode(), {"content-type": "application/json", **(headers or {})}
    )


async def asgi_post(
    app: Any, path: str, body: bytes, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], Any]:
    """POST ``body`` to the real ASGI ``app`` in-process (no socket): (status, headers, the JSON answer)."""
    sent: list[Any] = []
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> Any:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        sent.append(message)

    raw = [(b"content-type", b"application/json")] + [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await app({"type": "http", "method": "POST", "path": path, "headers": raw}, receive, send)
    return sent[0]["status"], {k.decode(): v.decode() for k, v in sent[0]["headers"]}, json.loads(sent[1]["body"])


@dataclass
class ServerProcess:
    """``distml serve`` as a real child process; its output is collected on a thread."""

    args: list[str]
    proc: subprocess.Popen[str] = field(init=False)
    lines: list[str] = field(default_factory=list)
    base: str = ""

    def __post_init__(self) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "distml", *self.args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        ready = threading.Event()

        def pump() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self.lines.append(line.rstrip("\n"))
                if line.startswith("listening on "):
                    self.base = line.split()[-1]
                    ready.set()
            ready.set()

        threading.Thread(target=pump, daemon=True).start()
        ready.wait(90)
        if not self.base:
            self.stop(signal.SIGKILL)
            raise RuntimeError("server did not start:\n" + "\n".join(self.lines))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # "listening" is printed before uvicorn's startup completes
            try:
                if request(self.base, "GET", "/v2/health/ready").status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError("server never became ready:\n" + "\n".join(self.lines))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)
