"""Peer for bench/serve_peers.py: BentoML (``bentoml==1.4.40``) serving a distml artifact's ``model.onnx``.

What a BentoML user would write for the same model: a ``@bentoml.service`` class that runs the graph with ONNX
Runtime (1 intra-op thread, CPU) and one ``@bentoml.api`` method, ``POST /infer``. Its parameter is named
``inputs``, so the V2 body bench/serve.py sends to distml (``{"id": ..., "inputs": [{"name": "images", "shape":
[1, 28, 28, 1], "datatype": "UINT8", "data": [784 ints]}]}``) is its request byte for byte (BentoML validates
``inputs`` with pydantic and leaves ``id`` aside); the answer is ``[{"class_id": C, "probabilities": [...]}]``,
one entry per image.

Two services, chosen by ``DISTML_BENCH_BENTO_BATCH``:

- unset: BentoML's defaults (``@bentoml.api``: no batching, the method runs in BentoML's thread pool);
- ``N``: adaptive batching, ``@bentoml.api(batchable=True, max_batch_size=N)``: BentoML concatenates the
  ``inputs`` lists of concurrent requests and splits the answer back. ``max_latency_ms`` stays BentoML's default
  (60 s): the dispatcher refuses (503) a request it expects to wait longer than that, and a tight budget made it
  shed load on this shared machine rather than batch (``DISTML_BENCH_BENTO_LATENCY_MS`` sets another).

The model folder comes from ``DISTML_BENCH_MODEL_DIR``. Serve it with the BentoML venv (bench/_peer_env.sh
bentoml creates it and prints its python), one worker (the service's default), loopback:

    DISTML_BENCH_MODEL_DIR=DIR .venv-bentoml/bin/bentoml serve bentoml_service:Classifier \\
        --working-dir bench/peers --host 127.0.0.1 --port 3000
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import bentoml  # type: ignore[import-not-found]  # only in .venv-bentoml, not in .venv where mypy runs
import numpy as np
import onnxruntime as ort

MODEL_DIR = Path(os.environ.get("DISTML_BENCH_MODEL_DIR", "."))
BATCH = int(os.environ.get("DISTML_BENCH_BENTO_BATCH", "0") or 0)
MAX_LATENCY_MS = int(os.environ.get("DISTML_BENCH_BENTO_LATENCY_MS", "60000"))


def _session() -> Any:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(MODEL_DIR / "model.onnx"), options, providers=["CPUExecutionProvider"])


def _run(session: Any, shape: tuple[int, ...], inputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    images = np.stack([np.asarray(t["data"], dtype=np.uint8).reshape(shape) for t in inputs])
    probabilities = session.run(["probabilities"], {"images": images})[0]
    return [{"class_id": int(p.argmax()), "probabilities": p.tolist()} for p in probabilities]


def _shape() -> tuple[int, ...]:
    card = json.loads((MODEL_DIR / "model.json").read_text())
    return tuple(int(d) for d in card["input"]["shape"][1:])


# BentoML's defaults, or its adaptive batching: the same method either way.
api = bentoml.api(batchable=True, max_batch_size=BATCH, max_latency_ms=MAX_LATENCY_MS) if BATCH else bentoml.api


@bentoml.service
class Classifier:
    def __init__(self) -> None:
        self.session, self.shape = _session(), _shape()

    @api  # type: ignore[untyped-decorator]  # bentoml is only in its own venv: untyped here
    def infer(self, inputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return _run(self.session, self.shape, inputs)
