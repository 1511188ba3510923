"""V2 / Open Inference Protocol over gRPC: ``ModelInferRequest`` -> images, probabilities -> ``ModelInferResponse``.

No transport here (see :mod:`~distml.serve.grpc_server`). The messages are the protocol's generated classes from
Triton's maintained client package (``tritonclient.grpc.service_pb2``), not a vendored ``.proto``.

The request takes exactly what REST V2 takes (:mod:`~distml.serve.v2` does the checking for both): one input,
``images``, UINT8 or FP32 ``[N, H, W, C]`` pixels or BYTES ``[N]`` PNG/JPEG files, either in
``raw_input_contents`` (little-endian pixels; BYTES elements each a 4-byte little-endian length and the bytes, as
Triton's clients send them) or in the typed field the protocol gives its datatype (``uint_contents``,
``fp32_contents``, ``bytes_contents``), never both. The answer's tensors come back in ``raw_output_contents``
when the request sent raw contents or asked for binary outputs (the ``binary_data_output`` request parameter or an
output's ``binary_data``), else in typed contents: the protocol allows one or the other for a whole response.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from google.protobuf.message import DecodeError
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb

from distml.card import INPUT_NAME
from distml.errors import RequestError
from distml.serve import v2
from distml.serve.codec import InputSpec, check_response_size
from distml.serve.inputs import Inputs

# The typed-contents field the protocol gives each accepted datatype.
TYPED_FIELD = {"UINT8": "uint_contents", "FP32": "fp32_contents", "BYTES": "bytes_contents"}
_ARRAY_DTYPE = {"UINT8": np.int64, "FP32": np.float32}  # int64: a typed uint32 over 255 is reported, not wrapped


def read_request(data: bytes) -> Any:
    """The serialized ``ModelInferRequest`` a client sent; a 400 when it is not one."""
    try:
        return pb.ModelInferRequest.FromString(data)
    except (DecodeError, RuntimeWarning) as exc:
        raise RequestError(f"the request is not a valid inference.ModelInferRequest protobuf ({exc})") from None


def parse_model_infer(request: Any, spec: InputSpec, max_instances: int) -> v2.InferRequest:
    """A ``ModelInferRequest`` -> the same :class:`~distml.serve.v2.InferRequest` a REST body gives.

    Its outputs' ``binary`` flags say whether the answer goes in ``raw_output_contents``. Pure and thread-safe.
    """
    n = len(request.inputs)
    if n != 1:
        raise RequestError(
            f"this model takes one input, {INPUT_NAME!r}; the request has {n}"
            if n
            else f"the request has no inputs; send one tensor named {INPUT_NAME!r}"
        )
    tensor = request.inputs[0]
    datatype, shape, count = v2.check_input(tensor.name, tensor.datatype, list(tensor.shape), spec, max_instances)
    raw = request.raw_input_contents
    typed = [field.name for field, _ in tensor.contents.ListFields()]
    if raw and typed:
        raise RequestError(
            f"inputs[0] has both raw_input_contents and typed contents ({', '.join(typed)}); send one of them"
        )
    if raw:
        if len(raw) != 1:
            raise RequestError(f"raw_input_contents has {len(raw)} entries; this model takes one input")
        images = v2.binary_tensor(raw[0], datatype, shape, count)
    else:
        images = _typed(tensor.contents, typed, datatype, shape, count)
    binary_default = bool(raw) or _flag(request.parameters, "binary_data_output")
    outputs = v2.requested_outputs(_requested(request.outputs), binary_default)
    if any(binary for _, binary in outputs):  # one raw output makes them all raw: the protocol allows no mix
        outputs = tuple((name, True) for name, _ in outputs)
    return v2.InferRequest(request.id or None, images, outputs)


def _typed(contents: Any, present: list[str], datatype: str, shape: tuple[int, ...], count: int) -> Inputs:
    field = TYPED_FIELD[datatype]
    if not present:
        raise RequestError(f"inputs[0] has no contents: send raw_input_contents or contents.{field}")
    if present != [field]:
        others = ", ".join(name for name in present if name != field)
        raise RequestError(f"inputs[0] is {datatype}: its typed contents go in contents.{field}, not in {others}")
    values = getattr(contents, field)
    if len(values) != count:
        raise RequestError(
            f"inputs[0] has shape {list(shape)} ({count:,} elements) but contents.{field} has {len(values):,}"
        )
    if datatype == "BYTES":
        return Inputs(encoded=list(values))
    array = np.fromiter(values, dtype=_ARRAY_DTYPE[datatype], count=count)
    return Inputs(pixels=v2.pixel_tensor(array, datatype, shape))


def _requested(outputs: Any) -> list[dict[str, Any]] | None:
    """The request's ``outputs`` in REST V2's JSON form, so :func:`~distml.serve.v2.requested_outputs` checks them."""
    if not outputs:
        return None
    return [{"name": out.name, "parameters": {k: _value(v) for k, v in out.parameters.items()}} for out in outputs]


def _flag(parameters: Any, key: str) -> bool:
    return key in parameters and bool(_value(parameters[key]))


def _value(parameter: Any) -> Any:
    """An ``InferParameter``'s value, whichever of its fields is set (None when none is)."""
    which = parameter.WhichOneof("parameter_choice")
    return None if which is None else getattr(parameter, which)


def encode_model_infer(
    request: v2.InferRequest,
    probabilities: np.ndarray,
    labels: np.ndarray,
    model_name: str,
    model_version: str,
    *,
    max_bytes: int,
) -> bytes:
    """The serialized ``ModelInferResponse`` for ``probabilities`` (N x classes) with the outputs asked for.

    Raises :class:`~distml.serve.codec.ResponseTooLargeError` past ``max_bytes``: before building anything when
    even the raw encoding would not fit, else on the serialized message.
    """
    n, classes = probabilities.shape
    ids = probabilities.argmax(axis=1)
    names = [str(label).encode() for label in labels[ids]]
    least = {"probabilities": 4 * n * classes, "class_id": n, "label": sum(map(len, names))}
    check_response_size(sum(least[name] for name, _ in request.outputs), max_bytes, n)
    response = pb.ModelInferResponse(model_name=model_name, model_version=model_version, id=request.id or "")
    raw = any(binary for _, binary in request.outputs)
    for name, _ in request.outputs:
        out = response.outputs.add(name=name)
        if name == "probabilities":
            out.datatype, values = "FP32", probabilities
            out.shape.extend((n, classes))
        elif name == "class_id":
            out.datatype, values = "INT64", ids.astype(np.int64)
            out.shape.append(n)
        else:
            out.datatype = "BYTES"
            out.shape.append(n)
            if raw:
                response.raw_output_contents.append(_length_prefixed(names))
            else:
                out.contents.bytes_contents.extend(names)
            continue
        if raw:
            response.raw_output_contents.append(np.ascontiguousarray(values, values.dtype.newbyteorder("<")).tobytes())
        elif out.datatype == "FP32":
            out.contents.fp32_contents.extend(values.ravel().tolist())
        else:
            out.contents.int64_contents.extend(values.tolist())
    data: bytes = response.SerializeToString()
    check_response_size(len(data), max_bytes, n)
    return data


# V2 datatypes as Triton's model-configuration data types.
CONFIG_TYPES = {"UINT8": mc.TYPE_UINT8, "FP32": mc.TYPE_FP32, "INT64": mc.TYPE_INT64, "BYTES": mc.TYPE_STRING}


def model_config(metadata: dict[str, Any], max_batch_size: int, max_delay_ms: float) -> Any:
    """Triton's ``ModelConfigResponse`` for a model with V2 ``metadata`` (``GET /v2/models/NAME``'s document).

    Triton's tools (``perf_analyzer``, Model Analyzer, ``get_model_config``) read it to learn the batch size and
    the tensors. With ``max_batch_size`` > 0 Triton's dims leave out the batch dimension; a per-image scalar
    output (``class_id``, ``label``) is dims ``[1]`` reshaped to ``[]``, as Triton writes it.
    """
    config = mc.ModelConfig(name=metadata["name"], platform=metadata["platform"], max_batch_size=max_batch_size)
    config.dynamic_batching.max_queue_delay_microseconds = round(max_delay_ms * 1000)
    for kind, field in (("inputs", config.input), ("outputs", config.output)):
        for tensor in metadata[kind]:
            dims = [int(d) for d in tensor["shape"][1:]]
            item = field.add(name=tensor["name"], data_type=CONFIG_TYPES[tensor["datatype"]], dims=dims or [1])
            if not dims:
                item.reshape.SetInParent()  # reshape {shape: []}: one value per image
    return pb.ModelConfigResponse(config=config)


def _length_prefixed(items: list[bytes]) -> bytes:
    """BYTES elements as raw contents: each a 4-byte little-endian length, then the bytes."""
    return b"".join(len(item).to_bytes(4, "little") + item for item in items)


def stream_answer(infer_response: bytes) -> bytes:
    """A serialized ``ModelInferResponse`` as a serialized ``ModelStreamInferResponse`` (its ``infer_response``).

    Protobuf encodes a message field as its tag, its length and the message's bytes, so wrapping the answer
    already serialized is a few bytes of prefix, not a parse and a second serialization per message.
    """
    n, length = len(infer_response), bytearray()
    while n > 0x7F:  # the length as a base-128 varint, low 7 bits first
        length.append(n & 0x7F | 0x80)
        n >>= 7
    length.append(n)
    return _INFER_RESPONSE_TAG + bytes(length) + infer_response


# ModelStreamInferResponse.infer_response: field 2, wire type 2 (length-delimited)
_INFER_RESPONSE_TAG = bytes([pb.ModelStreamInferResponse.DESCRIPTOR.fields_by_name["infer_response"].number << 3 | 2])
