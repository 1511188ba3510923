"""KServe V1 (the TF Serving-style ``:predict`` API): request parsing and response encoding, no HTTP here.

Request ``{"instances": [...]}``, every instance one of:

- ``{"b64": "<base64 PNG or JPEG>"}`` (KServe's form) or ``{"image_bytes": {"b64": "..."}}`` (TF Serving's);
- a nested array of pixels, H x W (1-channel models) or H x W x C: integers 0..255 or floats in [0, 1].

One request may not mix encoded images and pixel arrays. Response ``{"predictions": [...]}``, one per instance
in order: ``{"class_id": 3, "label": "Dress", "probabilities": [p0, ..., p9]}`` (probabilities in class-id
order, summing to 1).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson

from distml.errors import PayloadTooLargeError, RequestError
from distml.serve.codec import (
    MAX_RESPONSE_BYTES,
    InputSpec,
    b64decode,
    check_response_size,
    pixel_instances,
)
from distml.serve.inputs import Inputs, load_json
from distml.text import clip


def parse_predict(body: bytes, spec: InputSpec, max_instances: int) -> Inputs:
    """The body of ``POST /v1/models/{name}:predict`` -> the images it carries (not yet decoded).

    Pure and thread-safe (the server may call it off the event loop). Sizes are checked before anything big
    is built: the body's commas before JSON parsing, the instance count before any image or array.
    """
    doc = load_json(body, spec, max_instances)
    if not isinstance(doc, dict):
        raise RequestError('the body must be a JSON object with "instances": [...]')
    if "instances" not in doc:
        keys = clip(", ".join(sorted(map(str, doc))) or "none", quote=False)
        raise RequestError(f'the body has no "instances" (keys: {keys}); send {{"instances": [...]}}')
    instances = doc["instances"]
    if not isinstance(instances, list):
        raise RequestError(f'"instances" must be a list, got {type(instances).__name__}')
    if not instances:
        raise RequestError('"instances" is empty: send at least one image')
    if len(instances) > max_instances:
        raise PayloadTooLargeError(f"{len(instances):,} instances in one request; the limit is {max_instances:,}")
    if all(isinstance(item, list) for item in instances):
        return Inputs(pixels=pixel_instances(instances, spec, "instances"))
    return Inputs(encoded=[_encoded(item, i) for i, item in enumerate(instances)])


def _encoded(item: Any, i: int) -> bytes:
    where = f"instances[{i}]"
    if isinstance(item, dict):
        if "b64" in item:
            return b64decode(item["b64"], f"{where}.b64")
        inner = item.get("image_bytes")
        if isinstance(inner, dict) and "b64" in inner:
            return b64decode(inner["b64"], f"{where}.image_bytes.b64")
    if isinstance(item, list):
        raise RequestError(f"{where}: one request cannot mix pixel arrays with encoded images")
    raise RequestError(
        f'{where}: expected {{"b64": "..."}}, {{"image_bytes": {{"b64": "..."}}}} or a nested array of pixels'
    )


def encode_predictions(probabilities: np.ndarray, labels: np.ndarray, *, max_bytes: int = MAX_RESPONSE_BYTES) -> bytes:
    """``{"predictions": [{"class_id", "label", "probabilities"}, ...]}`` for N x classes probabilities.

    Raises :class:`~distml.serve.codec.ResponseTooLargeError` (500) when the answer would exceed ``max_bytes``:
    refused before serialising when even two bytes per number would not fit, else checked on the result.
    """
    n, classes = probabilities.shape
    check_response_size(n * (2 * classes + 32), max_bytes, n)
    ids = probabilities.argmax(axis=1)
    predictions = [
        {"class_id": int(k), "label": labels[k], "probabilities": row}
        for k, row in zip(ids.tolist(), probabilities, strict=True)
    ]
    out = orjson.dumps({"predictions": predictions}, option=orjson.OPT_SERIALIZE_NUMPY)
    check_response_size(len(out), max_bytes, n)
    return out
