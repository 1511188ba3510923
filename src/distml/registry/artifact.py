"""The model artifact: a folder with ``model.onnx`` and ``model.json``, what ``predict`` and ``serve`` load.

``model.onnx`` takes raw ``uint8`` images N x H x W x C (dynamic N) and normalises inside the graph; it outputs
``logits`` and ``probabilities`` (N x classes, float32). ``model.json`` says what the graph expects and where it
came from: class names, the input spec, test metrics, the parity check it passed, and its lineage (dataset
digest, training run, MLflow run id, config, code version). It also holds the sha256 of ``model.onnx``, so a
truncated or replaced graph is caught before anything runs it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from distml.errors import ModelError, NotFoundError
from distml.files import sha256_file

ONNX_FILE = "model.onnx"
CARD_FILE = "model.json"
CHECKPOINT_FILE = "checkpoint.pt"
FORMAT = 1


@dataclass(frozen=True)
class ModelArtifact:
    """A verified artifact folder (see :func:`open_artifact`)."""

    path: Path
    card: dict[str, Any]

    @property
    def onnx_path(self) -> Path:
        return self.path / ONNX_FILE

    @property
    def name(self) -> str:
        return str(self.card["name"])

    @property
    def class_names(self) -> list[str]:
        return list(self.card["class_names"])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        h, w, c = self.card["input"]["shape"][1:]
        return int(h), int(w), int(c)

    def session(self, threads: int = 0) -> Any:
        """An ONNX Runtime session for the graph (``threads`` 0: ONNX Runtime's default)."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            return ort.InferenceSession(str(self.onnx_path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph types; any failure means unusable
            raise ModelError(f"{self.onnx_path} cannot be loaded by ONNX Runtime: {exc}") from None


def open_artifact(path: Path) -> ModelArtifact:
    """Open and verify an artifact folder: ``model.json`` readable, ``model.onnx`` present with its recorded hash."""
    card_path, onnx_path = path / CARD_FILE, path / ONNX_FILE
    if not card_path.is_file() or not onnx_path.is_file():
        raise NotFoundError(
            f"{path} is not a model artifact (needs {CARD_FILE} and {ONNX_FILE})",
            hint="pass an exported model folder or models:/NAME@ALIAS",
        )
    try:
        card = json.loads(card_path.read_text())
        expected = card["files"][ONNX_FILE]["sha256"]
        if card.get("format") != FORMAT:
            raise ModelError(f"{card_path} has format {card.get('format')!r}; this distml reads format {FORMAT}")
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{card_path} is not a valid model card ({type(exc).__name__}: {exc})") from None
    actual = sha256_file(onnx_path)
    if actual != expected:
        raise ModelError(
            f"{onnx_path} is corrupt: its sha256 is {actual[:12]}, {CARD_FILE} records {expected[:12]}",
            hint="re-export or re-download the model",
        )
    return ModelArtifact(path, card)


def card_digest(card: dict[str, Any]) -> str:
    """The sha256 of a model card as registered: canonical JSON, without ``version`` (the registry fills it in)."""
    content = {key: value for key, value in card.items() if key != "version"}
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def probabilities(session: Any, images: np.ndarray, batch: int) -> np.ndarray:
    """The graph's ``probabilities`` for ``uint8`` N x H x W x C images, run ``batch`` images at a time."""
    return np.concatenate(
        [session.run(["probabilities"], {"images": np.ascontiguousarray(images[i : i + batch])})[0]
         for i in range(0, len(images), batch)]
    )  # fmt: skip
