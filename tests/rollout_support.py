"""Support for the hot-swap and canary tests: a registry of our own, model variants built from a real artifact,
a bounded load of client threads that records which version answered each request."""

from __future__ import annotations

import http.client
import json
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from serve_support import MODEL, sample_images

V1 = f"/v1/models/{MODEL}:predict"
PIXELS = {"instances": [sample_images(1, seed=7)[0, ..., 0].tolist()]}


def variant_folder(src: Path, dst: Path, *, perturb: int | None = None, fail_on_ink: bool = False) -> Path:
    """A copy of the artifact folder ``src`` at ``dst`` whose graph is changed, its card updated to match.

    ``perturb``: every weight scaled by noise from this seed (another model: most answers differ).
    ``fail_on_ink``: the graph raises on any image with a nonzero pixel (a Gather out of bounds) and answers as
    before on a blank one, so it passes the warm-up inference and fails every real request.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from distml.files import sha256_file

    shutil.copytree(src, dst)
    model = onnx.load(str(dst / "model.onnx"))
    if perturb is not None:
        rng = np.random.default_rng(perturb)
        for init in model.graph.initializer:
            array = numpy_helper.to_array(init)
            if array.dtype == np.float32 and array.size > 1:
                noisy = array * rng.normal(1.0, 0.8, array.shape).astype(np.float32)
                init.CopyFrom(numpy_helper.from_array(noisy, init.name))
    if fail_on_ink:
        softmax = next(n for n in model.graph.node if n.output[0] == "probabilities")
        softmax.output[0] = "probabilities_raw"
        model.graph.initializer.append(numpy_helper.from_array(np.ones(1, np.float32), "one"))
        nodes = [
            helper.make_node("Cast", ["images"], ["ink_f"], to=TensorProto.FLOAT),
            helper.make_node("ReduceMax", ["ink_f"], ["ink_max"], keepdims=0),
            helper.make_node("Cast", ["ink_max"], ["ink_index"], to=TensorProto.INT64),
            helper.make_node("Gather", ["one", "ink_index"], ["ink_gate"]),  # index 0 only: blank images
            helper.make_node("Mul", ["probabilities_raw", "ink_gate"], ["probabilities"]),
        ]
        model.graph.node.extend(nodes)
    onnx.save(model, str(dst / "model.onnx"))
    card = json.loads((dst / "model.json").read_text())
    card["files"]["model.onnx"]["sha256"] = sha256_file(dst / "model.onnx")
    card["files"]["model.onnx"]["bytes"] = (dst / "model.onnx").stat().st_size
    card["lineage"]["mlflow_run_id"] = None  # registered into a fresh store: held by a registration run there
    (dst / "model.json").write_text(json.dumps(card))
    return dst


def registry_home(root: Path, folders: list[Path]) -> Path:
    """A fresh workspace whose registry holds ``folders`` as versions 1, 2, ... (version 1 the champion)."""
    from distml.registry import Registry
    from distml.registry.artifact import open_artifact
    from distml.workspace import Workspace

    home = root / "home"
    registry = Registry(Workspace(home))
    for i, folder in enumerate(folders):
        registry.register(open_artifact(folder), promote=i == 0)
    return home


def stored_folder(home: Path, version: str) -> Path:
    """Where the registry's artifact store keeps a version's files."""
    from urllib.parse import urlparse

    from distml.registry import Registry
    from distml.workspace import Workspace

    client = Registry(Workspace(home)).client
    mv = client.get_model_version(MODEL, version)
    root = urlparse(client.get_run(mv.run_id).info.artifact_uri).path
    return Path(root) / mv.source.removeprefix(f"runs:/{mv.run_id}/")


@dataclass
class Load:
    """What the client threads saw: per thread, (status, x-model-version) of each answer in order."""

    seen: list[list[tuple[int, str]]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def statuses(self) -> dict[int, int]:
        counts: dict[int, int] = {}
        for thread in self.seen:
            for status, _ in thread:
                counts[status] = counts.get(status, 0) + 1
        return counts

    def versions(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for thread in self.seen:
            for _, version in thread:
                counts[version] = counts.get(version, 0) + 1
        return counts

    def latest(self) -> set[str]:
        return {thread[-1][1] for thread in self.seen if thread}


@contextmanager
def steady_load(
    base: str, threads: int = 3, max_s: float = 120, headers: dict[str, str] | None = None
) -> Iterator[Load]:
    """``threads`` clients, each on one keep-alive connection, posting one image after another until the block
    ends (or ``max_s`` passes, or 20,000 requests each): bounded in count and time."""
    host, port = base.removeprefix("http://").split(":")
    load, stop = Load(), threading.Event()
    body = json.dumps(PIXELS).encode()

    def client(mine: list[tuple[int, str]]) -> None:
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        deadline = time.monotonic() + max_s
        try:
            for _ in range(20_000):
                if stop.is_set() or time.monotonic() > deadline:
                    return
                conn.request("POST", V1, body, {"content-type": "application/json", **(headers or {})})
                response = conn.getresponse()
                response.read()
                mine.append((response.status, response.getheader("x-model-version") or ""))
        except Exception as exc:  # a failed request is what these tests look for: recorded, never swallowed
            load.errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            conn.close()

    workers = []
    for _ in range(threads):
        mine: list[tuple[int, str]] = []
        load.seen.append(mine)
        workers.append(threading.Thread(target=client, args=(mine,), daemon=True))
    for worker in workers:
        worker.start()
    try:
        yield load
    finally:
        stop.set()
        for worker in workers:
            worker.join(60)


def wait_for(predicate: object, timeout_s: float, what: str, poll_s: float = 0.05) -> None:
    """Poll ``predicate()`` until it is true, at most ``timeout_s``."""
    assert callable(predicate)
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(poll_s)


def metric(text: str, prefix: str) -> float:
    """The sum of the samples whose line starts with ``prefix`` in a /metrics text."""
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix))
