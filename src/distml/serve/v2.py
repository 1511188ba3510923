"""V2 / Open Inference Protocol (REST): ``infer`` request parsing and response encoding, no HTTP here.

The model has one input, ``images``, sent as one of:

- ``UINT8`` ``[N, H, W, C]`` (or ``[N, H, W]`` for 1-channel models): pixels 0..255;
- ``FP32`` of the same shape: intensities in [0, 1];
- ``BYTES`` ``[N]`` (or ``[N, 1]``): encoded PNG/JPEG images, base64 strings in JSON, raw bytes with the binary
  extension.

and three outputs: ``probabilities`` FP32 ``[N, classes]``, ``class_id`` INT64 ``[N]``, ``label`` BYTES ``[N]``.
A request may ask for some of them in ``outputs``, each at most once; by default all three come back.

The **binary tensor data extension** is supported both ways, as Triton's and KServe's clients use it: a request
with an ``Inference-Header-Content-Length: L`` header has a JSON header of L bytes followed by the raw tensors of
the inputs whose ``parameters.binary_data_size`` is set, in order; outputs come back binary when the output's
``parameters.binary_data`` or the request's ``parameters.binary_data_output`` is true. BYTES elements in binary
form are each a 4-byte little-endian length followed by the bytes.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from distml.card import INPUT_NAME
from distml.errors import PayloadTooLargeError, RequestError
from distml.serve.codec import (
    MAX_RESPONSE_BYTES,
    InputSpec,
    b64decode,
    check_response_size,
    nesting,
    pixels_to_uint8,
)
from distml.serve.inputs import Inputs, load_json
from distml.serve.model import OUTPUTS
from distml.text import clip

HEADER_LENGTH = "inference-header-content-length"
# Every datatype the protocol defines, so a valid-but-unaccepted one gets a different message from a typo.
DATATYPES = {"BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32",
             "FP64", "BYTES", "BF16"}  # fmt: skip
ACCEPTED = ("UINT8", "FP32", "BYTES")
MAX_DIM = 1 << 31


@dataclass(frozen=True)
class InferRequest:
    """A parsed ``infer`` request: its id, its images, and which outputs to return (name, as binary)."""

    id: str | None
    inputs: Inputs
    outputs: tuple[tuple[str, bool], ...]


def parse_infer(body: bytes, header_length: str | None, spec: InputSpec, max_instances: int) -> InferRequest:
    """The body (and ``Inference-Header-Content-Length``, if sent) of ``POST .../infer`` -> an :class:`InferRequest`.

    Pure and thread-safe (the server may call it off the event loop). Sizes are checked before anything big
    is built: the JSON body's commas before it is parsed, the declared shape before the data, the data's
    element count before any list or array is made from it.
    """
    binary: bytes | memoryview = b""
    if header_length is not None:
        try:
            length = int(header_length)
        except ValueError:
            raise RequestError(
                f"Inference-Header-Content-Length must be an integer, got {clip(header_length)}"
            ) from None
        if not 0 < length <= len(body):
            raise RequestError(
                f"Inference-Header-Content-Length is {length} but the body has {len(body)} bytes; "
                "it must be the length of the JSON header that starts the body"
            )
        body, binary = body[:length], memoryview(body)[length:]  # a view: the tensors are not copied
    doc = load_json(body, spec, max_instances)
    if not isinstance(doc, dict):
        raise RequestError('the body must be a JSON object with "inputs": [...]')
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise RequestError(f'"id" must be a string, got {type(request_id).__name__}')
    parameters = _object(doc.get("parameters", {}), '"parameters"')
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise RequestError(f'the body needs "inputs": a list with one tensor named {INPUT_NAME!r}')
    if len(inputs) != 1:
        raise RequestError(f"this model takes one input, {INPUT_NAME!r}; the request has {len(inputs)}")
    images = _input(_object(inputs[0], "inputs[0]"), binary, spec, max_instances)
    return InferRequest(
        request_id, images, requested_outputs(doc.get("outputs"), bool(parameters.get("binary_data_output")))
    )


def _input(tensor: dict[str, Any], binary: bytes | memoryview, spec: InputSpec, max_instances: int) -> Inputs:
    datatype, shape, count = check_input(
        tensor.get("name"), tensor.get("datatype"), tensor.get("shape"), spec, max_instances
    )
    size = _object(tensor.get("parameters", {}), "inputs[0].parameters").get("binary_data_size")
    if size is not None:
        if "data" in tensor:
            raise RequestError("inputs[0] has both binary_data_size and data; send one")
        if not isinstance(size, int) or size < 0 or size != len(binary):
            raise RequestError(
                f"inputs[0].parameters.binary_data_size is {clip(size)} but {len(binary)} bytes follow the JSON header"
            )
        return binary_tensor(binary, datatype, shape, count)
    if binary:
        raise RequestError(f"{len(binary)} bytes follow the JSON header but no input declares binary_data_size")
    if "data" not in tensor:
        raise RequestError('inputs[0] has no "data" (nor parameters.binary_data_size)')
    return _json_tensor(tensor["data"], datatype, shape, count)


def check_input(
    name: Any, datatype: Any, shape: Any, spec: InputSpec, max_instances: int
) -> tuple[str, tuple[int, ...], int]:
    """The checks every V2 input gets, over REST or gRPC: its name, its datatype (one of :data:`ACCEPTED`) and its
    shape against the model's; returns (datatype, shape, element count). Nothing is built from the data yet."""
    if name != INPUT_NAME:
        raise RequestError(f"inputs[0] is named {clip(name)}; this model's input is {INPUT_NAME!r}")
    if not isinstance(datatype, str) or datatype not in DATATYPES:
        raise RequestError(
            f"inputs[0].datatype {clip(datatype)} is not a V2 datatype; send one of {', '.join(ACCEPTED)}"
        )
    if datatype not in ACCEPTED:
        raise RequestError(f"inputs[0].datatype {datatype} is not accepted for images; send {', '.join(ACCEPTED)}")
    checked = _shape(shape, datatype, spec, max_instances)
    return datatype, checked, math.prod(checked)  # math, not NumPy: a few dims, on every request


def _shape(shape: Any, datatype: str, spec: InputSpec, max_instances: int) -> tuple[int, ...]:
    if not isinstance(shape, list) or not all(type(d) is int for d in shape):
        raise RequestError(f"inputs[0].shape must be a list of integers, got {clip(shape)}")
    if any(d < 0 or d >= MAX_DIM for d in shape):
        raise RequestError(f"inputs[0].shape {clip(shape)} has a negative or impossibly large dimension")
    allowed: tuple[list[int], ...]
    if datatype == "BYTES":
        allowed = ([-1], [-1, 1])
        words = "[N] or [N, 1] (one encoded image per element)"
    else:
        h, w, c = spec.shape
        allowed = ([-1, h, w, c], [-1, h, w]) if c == 1 else ([-1, h, w, c],)
        words = " or ".join(str(a).replace("-1", "N") for a in allowed)
    if not shape or [-1, *shape[1:]] not in allowed:
        raise RequestError(f"inputs[0].shape is {clip(shape)}; for {datatype} this model takes {words}")
    if shape[0] == 0:
        raise RequestError("inputs[0] is an empty batch (N = 0): send at least one image")
    if shape[0] > max_instances:
        raise PayloadTooLargeError(f"{shape[0]:,} images in one request; the limit is {max_instances:,}")
    return tuple(shape)


def _json_tensor(data: Any, datatype: str, shape: tuple[int, ...], count: int) -> Inputs:
    if not isinstance(data, list):
        raise RequestError(f"inputs[0].data must be a list, got {type(data).__name__}")
    if datatype == "BYTES":
        flat = _flatten_strings(data, count)
        if len(flat) != count:
            raise RequestError(f"inputs[0] has shape {list(shape)} ({count} elements) but {len(flat)} data elements")
        return Inputs(encoded=[b64decode(item, f"inputs[0].data[{i}]") for i, item in enumerate(flat)])
    # Flat, or nested at most N x H x W x C deep; its size along the first elements must be the shape's, known
    # before NumPy builds anything (raggedness elsewhere is NumPy's ValueError below).
    dims = nesting(data, 4, "inputs[0].data", "pixel data is at most N x H x W x C")
    claimed = int(np.prod(dims, dtype=np.int64))
    if claimed != count:
        raise RequestError(f"inputs[0] has shape {list(shape)} ({count:,} elements) but {claimed:,} data elements")
    try:
        array = np.asarray(data)
    except (ValueError, TypeError, OverflowError):
        raise RequestError("inputs[0].data must be a flat (or rectangular nested) list of numbers") from None
    if array.size != count:
        raise RequestError(f"inputs[0] has shape {list(shape)} ({count:,} elements) but {array.size:,} data elements")
    if datatype == "UINT8" and array.dtype.kind == "f":
        raise RequestError("inputs[0] is UINT8 but its data has non-integers; send FP32 for [0, 1] intensities")
    if datatype == "FP32" and array.dtype.kind in "iu":
        array = array.astype(np.float32)
    return Inputs(pixels=pixel_tensor(array, datatype, shape))


def binary_tensor(raw: bytes | memoryview, datatype: str, shape: tuple[int, ...], count: int) -> Inputs:
    """The images of a tensor sent as raw bytes (the binary extension, or gRPC's ``raw_input_contents``): pixels
    little-endian, BYTES elements each a 4-byte little-endian length and the bytes; sizes checked first."""
    if datatype == "BYTES":
        # Walk at most count + 1 length prefixes (count <= max_instances): 16 MiB of 4-byte zeros is 4 million
        # empty elements, and listing them all used to hold the event loop for seconds.
        items: list[bytes] = []
        offset = 0
        while offset < len(raw):
            if len(items) == count:
                raise RequestError(
                    f"inputs[0] has shape {list(shape)} ({count} elements) but the binary data holds more "
                    f"({len(raw) - offset:,} bytes left after element {count - 1})"
                )
            if offset + 4 > len(raw):
                raise RequestError("inputs[0]: binary BYTES data ends inside an element's 4-byte length")
            (n,) = struct.unpack_from("<I", raw, offset)
            if offset + 4 + n > len(raw):
                raise RequestError(f"inputs[0]: binary BYTES element {len(items)} says {n} bytes but fewer remain")
            items.append(bytes(raw[offset + 4 : offset + 4 + n]))
            offset += 4 + n
        if len(items) != count:
            raise RequestError(f"inputs[0] has shape {list(shape)} ({count} elements) but {len(items)} in the data")
        return Inputs(encoded=items)
    itemsize = 1 if datatype == "UINT8" else 4
    if len(raw) != count * itemsize:
        raise RequestError(
            f"inputs[0] has shape {list(shape)}: {count * itemsize:,} bytes of {datatype}, but {len(raw):,} were sent"
        )
    array = np.frombuffer(raw, dtype=np.uint8 if datatype == "UINT8" else "<f4")
    return Inputs(pixels=pixel_tensor(array, datatype, shape))


def pixel_tensor(array: np.ndarray, datatype: str, shape: tuple[int, ...]) -> np.ndarray:
    """UINT8 pixels or FP32 intensities of ``shape`` (as :func:`check_input` returned it) -> uint8 N x H x W x C."""
    pixels = pixels_to_uint8(array.reshape(shape), f"inputs[0] ({datatype})")
    return pixels if pixels.ndim == 4 else pixels[..., np.newaxis]


def _flatten_strings(data: list[Any], count: int) -> list[Any]:
    """The elements of nested lists in order, without recursion: nested at most 2 deep (``[N]`` or ``[N, 1]``),
    and stopping as soon as there are more than ``count``."""
    flat: list[Any] = []
    stack = [iter(data)]  # one iterator per open list; its length is the current depth
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                if len(stack) == 2:
                    raise RequestError("inputs[0].data is nested more than 2 lists deep; BYTES data is [N] or [N, 1]")
                stack.append(iter(item))
                break
            flat.append(item)
            if len(flat) > count:
                return flat  # the caller reports the mismatch; no need to count the rest
        else:
            stack.pop()
    return flat


def requested_outputs(requested: Any, binary_default: bool) -> tuple[tuple[str, bool], ...]:
    """The ``outputs`` a request asks for (a list of ``{"name", "parameters"}``; None: all) -> (name, as binary)
    pairs, each output at most once."""
    if requested is None:
        return tuple((name, binary_default) for name in OUTPUTS)
    if not isinstance(requested, list) or not requested:
        raise RequestError('"outputs" must be a non-empty list of {"name": ...}')
    # Each entry is serialised in full in the answer: 3,000 copies of one name made a 276 KB request cost 31 MB.
    if len(requested) > len(OUTPUTS):
        raise RequestError(
            f'"outputs" has {len(requested):,} entries; this model has {len(OUTPUTS)} outputs '
            f"({', '.join(OUTPUTS)}): ask for each at most once"
        )
    chosen: list[tuple[str, bool]] = []
    for i, item in enumerate(requested):
        out = _object(item, f"outputs[{i}]")
        name = out.get("name")
        if name not in OUTPUTS:
            raise RequestError(f"outputs[{i}] asks for {clip(name)}; this model's outputs are {', '.join(OUTPUTS)}")
        if any(name == seen for seen, _ in chosen):
            raise RequestError(f"outputs[{i}] asks for {name!r} again; ask for each output at most once")
        flag = _object(out.get("parameters", {}), f"outputs[{i}].parameters").get("binary_data", binary_default)
        chosen.append((name, bool(flag)))
    return tuple(chosen)


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise RequestError(f"{where} must be a JSON object, got {type(value).__name__}")
    return value


def encode_infer(
    request: InferRequest,
    probabilities: np.ndarray,
    labels: np.ndarray,
    model_name: str,
    model_version: str,
    *,
    max_bytes: int = MAX_RESPONSE_BYTES,
) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when binary outputs follow it (else ``None``).

    Raises :class:`~distml.serve.codec.ResponseTooLargeError` (500) when the answer would exceed ``max_bytes``:
    refused before serialising when even the tightest encoding would not fit, else checked on the result.
    """
    n, classes = probabilities.shape
    ids = probabilities.argmax(axis=1)
    tensors: dict[str, tuple[str, list[int], Any]] = {
        "probabilities": ("FP32", [n, classes], probabilities),
        "class_id": ("INT64", [n], ids.astype(np.int64)),
        "label": ("BYTES", [n], labels[ids]),
    }
    least = {"probabilities": 2 * n * classes, "class_id": n, "label": 2 * n}  # bytes, in JSON or binary form
    check_response_size(sum(least[name] for name, _ in request.outputs) + len(request.id or ""), max_bytes, n)
    outputs, chunks = [], []
    for name, binary in request.outputs:
        datatype, shape, value = tensors[name]
        out: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
        if binary:
            raw = _bytes_tensor(value) if datatype == "BYTES" else _le_bytes(value)
            out["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            out["data"] = value.ravel() if datatype != "BYTES" else value.tolist()
        outputs.append(out)
    doc: dict[str, Any] = {"model_name": model_name, "model_version": model_version, "outputs": outputs}
    if request.id is not None:
        doc["id"] = request.id
    header = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    check_response_size(len(header) + sum(map(len, chunks)), max_bytes, n)
    if not chunks:
        return header, None
    return header + b"".join(chunks), len(header)


def _le_bytes(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def _bytes_tensor(values: np.ndarray) -> bytes:
    parts = []
    for value in values.tolist():
        data = value.encode() if isinstance(value, str) else bytes(value)
        parts.append(struct.pack("<I", len(data)) + data)
    return b"".join(parts)
