"""gRPC V2's bidirectional stream (Triton's ``ModelStreamInfer``) on a real ``distml serve``: each message is one
inference through the same steps as ``ModelInfer``, answered in order with its id, bit-identical to the unary
answer; a bad message is answered with ``error_message`` and the stream goes on; a full queue refuses messages
as it refuses calls; a stream cancelled mid-way leaves the server healthy and counts its messages 499."""

from __future__ import annotations

import asyncio
import queue
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from serve_support import MODEL, ServerProcess, png, reference_probabilities, request, sample_images
from test_serve_grpc import grpc_address, probabilities_of, raw_request, start_server

STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"


@pytest.fixture(scope="module")
def server(champion: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = start_server(champion[0], tmp_path_factory.mktemp("grpc-stream"), max_instances=64)
    try:
        yield proc
    finally:
        assert proc.stop() == 0, proc.output


def stream_raw(server: ServerProcess, messages: list[bytes]) -> list[Any]:
    """Send ``messages`` (serialized, sent as they are) on one stream; the ``ModelStreamInferResponse``s back."""
    with grpc.insecure_channel(grpc_address(server)) as channel:
        call = channel.stream_stream(STREAM, response_deserializer=pb.ModelStreamInferResponse.FromString)
        return list(call(iter(messages), timeout=60))


def grpc_count(server: ServerProcess, status: int) -> float:
    """The server's ``distml_requests_total`` for gRPC requests (calls and stream messages) with ``status``."""
    metrics = request(server.base, "GET", "/metrics").body.decode()
    lines = [line for line in metrics.splitlines() if line.startswith("distml_requests_total{")]
    return sum(float(line.split()[-1]) for line in lines if 'protocol="grpc"' in line and f'status="{status}"' in line)


def assert_healthy_and_correct(server: ServerProcess, champion: tuple[Path, Path]) -> None:
    images = sample_images(2, seed=99)
    with grpc.insecure_channel(grpc_address(server)) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
        np.testing.assert_array_equal(
            probabilities_of(stub.ModelInfer(raw_request(images), timeout=30)),
            reference_probabilities(champion[1], images),
        )
    [answer] = stream_raw(server, [raw_request(images, id="after").SerializeToString()])
    assert answer.error_message == ""
    np.testing.assert_array_equal(probabilities_of(answer.infer_response), reference_probabilities(champion[1], images))


def test_tritonclient_stream_answers_in_order_bit_identical_to_unary(server: ServerProcess) -> None:
    address = grpc_address(server)
    batches = [sample_images(n, seed=20 + n) for n in (1, 3, 1, 5, 2, 1, 4, 1)]
    with grpc.insecure_channel(address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        unary = [probabilities_of(stub.ModelInfer(raw_request(images), timeout=30)) for images in batches]
    before = grpc_count(server, 200)
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client = triton_grpc.InferenceServerClient(address)
    try:
        client.start_stream(callback=lambda result, error: answers.put((result, error)), stream_timeout=60)
        for i, images in enumerate(batches):  # all sent before any answer is read: they are in the app together
            datatype, data = ("UINT8", images) if i % 2 == 0 else ("FP32", images.astype(np.float32) / 255)
            tensor = triton_grpc.InferInput("images", list(images.shape), datatype)
            tensor.set_data_from_numpy(data)
            client.async_stream_infer(MODEL, [tensor], request_id=f"m{i}")
        got = [answers.get(timeout=60) for _ in batches]
        client.stop_stream()
    finally:
        client.close()
    version = None
    for i, ((result, error), expected) in enumerate(zip(got, unary, strict=True)):
        assert error is None, error
        response = result.get_response()
        assert response.id == f"m{i}"  # in the order sent
        np.testing.assert_array_equal(result.as_numpy("probabilities"), expected)  # bit for bit
        assert result.as_numpy("class_id").tolist() == expected.argmax(1).tolist()
        assert response.model_name == MODEL and response.model_version
        version = version or response.model_version
        assert response.model_version == version
    assert grpc_count(server, 200) == before + len(batches)  # each message counted once


def test_bad_messages_answered_with_error_message_and_the_stream_goes_on(
    server: ServerProcess, champion: tuple[Path, Path]
) -> None:
    good = sample_images(2, seed=5)
    wrong_shape = pb.ModelInferRequest.InferInputTensor(name="images", datatype="UINT8", shape=[1, 9, 9, 1])
    messages = [
        raw_request(good, id="ok-1").SerializeToString(),
        b"\xff\xff\xff not a protobuf",
        pb.ModelInferRequest(model_name="nope", id="bad-model").SerializeToString(),
        pb.ModelInferRequest(
            model_name=MODEL, id="bad-shape", inputs=[wrong_shape], raw_input_contents=[bytes(81)]
        ).SerializeToString(),
        raw_request(sample_images(65, seed=6), id="too-many").SerializeToString(),
        raw_request(good, id="ok-2").SerializeToString(),
    ]
    before = {status: grpc_count(server, status) for status in (200, 400, 404, 413)}
    answers = stream_raw(server, messages)
    assert [a.infer_response.id for a in answers] == ["ok-1", "", "bad-model", "bad-shape", "too-many", "ok-2"]
    errors = [a.error_message for a in answers]
    assert errors[0] == errors[5] == ""
    assert "not a valid inference.ModelInferRequest protobuf" in errors[1]
    assert "model 'nope' is not served here" in errors[2]
    assert "for UINT8 this model takes [N, 28, 28, 1]" in errors[3]
    assert "65 images in one request; the limit is 64" in errors[4]
    expected = reference_probabilities(champion[1], good)
    for i in (0, 5):
        np.testing.assert_array_equal(probabilities_of(answers[i].infer_response), expected)
    after = {status: grpc_count(server, status) for status in before}
    assert after == {200: before[200] + 2, 400: before[400] + 2, 404: before[404] + 1, 413: before[413] + 1}
    assert_healthy_and_correct(server, champion)


def test_stream_cancelled_mid_way(server: ServerProcess, champion: tuple[Path, Path]) -> None:
    files = pb.ModelInferRequest.InferInputTensor(name="images", datatype="BYTES", shape=[64])
    files.contents.bytes_contents.extend(png(im) for im in sample_images(64, seed=8))
    heavy = pb.ModelInferRequest(model_name=MODEL, inputs=[files])

    async def cancel_after_first() -> Any:
        async with grpc.aio.insecure_channel(grpc_address(server)) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            call = stub.ModelStreamInfer(timeout=60)
            for i in range(40):
                heavy.id = f"h{i}"
                await call.write(heavy)
            first = await call.read()
            call.cancel()
            return first

    before = grpc_count(server, 499)
    first = asyncio.run(cancel_after_first())
    assert first.error_message == "" and first.infer_response.id == "h0"
    deadline = time.monotonic() + 10  # the messages in the app when the stream was cancelled count as 499
    while grpc_count(server, 499) == before:
        assert time.monotonic() < deadline, "no message of the cancelled stream counted 499"
        time.sleep(0.1)
    assert_healthy_and_correct(server, champion)


def test_full_queue_refuses_stream_messages_as_it_refuses_calls(champion: tuple[Path, Path], tmp_path: Path) -> None:
    # One queue place and no wait for one: of a stream's messages in the app together, all but one are refused
    # with the unary call's message, answered in order, and the stream still serves the next message.
    proc = start_server(champion[0], tmp_path, max_queue=1, max_queue_wait_ms=0.0, max_loop_lag_ms=60000.0)
    try:
        files = pb.ModelInferRequest.InferInputTensor(name="images", datatype="BYTES", shape=[64])
        files.contents.bytes_contents.extend(png(im) for im in sample_images(64, seed=11))
        burst = [pb.ModelInferRequest(model_name=MODEL, id=f"b{i}", inputs=[files]) for i in range(16)]
        answers = stream_raw(proc, [message.SerializeToString() for message in burst])
        assert [a.infer_response.id for a in answers] == [f"b{i}" for i in range(16)]
        refused = [a.error_message for a in answers if a.error_message]
        assert refused and len(refused) < 16, refused
        assert all("the queue is full" in e and "retry shortly" in e for e in refused), refused
        assert grpc_count(proc, 503) == len(refused)
        assert_healthy_and_correct(proc, champion)
    finally:
        assert proc.stop() == 0, proc.output
