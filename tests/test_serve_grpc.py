"""gRPC V2 (Open Inference Protocol) end to end: a real ``distml serve`` with gRPC on 127.0.0.1.

Two real clients speak to it, ``tritonclient.grpc`` and the ``kserve`` SDK's ``InferenceGRPCClient``, through every
call they have; their probabilities are bit-identical to the REST V2 answer for the same images (raw and typed
contents). Every bad input gets its exact gRPC code and a message naming the problem, and the server is healthy
and correct afterwards; the metrics carry ``protocol="grpc"``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from serve_support import MODEL, ServerProcess, gif, png, reference_probabilities, request, sample_images

INFER = "/inference.GRPCInferenceService/ModelInfer"
SHAPE = [28, 28, 1]
MAX_BODY = 2_000_000  # the server's max_body_bytes, so its gRPC max_receive_message_length


def grpc_address(server: ServerProcess) -> str:
    """The address the server announced for gRPC (``  gRPC V2: HOST:PORT (...)``)."""
    line = next(line for line in server.lines if line.strip().startswith("gRPC V2:"))
    return line.split()[2]


def start_server(home: Path, tmp: Path, **serve: Any) -> ServerProcess:
    """``distml serve --grpc-port 0`` (a free port) with ``serve`` settings from a config file."""
    config = tmp / "distml.toml"
    config.write_text("[serve]\n" + "".join(f"{k} = {v!r}\n" for k, v in serve.items()))
    return ServerProcess(["--home", str(home), "--config", str(config), "serve", "--port", "0", "--grpc-port", "0"])


@pytest.fixture(scope="module")
def server(champion: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = start_server(champion[0], tmp_path_factory.mktemp("grpc"), max_instances=64, max_body_bytes=MAX_BODY)
    try:
        yield proc
    finally:
        assert proc.stop() == 0, proc.output


@pytest.fixture(scope="module")
def stub(server: ServerProcess) -> Iterator[Any]:
    with grpc.insecure_channel(grpc_address(server)) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def raw_request(images: np.ndarray, datatype: str = "UINT8", **fields: Any) -> Any:
    """A ``ModelInferRequest`` with ``images`` (uint8 N x 28 x 28 x 1) in ``raw_input_contents``."""
    data = images.tobytes() if datatype == "UINT8" else (images.astype("<f4") / 255).astype("<f4").tobytes()
    tensor = pb.ModelInferRequest.InferInputTensor(name="images", datatype=datatype, shape=list(images.shape))
    return pb.ModelInferRequest(model_name=MODEL, inputs=[tensor], raw_input_contents=[data], **fields)


def probabilities_of(response: Any) -> np.ndarray:
    """The ``probabilities`` output of a ``ModelInferResponse``, raw or typed."""
    names = [out.name for out in response.outputs]
    i = names.index("probabilities")
    out = response.outputs[i]
    if response.raw_output_contents:
        return np.frombuffer(response.raw_output_contents[i], dtype="<f4").reshape(list(out.shape))
    return np.asarray(out.contents.fp32_contents, dtype=np.float32).reshape(list(out.shape))


def rest_v2_probabilities(server: ServerProcess, images: np.ndarray) -> np.ndarray:
    """What REST V2 answers for the same pixels (binary tensors both ways: the float32 bits as computed)."""
    client = triton_http.InferenceServerClient(server.base.removeprefix("http://"))
    try:
        tensor = triton_http.InferInput("images", list(images.shape), "UINT8")
        tensor.set_data_from_numpy(images, binary_data=True)
        out = triton_http.InferRequestedOutput("probabilities", binary_data=True)
        return np.asarray(client.infer(MODEL, [tensor], outputs=[out]).as_numpy("probabilities"))
    finally:
        client.close()


def assert_healthy_and_correct(server: ServerProcess, stub: Any, champion: tuple[Path, Path]) -> None:
    """After a bad request: gRPC and REST readiness, and one right answer."""
    assert stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
    assert request(server.base, "GET", "/v2/health/ready").status == 200
    images = sample_images(1, seed=99)
    got = probabilities_of(stub.ModelInfer(raw_request(images), timeout=30))
    np.testing.assert_array_equal(got, reference_probabilities(champion[1], images))


# -- conformance: two real clients, every call -------------------------------------------------------------------
def test_tritonclient_grpc_every_call_and_rest_identical(server: ServerProcess, champion: tuple[Path, Path]) -> None:
    client = triton_grpc.InferenceServerClient(grpc_address(server))
    try:
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)
        assert client.get_server_metadata(as_json=True)["name"] == "distml"
        meta = client.get_model_metadata(MODEL, as_json=True)
        version = meta["versions"][0]
        assert meta["name"] == MODEL and meta["platform"] == "onnxruntime_onnx"
        assert meta["inputs"] == [{"name": "images", "datatype": "UINT8", "shape": ["-1", "28", "28", "1"]}]
        assert [o["name"] for o in meta["outputs"]] == ["probabilities", "class_id", "label"]
        assert client.is_model_ready(MODEL, version)
        config = client.get_model_config(MODEL, as_json=True)["config"]  # what perf_analyzer reads first
        assert (config["name"], config["platform"], config["max_batch_size"]) == (MODEL, "onnxruntime_onnx", 32)
        assert config["input"] == [{"name": "images", "data_type": "TYPE_UINT8", "dims": ["28", "28", "1"]}]
        assert [(o["name"], o["data_type"], o["dims"]) for o in config["output"]] == [
            ("probabilities", "TYPE_FP32", ["10"]),
            ("class_id", "TYPE_INT64", ["1"]),
            ("label", "TYPE_STRING", ["1"]),
        ]

        images = sample_images(4, seed=3)
        rest = rest_v2_probabilities(server, images)
        np.testing.assert_allclose(rest, reference_probabilities(champion[1], images), atol=2e-6)
        for datatype, data in (("UINT8", images), ("FP32", images.astype(np.float32) / 255)):
            tensor = triton_grpc.InferInput("images", list(images.shape), datatype)
            tensor.set_data_from_numpy(data)
            result = client.infer(MODEL, [tensor], request_id="conf-1")
            np.testing.assert_array_equal(result.as_numpy("probabilities"), rest)  # bit for bit
            assert result.as_numpy("class_id").tolist() == rest.argmax(1).tolist()
            assert [b.decode() for b in result.as_numpy("label")] == [f"class{i}" for i in rest.argmax(1)]
            response = result.get_response()
            assert response.model_version == version and response.id == "conf-1"
        files = np.array([png(im) for im in images], dtype=np.object_)
        tensor = triton_grpc.InferInput("images", [len(files)], "BYTES")
        tensor.set_data_from_numpy(files)
        only = [triton_grpc.InferRequestedOutput("probabilities")]
        result = client.infer(MODEL, [tensor], outputs=only, model_version=version)
        np.testing.assert_array_equal(result.as_numpy("probabilities"), rest)
        assert result.as_numpy("label") is None
    finally:
        client.close()


# The kserve SDK ships its own generated copy of the protocol; both register "inference.*" in protobuf's default
# descriptor pool, so one process cannot import both: its client runs in a process of its own.
KSERVE_CLIENT = """
import asyncio, io, json, sys
import numpy as np
from PIL import Image
from kserve import InferenceGRPCClient, InferInput, InferRequest

address, model, path = sys.argv[1:]
images = np.load(path)

def png(image):
    buf = io.BytesIO()
    Image.fromarray(image[..., 0]).save(buf, format="PNG")
    return buf.getvalue()

async def run():
    client = InferenceGRPCClient(address, timeout=30, retries=0)
    calls = {"live": await client.is_server_live(), "ready": await client.is_server_ready(),
             "model_ready": await client.is_model_ready(model)}
    typed = InferInput("images", list(images.shape), "UINT8", data=images.ravel().tolist())
    raw = InferInput("images", list(images.shape), "UINT8")
    raw.set_data_from_numpy(images, binary_data=True)
    files = InferInput("images", [len(images)], "BYTES", data=[png(im) for im in images])
    for kind, tensor in (("typed", typed), ("raw", raw), ("bytes", files)):
        response = await client.infer(InferRequest(model_name=model, infer_inputs=[tensor]))
        out = next(o for o in response.outputs if o.name == "probabilities").as_numpy()
        calls[kind] = {"model": response.model_name, "dtype": str(out.dtype),
                       "probabilities": out.astype(np.float32).view(np.uint32).tolist()}
    await client.close()
    print(json.dumps(calls))

asyncio.run(run())
"""


def test_kserve_grpc_client_every_call_typed_and_raw(server: ServerProcess, tmp_path: Path) -> None:
    images = sample_images(3, seed=4)
    rest = rest_v2_probabilities(server, images)
    np.save(tmp_path / "images.npy", images)
    args = [sys.executable, "-c", KSERVE_CLIENT, grpc_address(server), MODEL, str(tmp_path / "images.npy")]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    calls = json.loads(done.stdout.splitlines()[-1])
    assert calls["live"] and calls["ready"] and calls["model_ready"]
    for kind in ("typed", "raw", "bytes"):  # typed contents, raw_input_contents, BYTES PNG files
        assert calls[kind]["model"] == MODEL and calls[kind]["dtype"] == "float32"
        got = np.asarray(calls[kind]["probabilities"], dtype=np.uint32).view(np.float32)
        np.testing.assert_array_equal(got, rest)  # bit for bit


def test_typed_fp32_and_bytes_contents_and_trailing_metadata(server: ServerProcess, stub: Any) -> None:
    images = sample_images(2, seed=5)
    rest = rest_v2_probabilities(server, images)
    fp32 = pb.ModelInferRequest.InferInputTensor(name="images", datatype="FP32", shape=[2, *SHAPE])
    fp32.contents.fp32_contents.extend((images.astype(np.float32) / 255).ravel().tolist())
    files = pb.ModelInferRequest.InferInputTensor(name="images", datatype="BYTES", shape=[2])
    files.contents.bytes_contents.extend(png(im) for im in images)
    for tensor in (fp32, files):
        response, call = stub.ModelInfer.with_call(
            pb.ModelInferRequest(model_name=MODEL, id="t", inputs=[tensor]), metadata=[("x-request-id", "abc-1")]
        )
        assert not response.raw_output_contents  # typed in, typed out
        np.testing.assert_array_equal(probabilities_of(response), rest)
        assert list(response.outputs[1].contents.int64_contents) == rest.argmax(1).tolist()
        trailer = dict(call.trailing_metadata())
        assert trailer["x-model-version"] == response.model_version and trailer["x-request-id"] == "abc-1"
    # binary_data_output asks for raw outputs from typed inputs
    asked = pb.ModelInferRequest(model_name=MODEL, inputs=[fp32])
    asked.parameters["binary_data_output"].bool_param = True
    response = stub.ModelInfer(asked)
    assert len(response.raw_output_contents) == 3
    np.testing.assert_array_equal(probabilities_of(response), rest)


def test_grpc_health_checking_and_metrics_protocol_label(server: ServerProcess, stub: Any) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(grpc_address(server)) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    stub.ModelInfer(raw_request(sample_images(1)))
    with pytest.raises(grpc.RpcError):
        stub.ModelInfer(pb.ModelInferRequest(model_name="nope"))
    metrics = request(server.base, "GET", "/metrics").body.decode()
    grpc_lines = [line for line in metrics.splitlines() if line.startswith("distml_requests_total{")]
    assert any('protocol="grpc"' in line and 'status="200"' in line for line in grpc_lines), grpc_lines
    assert any('protocol="grpc"' in line and 'status="404"' in line for line in grpc_lines), grpc_lines


# -- bad input: each its code and message, and the server healthy and correct after --------------------------------
_IMG = sample_images(1, seed=7)
_RAW = _IMG.tobytes()


def _tensor(datatype: str = "UINT8", shape: list[int] | None = None, name: str = "images") -> Any:
    return pb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=shape or [1, *SHAPE])


def _req(*tensors: Any, raw: list[bytes] | None = None, outputs: list[str] | None = None, **fields: Any) -> Any:
    request = pb.ModelInferRequest(model_name=fields.pop("model_name", MODEL), inputs=list(tensors), **fields)
    request.raw_input_contents.extend([_RAW] if raw is None else raw)
    for name in outputs or []:
        request.outputs.add(name=name)
    return request


def _typed(datatype: str, field: str, values: list[Any], shape: list[int] | None = None) -> Any:
    tensor = _tensor(datatype, shape)
    getattr(tensor.contents, field).extend(values)
    return _req(tensor, raw=[])


_BOTH = _req(_tensor())
_BOTH.inputs[0].contents.uint_contents.extend(_IMG.ravel().tolist())

BAD = {
    "raw size disagrees with shape": (
        _req(_tensor(), raw=[_RAW[:700]]),
        "INVALID_ARGUMENT",
        "784 bytes of UINT8, but 700 were sent",
    ),
    "raw size disagrees with datatype": (
        _req(_tensor("FP32")),
        "INVALID_ARGUMENT",
        "3,136 bytes of FP32, but 784 were sent",
    ),
    "raw and typed contents": (_BOTH, "INVALID_ARGUMENT", "both raw_input_contents and typed contents"),
    "unknown model": (_req(_tensor(), model_name="nope"), "NOT_FOUND", "model 'nope' is not served here"),
    "unknown version": (_req(_tensor(), model_version="99"), "NOT_FOUND", "version '99' is not served here"),
    "unknown input": (_req(_tensor(name="pixels")), "INVALID_ARGUMENT", "inputs[0] is named 'pixels'"),
    "unknown output": (_req(_tensor(), outputs=["logits"]), "INVALID_ARGUMENT", "outputs[0] asks for 'logits'"),
    "repeated output": (
        _req(_tensor(), outputs=["label", "label"]),
        "INVALID_ARGUMENT",
        "outputs[1] asks for 'label' again",
    ),
    "negative shape": (
        _req(_tensor(shape=[-1, *SHAPE])),
        "INVALID_ARGUMENT",
        "has a negative or impossibly large dimension",
    ),
    "huge shape": (
        _req(_tensor(shape=[1 << 40, *SHAPE])),
        "INVALID_ARGUMENT",
        "has a negative or impossibly large dimension",
    ),
    "more images than max_instances": (
        _req(_tensor(shape=[65, *SHAPE])),
        "RESOURCE_EXHAUSTED",
        "65 images in one request; the limit is 64",
    ),
    "empty batch": (_req(_tensor(shape=[0, *SHAPE]), raw=[b""]), "INVALID_ARGUMENT", "is an empty batch (N = 0)"),
    "wrong shape for the model": (
        _req(_tensor(shape=[1, 32, 32, 1])),
        "INVALID_ARGUMENT",
        "for UINT8 this model takes [N, 28, 28, 1]",
    ),
    "bytes not png or jpeg": (
        _typed("BYTES", "bytes_contents", [b"not an image"], [1]),
        "INVALID_ARGUMENT",
        "is not a PNG or JPEG image",
    ),
    "bytes a gif": (_typed("BYTES", "bytes_contents", [gif(_IMG[0])], [1]), "INVALID_ARGUMENT", "is a GIF image"),
    "typed count disagrees with shape": (
        _typed("UINT8", "uint_contents", [0] * 700),
        "INVALID_ARGUMENT",
        "contents.uint_contents has 700",
    ),
    "typed in the wrong field": (
        _typed("UINT8", "int_contents", [0] * 784),
        "INVALID_ARGUMENT",
        "go in contents.uint_contents, not in",
    ),
    "typed pixel out of range": (
        _typed("UINT8", "uint_contents", [300] * 784),
        "INVALID_ARGUMENT",
        "integer pixels must be in 0..255",
    ),
    "no contents": (_req(_tensor(), raw=[]), "INVALID_ARGUMENT", "inputs[0] has no contents"),
    "datatype not accepted": (_req(_tensor("INT64")), "INVALID_ARGUMENT", "INT64 is not accepted for images"),
    "two inputs": (_req(_tensor(), _tensor()), "INVALID_ARGUMENT", "this model takes one input, 'images'"),
    "two raw contents": (_req(_tensor(), raw=[_RAW, _RAW]), "INVALID_ARGUMENT", "raw_input_contents has 2 entries"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_code_and_message(case: str, server: ServerProcess, stub: Any, champion: tuple[Path, Path]) -> None:
    message, code, expected = BAD[case]
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(message, timeout=30)
    assert caught.value.code() == getattr(grpc.StatusCode, code), caught.value.details()
    assert expected in caught.value.details()
    assert_healthy_and_correct(server, stub, champion)


def test_malformed_protobuf_is_invalid_argument(server: ServerProcess, stub: Any, champion: tuple[Path, Path]) -> None:
    with grpc.insecure_channel(grpc_address(server)) as channel:
        send_bytes = channel.unary_unary(INFER)  # no serializer: these bytes go on the wire as they are
        with pytest.raises(grpc.RpcError) as caught:
            send_bytes(b"\x0a\xff\xff\xff\xff\x0f", timeout=10)  # field 1, a length past the end
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid inference.ModelInferRequest protobuf" in caught.value.details()
    assert_healthy_and_correct(server, stub, champion)


def test_message_over_the_size_limit(server: ServerProcess, stub: Any, champion: tuple[Path, Path]) -> None:
    big = _req(_tensor(shape=[64, *SHAPE]), raw=[bytes(MAX_BODY + 1)])
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(big, timeout=30)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"larger than max ({big.ByteSize()} vs. {MAX_BODY})" in caught.value.details()
    assert_healthy_and_correct(server, stub, champion)


def test_unknown_model_in_metadata_calls_and_unimplemented_calls(server: ServerProcess, stub: Any) -> None:
    for call, message in ((stub.ModelMetadata, pb.ModelMetadataRequest), (stub.ModelReady, pb.ModelReadyRequest)):
        with pytest.raises(grpc.RpcError) as caught:
            call(message(name="nope"), timeout=10)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert "model 'nope' is not served here" in caught.value.details()
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelConfig(pb.ModelConfigRequest(name="nope"), timeout=10)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelStatistics(pb.ModelStatisticsRequest(name=MODEL), timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_cancelled_call(server: ServerProcess, stub: Any, champion: tuple[Path, Path]) -> None:
    files = pb.ModelInferRequest.InferInputTensor(name="images", datatype="BYTES", shape=[64])
    files.contents.bytes_contents.extend(png(im) for im in sample_images(64, seed=8))
    future = stub.ModelInfer.future(pb.ModelInferRequest(model_name=MODEL, inputs=[files]), timeout=30)
    future.cancel()
    assert future.cancelled()
    with pytest.raises(grpc.FutureCancelledError):
        future.result()
    assert_healthy_and_correct(server, stub, champion)
