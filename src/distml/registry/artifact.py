"""The model artifact: a folder with ``model.onnx`` and ``model.json``, what ``predict`` and ``serve`` load.

What the graph takes and returns, and what the card holds, is :mod:`distml.card`. Opening an artifact checks
the sha256 of ``model.onnx`` against its card, so a truncated or replaced graph is caught before anything runs it.

A leaf: the standard library, NumPy, the card and the file helpers (ONNX Runtime only when a session is asked
for). The server imports this module, so it must never reach the training stage, torch or MLflow.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from distml.card import CARD_FILE, INPUT_NAME, ONNX_FILE, PROBABILITIES, ModelCard
from distml.errors import ModelError, NotFoundError
from distml.files import sha256_file

if TYPE_CHECKING:
    from onnxruntime import InferenceSession


@dataclass(frozen=True)
class ModelArtifact:
    """A verified artifact folder (see :func:`open_artifact`)."""

    path: Path
    card: ModelCard

    @property
    def onnx_path(self) -> Path:
        return self.path / ONNX_FILE

    @property
    def name(self) -> str:
        return self.card.name

    @property
    def class_names(self) -> list[str]:
        return list(self.card.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.card.image_shape

    def session(self, threads: int = 0) -> InferenceSession:
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
    """Open and verify an artifact folder: a valid ``model.json``, and ``model.onnx`` with the hash it records."""
    card_path, onnx_path = path / CARD_FILE, path / ONNX_FILE
    if not card_path.is_file() or not onnx_path.is_file():
        raise NotFoundError(
            f"{path} is not a model artifact (needs {CARD_FILE} and {ONNX_FILE})",
            hint="pass an exported model folder or models:/NAME@ALIAS",
        )
    card = ModelCard.read(card_path)
    expected, actual = card.onnx_sha256, sha256_file(onnx_path)
    if actual != expected:
        raise ModelError(
            f"{onnx_path} is corrupt: its sha256 is {actual[:12]}, {CARD_FILE} records {expected[:12]}",
            hint="re-export or re-download the model",
        )
    return ModelArtifact(path, card)


def probabilities(session: InferenceSession, images: np.ndarray, batch: int) -> np.ndarray:
    """The graph's probabilities for ``uint8`` N x H x W x C images, run ``batch`` images at a time."""
    chunks = (np.ascontiguousarray(images[i : i + batch]) for i in range(0, len(images), batch))
    return np.concatenate([session.run([PROBABILITIES], {INPUT_NAME: chunk})[0] for chunk in chunks])
