"""gRPC V2 under pressure: a full queue is RESOURCE_EXHAUSTED with a retry hint, a passed deadline is
DEADLINE_EXCEEDED, and the server stays healthy and correct after both (a server with one queue place)."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from serve_support import MODEL, ServerProcess, png, reference_probabilities, request, sample_images
from test_serve_grpc import grpc_address, probabilities_of, raw_request, start_server


@pytest.fixture(scope="module")
def server(champion: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    # One place in the queue and no wait for one: a second request while one is parsed or queued is refused
    # (and no refusals for a late event loop, the other overload answer, so the message is known).
    proc = start_server(
        champion[0],
        tmp_path_factory.mktemp("grpc-overload"),
        max_queue=1,
        max_queue_wait_ms=0.0,
        max_loop_lag_ms=60000.0,
    )
    try:
        yield proc
    finally:
        assert proc.stop() == 0, proc.output


def _heavy() -> Any:
    """64 PNG files: a request that holds its queue place while they decode."""
    files = pb.ModelInferRequest.InferInputTensor(name="images", datatype="BYTES", shape=[64])
    files.contents.bytes_contents.extend(png(im) for im in sample_images(64, seed=11))
    return pb.ModelInferRequest(model_name=MODEL, inputs=[files])


def _still_correct(server: ServerProcess, champion: tuple[Path, Path]) -> None:
    assert request(server.base, "GET", "/v2/health/ready").status == 200
    images = sample_images(2, seed=12)
    with grpc.insecure_channel(grpc_address(server)) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
        got = probabilities_of(stub.ModelInfer(raw_request(images), timeout=30))
    np.testing.assert_array_equal(got, reference_probabilities(champion[1], images))


def test_full_queue_is_resource_exhausted_with_a_retry_hint(server: ServerProcess, champion: tuple[Path, Path]) -> None:
    heavy = _heavy()

    async def burst() -> list[tuple[grpc.StatusCode, str, dict[str, str]]]:
        async with grpc.aio.insecure_channel(grpc_address(server)) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)

            async def one() -> tuple[grpc.StatusCode, str, dict[str, str]]:
                call = stub.ModelInfer(heavy, timeout=60)
                try:
                    await call
                except grpc.aio.AioRpcError as exc:
                    return exc.code(), exc.details() or "", dict(exc.trailing_metadata() or ())
                return grpc.StatusCode.OK, "", dict(await call.trailing_metadata())

            return await asyncio.gather(*(one() for _ in range(16)))

    outcomes = asyncio.run(burst())
    codes = [code for code, _, _ in outcomes]
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, outcomes
    assert grpc.StatusCode.OK in codes and grpc.StatusCode.RESOURCE_EXHAUSTED in codes, codes
    for code, details, trailer in outcomes:
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            assert "the queue is full" in details and "retry shortly" in details
            assert trailer["retry-after"] == "1"
        else:
            assert trailer["x-model-version"]
    metrics = request(server.base, "GET", "/metrics").body.decode()
    assert any('protocol="grpc"' in line and 'status="503"' in line for line in metrics.splitlines())
    _still_correct(server, champion)


def test_passed_deadline_is_deadline_exceeded_and_counted(server: ServerProcess, champion: tuple[Path, Path]) -> None:
    # 64 PNGs of 512 x 512: their decoding (resized to 28 x 28) takes well over the 50 ms deadline, so the call is
    # in the server's hands when the deadline passes: gRPC cancels the handler and the server counts a 504
    big = io.BytesIO()
    Image.fromarray(np.zeros((512, 512), dtype=np.uint8)).save(big, format="PNG")
    files = pb.ModelInferRequest.InferInputTensor(name="images", datatype="BYTES", shape=[64])
    files.contents.bytes_contents.extend([big.getvalue()] * 64)
    with grpc.insecure_channel(grpc_address(server)) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        stub.ServerLive(pb.ServerLiveRequest(), timeout=10)  # connected: the deadline is spent on the call itself
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(pb.ModelInferRequest(model_name=MODEL, inputs=[files]), timeout=0.05)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "Deadline Exceeded" in (caught.value.details() or "")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        metrics = request(server.base, "GET", "/metrics").body.decode()
        if any('protocol="grpc"' in line and 'status="504"' in line for line in metrics.splitlines()):
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the server did not count the call that passed its deadline as a 504")
    _still_correct(server, champion)
