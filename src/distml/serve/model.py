"""The served model: an ONNX Runtime session over a verified model artifact, and what the protocols say about it.

Only ONNX Runtime, NumPy and the artifact's card are needed here (:mod:`distml.registry.artifact` is a leaf): the
serving path never imports torch, MLflow or the training stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from distml.card import INPUT_NAME, PROBABILITIES
from distml.errors import ModelError
from distml.registry.artifact import open_artifact
from distml.serve.codec import DECODE_TIMEOUT_S, MAX_REQUEST_PIXELS, InputSpec

if TYPE_CHECKING:
    from onnxruntime import InferenceSession

    from distml.config import ServeConfig

# What V2 can return (the graph's probabilities, and the class id and label read off them); V1 returns all three
# per instance. The request's one input is the graph's, INPUT_NAME.
OUTPUTS = (PROBABILITIES, "class_id", "label")


@dataclass(frozen=True)
class ServedModel:
    """One loaded model: name, version, classes, input spec and the session that runs it."""

    name: str
    version: str
    class_names: tuple[str, ...]
    spec: InputSpec
    session: InferenceSession
    path: Path

    @property
    def labels(self) -> np.ndarray:
        return np.asarray(self.class_names, dtype=object)

    def predict(self, images: np.ndarray) -> np.ndarray:
        """``uint8`` N x H x W x C -> float32 N x classes probabilities."""
        probabilities: np.ndarray = self.session.run([PROBABILITIES], {INPUT_NAME: images})[0]
        return probabilities

    def metadata_v2(self) -> dict[str, object]:
        """The V2 model metadata document (``GET /v2/models/{name}``)."""
        h, w, c = self.spec.shape
        return {
            "name": self.name,
            "versions": [self.version],
            "platform": "onnxruntime_onnx",
            "inputs": [{"name": INPUT_NAME, "datatype": "UINT8", "shape": [-1, h, w, c]}],
            "outputs": [
                {"name": PROBABILITIES, "datatype": "FP32", "shape": [-1, len(self.class_names)]},
                {"name": "class_id", "datatype": "INT64", "shape": [-1]},
                {"name": "label", "datatype": "BYTES", "shape": [-1]},
            ],
            "parameters": {"class_names": list(self.class_names)},
        }


def load_model(
    path: Path,
    *,
    threads: int = 1,
    max_image_side: int = 4096,
    max_image_pixels: int = 4096**2,
    max_request_pixels: int = MAX_REQUEST_PIXELS,
    decode_timeout_s: float = DECODE_TIMEOUT_S,
) -> ServedModel:
    """Open and verify the artifact at ``path`` and start an ONNX Runtime session with ``threads`` intra-op threads.

    The limits go into the model's :class:`~distml.serve.codec.InputSpec`: per encoded image (``max_image_side``,
    ``max_image_pixels``), per request (``max_request_pixels``, summed from the image headers before decoding)
    and the decode deadline of one request (``decode_timeout_s``).

    Spinning is off: an idle server's pool threads would otherwise burn the cores the HTTP side needs.
    """
    import onnxruntime as ort

    artifact = open_artifact(path)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        session = ort.InferenceSession(str(artifact.onnx_path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph types; any failure means unusable
        raise ModelError(f"{artifact.onnx_path} cannot be loaded by ONNX Runtime: {exc}") from None
    h, w, c = artifact.image_shape
    version = artifact.card.version or "1"  # the registry's version; an unregistered export is "1"
    return ServedModel(
        name=artifact.name,
        version=version,
        class_names=tuple(artifact.class_names),
        spec=InputSpec(
            h,
            w,
            c,
            max_image_side=max_image_side,
            max_image_pixels=max_image_pixels,
            max_request_pixels=max_request_pixels,
            decode_timeout_s=decode_timeout_s,
        ),
        session=session,
        path=artifact.path,
    )


def load_configured(path: Path, config: ServeConfig) -> ServedModel:
    """:func:`load_model` with the server's threads and input limits from ``config``."""
    return load_model(
        path,
        threads=config.threads,
        max_image_side=config.max_image_side,
        max_image_pixels=config.max_image_pixels,
        max_request_pixels=config.max_request_pixels,
        decode_timeout_s=config.decode_timeout_s,
    )


def warm_up(model: ServedModel) -> None:
    """Run one blank image through ``model`` and check the answer: one row of finite probabilities that sum to 1.

    What a hot swap or a canary must pass before it takes a request: a graph that loads but fails, or answers
    the wrong shape, is refused here (:class:`ModelError`) rather than on a client's request. It also pays ONNX
    Runtime's first-run cost (memory arenas, kernel selection) off the answer path.
    """
    h, w, c = model.spec.shape
    try:
        out = np.asarray(model.predict(np.zeros((1, h, w, c), dtype=np.uint8)))
    except Exception as exc:  # ORT raises its own types; any failure means the model cannot serve
        raise ModelError(f"{model.name} version {model.version}: the warm-up inference failed: {exc}") from None
    expected = (1, len(model.class_names))
    if out.shape != expected or not np.all(np.isfinite(out)) or abs(float(out.sum()) - 1) > 1e-3:
        raise ModelError(
            f"{model.name} version {model.version}: the warm-up inference answered shape {list(out.shape)} "
            f"(sum {float(out.sum()):.3g}), not one row of {expected[1]} probabilities"
        )
