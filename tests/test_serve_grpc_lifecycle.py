"""gRPC V2 across a server's life: two workers answer on one gRPC port, every call reaches the request log and
the summed metrics, and SIGTERM drains it like REST (health NOT_SERVING, calls in flight and during the drain
answered, a clean exit with the log flushed)."""

from __future__ import annotations

import base64
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from serve_support import MODEL, ServerProcess, png, reference_probabilities, request, sample_images
from test_serve_grpc import grpc_address, probabilities_of, raw_request, start_server

CALLS = 12


@pytest.fixture(scope="module")
def log_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("grpc-log") / "requests.jsonl"


@pytest.fixture(scope="module")
def server(
    champion: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory, log_file: Path
) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("grpc-life")
    proc = start_server(champion[0], tmp, workers=2, drain_s=2.0, log_file=str(log_file))
    try:
        yield proc
    finally:
        proc.stop()  # the last test stops it itself and checks how


def test_two_workers_answer_on_one_grpc_port(server: ServerProcess, champion: tuple[Path, Path]) -> None:
    images = sample_images(1, seed=21)
    expected = reference_probabilities(champion[1], images)
    for i in range(CALLS):  # a fresh connection each: the kernel spreads them over the workers' listeners
        with grpc.insecure_channel(grpc_address(server)) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            response = stub.ModelInfer(raw_request(images), metadata=[("x-request-id", f"g{i}")], timeout=30)
            np.testing.assert_array_equal(probabilities_of(response), expected)
    with grpc.insecure_channel(grpc_address(server)) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError):
            stub.ModelInfer(pb.ModelInferRequest(model_name=MODEL), metadata=[("x-request-id", "bad")], timeout=30)
    metrics = request(server.base, "GET", "/metrics").body.decode()  # any worker's: the sum over both
    line = next(x for x in metrics.splitlines() if 'protocol="grpc"' in x and 'status="200"' in x)
    assert float(line.split()[-1]) == CALLS
    assert "cannot" not in server.output, server.output


def test_sigterm_drains_grpc_then_exits_with_the_log_flushed(server: ServerProcess, log_file: Path) -> None:
    files = pb.ModelInferRequest.InferInputTensor(name="images", datatype="BYTES", shape=[64])
    files.contents.bytes_contents.extend(png(im) for im in sample_images(64, seed=22))
    with grpc.insecure_channel(grpc_address(server)) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        in_flight = stub.ModelInfer.future(
            pb.ModelInferRequest(model_name=MODEL, inputs=[files]), metadata=[("x-request-id", "inflight")]
        )
        server.proc.send_signal(signal.SIGTERM)
        assert in_flight.result(timeout=30).model_name == MODEL  # a call in flight is answered
        time.sleep(0.5)
        check = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert check.status == health_pb2.HealthCheckResponse.NOT_SERVING  # load balancers stop sending...
        assert not stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
        assert stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live
        stub.ModelInfer(raw_request(sample_images(1)), metadata=[("x-request-id", "draining")], timeout=30)  # ...
    started = time.monotonic()
    assert server.stop(timeout=30) == 0, server.output
    assert time.monotonic() - started < 15
    events = [json.loads(line) for line in log_file.read_text().splitlines()]
    grpc_events = [e for e in events if e.get("protocol") == "grpc"]
    ids = {f"g{i}" for i in range(CALLS)} | {"bad", "inflight", "draining"}
    assert {e["inferenceid"] for e in grpc_events} == ids
    assert len(grpc_events) == 2 * len(ids)  # a request and a response event each
    for event in grpc_events:
        assert event["endpoint"] == "ModelInfer" and event["modelname"] == MODEL
        if event["type"].endswith("response"):
            assert str(event["statuscode"]) == ("400" if event["inferenceid"] == "bad" else "200")
    request_event = next(e for e in grpc_events if e["inferenceid"] == "g0" and e["type"].endswith("request"))
    sent = pb.ModelInferRequest.FromString(base64.b64decode(request_event["data_base64"]))
    assert sent.inputs[0].name == "images"  # the request as the client sent it
