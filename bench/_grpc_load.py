"""gRPC V2 load for bench/serve_peers.py: ``h2load`` (nghttp2's C HTTP/2 load generator) sending one ModelInfer.

A gRPC unary call is an HTTP/2 POST to ``/inference.GRPCInferenceService/ModelInfer`` with ``content-type:
application/grpc`` and a body of one length-prefixed message (a 0 byte, 4 bytes of length, the protobuf). h2load
sends that body as it is, like wrk sends the REST one: a C generator for both columns, no Python client in the
measured path. ``h2load -c C -m 1`` is C connections with one call in flight each, as ``wrk -cC`` is for REST.

What h2load cannot see: a gRPC error travels in the trailers (``grpc-status``) of an HTTP 200. So every point is
also checked from the server's side (its ``distml_requests_total{protocol="grpc"}`` by status, which counts every
call once with an HTTP-equivalent status) and by one call through ``tritonclient.grpc`` before the load.
Latencies come from h2load's ``--log-file`` (one line per request: start, status, microseconds).

The generator's ceiling: ``python bench/_grpc_load.py --trivial-server PORT`` serves a ModelInfer that answers a
fixed response without reading the request (grpc.aio); h2load against it on the same cores shows how many calls
a second h2load itself can send (bench/serve_peers.py records it as ``grpc_generator_ceiling``).

Install h2load with ``apt-get install nghttp2-client`` (Debian/Ubuntu).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
from pathlib import Path
from typing import Any

H2LOAD = shutil.which("h2load")
METHOD = "/inference.GRPCInferenceService/ModelInfer"


def grpc_body(model: str, pixels: bytes) -> bytes:
    """One length-prefixed ModelInferRequest: the V2 UINT8 image as raw contents, as a KServe/Triton client sends."""
    from tritonclient.grpc import service_pb2  # the protocol's generated messages (a distml dependency)

    tensor = service_pb2.ModelInferRequest.InferInputTensor(name="images", datatype="UINT8", shape=[1, 28, 28, 1])
    request = service_pb2.ModelInferRequest(model_name=model, id="bench-1", inputs=[tensor])
    request.raw_input_contents.append(pixels)
    message: bytes = request.SerializeToString()
    return b"\x00" + len(message).to_bytes(4, "big") + message


def grpc_class(address: str, model: str, pixels: bytes) -> dict[str, Any]:
    """One call through tritonclient.grpc before the load: the answer's class and model version."""
    import numpy as np
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(address)
    try:
        image = grpcclient.InferInput("images", [1, 28, 28, 1], "UINT8")
        image.set_data_from_numpy(np.frombuffer(pixels, dtype=np.uint8).reshape(1, 28, 28, 1))
        result = client.infer(model, [image], client_timeout=30)
        probabilities = result.as_numpy("probabilities")
        return {
            "status": 200,
            "class_id": int(probabilities.argmax()),
            "model_version": result.get_response().model_version,
        }
    finally:
        client.close()


def grpc_stream_class(address: str, model: str, pixels: bytes) -> dict[str, Any]:
    """One message on a ModelStreamInfer stream through tritonclient.grpc before the load: its class and version."""
    import queue

    import numpy as np
    import tritonclient.grpc as grpcclient

    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client = grpcclient.InferenceServerClient(address)
    try:
        client.start_stream(callback=lambda result, error: answers.put((result, error)), stream_timeout=30)
        image = grpcclient.InferInput("images", [1, 28, 28, 1], "UINT8")
        image.set_data_from_numpy(np.frombuffer(pixels, dtype=np.uint8).reshape(1, 28, 28, 1))
        client.async_stream_infer(model, [image], request_id="check-1")
        result, error = answers.get(timeout=30)
        if error is not None:
            raise RuntimeError(f"the stream's answer is an error: {error}")
        probabilities = result.as_numpy("probabilities")
        response = result.get_response()
        return {"status": 200, "class_id": int(probabilities.argmax()), "model_version": response.model_version}
    finally:
        client.stop_stream()
        client.close()


def h2load_command(url: str, body: Path, conns: int, duration: int, log: Path) -> list[str]:
    assert H2LOAD is not None
    return [
        H2LOAD,
        "-t1",
        f"-c{conns}",
        "-m1",
        f"-D{duration}",
        "--warm-up-time=0",
        "-d",
        str(body),
        "-H",
        "content-type: application/grpc",
        "-H",
        "te: trailers",
        f"--log-file={log}",
        url + METHOD,
    ]


def parse_h2load(out: str, log: Path) -> dict[str, Any]:
    """req/s, counts and HTTP statuses from h2load's summary; p50/p99 from its per-request log."""
    finished = re.search(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s", out)
    counts = re.search(
        r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
        r"(\d+) errored, (\d+) timeout",
        out,
    )
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    if finished is None or counts is None or codes is None:
        raise RuntimeError(f"cannot read h2load's output:\n{out}")
    done, succeeded, failed, errored, timeout = (int(counts[i]) for i in (3, 4, 5, 6, 7))
    micros = sorted(int(f[2]) for f in (ln.split("\t") for ln in log.read_text().splitlines()) if len(f) >= 3)

    def pct(q: float) -> float | None:
        return micros[min(len(micros) - 1, int(q * len(micros)))] / 1e3 if micros else None

    errors = {
        k: v
        for k, v in (
            ("failed", failed),
            ("errored", errored),
            ("timeout", timeout),
            ("non_2xx", int(codes[2]) + int(codes[3]) + int(codes[4])),
        )
        if v
    }
    return {
        "req_per_s": float(finished[3]),
        "requests": done,
        "succeeded": succeeded,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "errors": errors,
        "ok": not errors,
    }


# -- a trivial servicer: the generator's ceiling -----------------------------------------------------------------
async def _serve_trivial(port: int) -> None:
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    answer = service_pb2.ModelInferResponse(model_name="trivial", id="1")

    class Trivial(service_pb2_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
        async def ModelInfer(self, request: Any, context: Any) -> Any:  # noqa: N802 (the protocol's name)
            return answer

    server = grpc.aio.server()
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(Trivial(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"listening on 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description="a trivial GRPCInferenceService, for h2load's ceiling")
    parser.add_argument("--trivial-server", type=int, required=True, metavar="PORT")
    asyncio.run(_serve_trivial(parser.parse_args().trivial_server))


if __name__ == "__main__":
    main()
