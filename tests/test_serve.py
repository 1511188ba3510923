"""The model server end to end: a real ``distml serve`` process on 127.0.0.1 serving a real trained champion.

Predictions are checked against ONNX Runtime run directly on the same pixels; every bad input gets its exact
status and a message naming the problem, and the server is still healthy and correct afterwards.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from serve_support import (
    MODEL,
    ServerProcess,
    asgi_post,
    b64,
    gif,
    png,
    post_json,
    raw_png,
    reference_probabilities,
    request,
    sample_images,
)

V1 = f"/v1/models/{MODEL}:predict"
V2 = f"/v2/models/{MODEL}/infer"


@pytest.fixture(scope="module")
def server(champion: tuple[Path, Path]) -> Iterator[ServerProcess]:
    home, _ = champion
    proc = ServerProcess(["--home", str(home), "serve", "--port", "0", "--max-instances", "64",
                          "--max-body-bytes", "2000000"])  # fmt: skip
    try:
        yield proc
    finally:
        assert proc.stop() == 0, proc.output


def _v2_pixels(images: np.ndarray, datatype: str = "UINT8", **extra: Any) -> dict[str, Any]:
    data = images.ravel().tolist() if datatype == "UINT8" else (images.astype(np.float32) / 255).ravel().tolist()
    return {"inputs": [{"name": "images", "datatype": datatype, "shape": list(images.shape), "data": data}], **extra}


# -- correct answers -------------------------------------------------------------------------------------------
def test_v1_b64_png_and_pixel_arrays_match_onnx_runtime(server: ServerProcess, champion: tuple[Path, Path]) -> None:
    images = sample_images(5)
    expected = reference_probabilities(champion[1], images)
    for instances in (
        [{"b64": b64(png(im))} for im in images],
        [{"image_bytes": {"b64": b64(png(im))}} for im in images],
        [im[..., 0].tolist() for im in images],  # H x W integers
        [(im / 255.0).tolist() for im in images],  # H x W x 1 floats in [0, 1]
    ):
        reply = post_json(server.base, V1, {"instances": instances})
        assert reply.status == 200, reply.body
        predictions = reply.json()["predictions"]
        got = np.array([p["probabilities"] for p in predictions])
        np.testing.assert_allclose(got, expected, atol=2e-6)
        assert [p["class_id"] for p in predictions] == expected.argmax(1).tolist()
        assert predictions[0]["label"] == f"class{expected[0].argmax()}"
        assert reply.headers["x-request-id"]


def test_v2_uint8_fp32_and_bytes_tensors_match_onnx_runtime(server: ServerProcess, champion: tuple[Path, Path]) -> None:
    images = sample_images(3, seed=1)
    expected = reference_probabilities(champion[1], images)
    bytes_input = {
        "inputs": [{"name": "images", "datatype": "BYTES", "shape": [3], "data": [b64(png(im)) for im in images]}]
    }
    for doc in (_v2_pixels(images, id="req-7"), _v2_pixels(images[..., 0], "FP32"), bytes_input):
        reply = post_json(server.base, V2, doc)
        assert reply.status == 200, reply.body
        body = reply.json()
        assert body["model_name"] == MODEL and body["model_version"] == "1"
        assert body.get("id") == doc.get("id")  # echoed when sent, absent (not a 500) when not
        outputs = {o["name"]: o for o in body["outputs"]}
        assert outputs["probabilities"]["shape"] == [3, 10] and outputs["probabilities"]["datatype"] == "FP32"
        np.testing.assert_allclose(np.reshape(outputs["probabilities"]["data"], (3, 10)), expected, atol=2e-6)
        assert outputs["class_id"]["data"] == expected.argmax(1).tolist()
        assert outputs["label"]["data"] == [f"class{k}" for k in expected.argmax(1)]


def test_v2_requested_outputs_only(server: ServerProcess) -> None:
    reply = post_json(server.base, V2, _v2_pixels(sample_images(2), outputs=[{"name": "class_id"}]))
    assert reply.status == 200
    assert [o["name"] for o in reply.json()["outputs"]] == ["class_id"]


def test_triton_client_binary_and_json_tensors(server: ServerProcess, champion: tuple[Path, Path]) -> None:
    """The standard Python client (tritonclient.http), binary tensor extension both ways, then plain JSON."""
    import tritonclient.http as httpclient

    images = sample_images(4, seed=2)
    expected = reference_probabilities(champion[1], images)
    client = httpclient.InferenceServerClient(server.base.removeprefix("http://"))
    try:
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)
        assert client.get_model_metadata(MODEL)["inputs"][0]["shape"] == [-1, 28, 28, 1]
        for binary in (True, False):
            tensor = httpclient.InferInput("images", list(images.shape), "UINT8")
            tensor.set_data_from_numpy(images, binary_data=binary)
            outputs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in ("probabilities", "label")]
            result = client.infer(MODEL, [tensor], outputs=outputs, request_id="tc-1")
            np.testing.assert_allclose(result.as_numpy("probabilities"), expected, atol=2e-6)
            labels = [x.decode() if isinstance(x, bytes) else x for x in result.as_numpy("label")]
            assert labels == [f"class{k}" for k in expected.argmax(1)]
            assert result.get_response()["id"] == "tc-1"
        encoded = np.array([png(im) for im in images], dtype=np.object_)
        tensor = httpclient.InferInput("images", [4], "BYTES")
        tensor.set_data_from_numpy(encoded, binary_data=True)
        result = client.infer(MODEL, [tensor])
        np.testing.assert_allclose(result.as_numpy("probabilities"), expected, atol=2e-6)
    finally:
        client.close()


def test_metadata_and_health_routes(server: ServerProcess) -> None:
    assert request(server.base, "GET", "/v2").json()["extensions"] == ["binary_tensor_data"]
    assert request(server.base, "GET", "/v2/health/live").json() == {"live": True}
    assert request(server.base, "GET", "/v2/health/ready").json() == {"ready": True}
    assert request(server.base, "GET", f"/v2/models/{MODEL}/versions/1").json()["versions"] == ["1"]
    assert request(server.base, "GET", f"/v2/models/{MODEL}/ready").status == 200
    assert request(server.base, "GET", "/v1/models").json() == {"models": [MODEL]}
    assert request(server.base, "GET", f"/v1/models/{MODEL}").json() == {"name": MODEL, "ready": True}


def test_metrics_count_requests_stages_batches_and_model(server: ServerProcess) -> None:
    post_json(server.base, V1, {"instances": [sample_images(1)[0, ..., 0].tolist()]})
    text = request(server.base, "GET", "/metrics").body.decode()
    assert f'distml_requests_total{{model="{MODEL}",protocol="v1",status="200"}}' in text
    for stage in ("decode", "queue", "infer", "encode", "total"):
        assert f'distml_request_seconds_count{{protocol="v1",stage="{stage}"}}' in text
    assert "distml_batch_size_count" in text and "distml_queue_depth" in text
    assert f'distml_model_info{{model="{MODEL}",platform="onnxruntime",version="1"}} 1.0' in text
    assert 'distml_log_events_total{outcome="dropped"} 0.0' in text


# -- bad input: (case, method, path, headers, body, status, words the error must contain) -----------------------
_IMG = sample_images(1)[0]
_OK_PIXELS = _IMG[..., 0].tolist()
_PNG = png(_IMG)
_GIF = gif(_IMG)
_JSON = {"content-type": "application/json"}


def _j(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def _v2(**tensor: Any) -> bytes:
    base = {"name": "images", "datatype": "UINT8", "shape": [1, 28, 28, 1], "data": _IMG.ravel().tolist()}
    return _j({"inputs": [{**base, **tensor}]})


def _binary(header: dict[str, Any], payload: bytes, length: int | None = None) -> tuple[dict[str, str], bytes]:
    head = json.dumps(header).encode()
    return {"inference-header-content-length": str(len(head) if length is None else length),
            "content-type": "application/octet-stream"}, head + payload  # fmt: skip


def _bin_images(size: int, datatype: str = "UINT8", shape: list[int] | None = None, **more: Any) -> dict[str, Any]:
    return {"inputs": [{"name": "images", "datatype": datatype, "shape": shape or [1, 28, 28, 1],
                        "parameters": {"binary_data_size": size}, **more}]}  # fmt: skip


BAD: list[tuple[str, str, str, dict[str, str], bytes, int, str]] = [
    ("v1 invalid json", "POST", V1, _JSON, b"{bad", 400, "not valid JSON"),
    ("v2 invalid json", "POST", V2, _JSON, b'{"inputs": [', 400, "not valid JSON"),
    ("v1 empty body", "POST", V1, _JSON, b"", 400, "body is empty"),
    ("v1 body is a list", "POST", V1, _JSON, b"[1, 2]", 400, "JSON object"),
    ("v1 no instances", "POST", V1, _JSON, _j({"inputs": []}), 400, 'no "instances"'),
    ("v1 instances not a list", "POST", V1, _JSON, _j({"instances": {"b64": "x"}}), 400, "must be a list"),
    ("v1 empty batch", "POST", V1, _JSON, _j({"instances": []}), 400, "empty"),
    ("v1 10,000 instances", "POST", V1, _JSON, _j({"instances": [{"b64": "AAAA"}] * 10_000}), 413, "10,000 instances"),
    (
        "text/plain",
        "POST",
        V1,
        {"content-type": "text/plain"},
        _j({"instances": [_OK_PIXELS]}),
        415,
        "application/json",
    ),
    (
        "curl's default form type",
        "POST",
        V2,
        {"content-type": "application/x-www-form-urlencoded"},
        _v2(),
        415,
        "Content-Type",
    ),
    ("gzip body", "POST", V1, {**_JSON, "content-encoding": "gzip"}, b"\x1f\x8b", 415, "Content-Encoding"),
    (
        "bad base64",
        "POST",
        V1,
        _JSON,
        _j({"instances": [{"b64": "not base64!"}]}),
        400,
        "instances[0].b64: is not valid base64",
    ),
    ("b64 not a string", "POST", V1, _JSON, _j({"instances": [{"b64": 12}]}), 400, "expected a base64 string"),
    ("instance is a string", "POST", V1, _JSON, _j({"instances": ["abc"]}), 400, 'expected {"b64"'),
    ("image_bytes without b64", "POST", V1, _JSON, _j({"instances": [{"image_bytes": "x"}]}), 400, "instances[0]"),
    (
        "truncated png",
        "POST",
        V1,
        _JSON,
        _j({"instances": [{"b64": b64(_PNG[: len(_PNG) // 2])}]}),
        400,
        "cannot be decoded",
    ),
    (
        "not an image",
        "POST",
        V1,
        _JSON,
        _j({"instances": [{"b64": b64(b"hello, this is text")}]}),
        400,
        "not a PNG or JPEG",
    ),
    ("gif", "POST", V1, _JSON, _j({"instances": [{"b64": b64(_GIF)}]}), 400, "is a GIF image"),
    (
        "10,000 x 10,000 png",
        "POST",
        V1,
        _JSON,
        _j({"instances": [{"b64": b64(raw_png(10_000, 10_000))}]}),
        413,
        "10000x10000 pixels",
    ),
    (
        "decompression bomb",
        "POST",
        V1,
        _JSON,
        _j({"instances": [{"b64": b64(raw_png(60_000, 60_000, rows=2))}]}),
        413,
        "decompression bomb",
    ),
    (
        "bomb within pillow's limit",
        "POST",
        V1,
        _JSON,
        _j({"instances": [{"b64": b64(raw_png(5_000, 9_000, rows=2))}]}),
        413,
        "5000x9000 pixels",
    ),
    (
        "pixels wrong shape",
        "POST",
        V1,
        _JSON,
        _j({"instances": [np.zeros((27, 28), int).tolist()]}),
        400,
        "must be 28x28 or 28x28x1, got 27x28",
    ),
    ("pixels ragged", "POST", V1, _JSON, _j({"instances": [[[1, 2], [3]]]}), 400, "rectangular"),
    ("pixels over 255", "POST", V1, _JSON, _j({"instances": [np.full((28, 28), 300).tolist()]}), 400, "0..255"),
    ("float pixels over 1", "POST", V1, _JSON, _j({"instances": [np.full((28, 28), 2.5).tolist()]}), 400, "[0, 1]"),
    ("pixels are strings", "POST", V1, _JSON, _j({"instances": [np.full((28, 28), "a").tolist()]}), 400, "strings"),
    ("pixels and b64 mixed", "POST", V1, _JSON, _j({"instances": [{"b64": b64(_PNG)}, _OK_PIXELS]}), 400, "mix"),
    ("v2 no inputs", "POST", V2, _JSON, _j({"id": "x"}), 400, '"inputs"'),
    ("v2 inputs empty", "POST", V2, _JSON, _j({"inputs": []}), 400, '"inputs"'),
    ("v2 two inputs", "POST", V2, _JSON, _j({"inputs": [{}, {}]}), 400, "one input"),
    ("v2 wrong input name", "POST", V2, _JSON, _v2(name="pixels"), 400, "'pixels'"),
    ("v2 unknown datatype", "POST", V2, _JSON, _v2(datatype="UINT9"), 400, "not a V2 datatype"),
    ("v2 wrong datatype", "POST", V2, _JSON, _v2(datatype="INT32"), 400, "INT32 is not accepted"),
    ("v2 wrong rank", "POST", V2, _JSON, _v2(shape=[1, 28, 28, 1, 1]), 400, "[N, 28, 28, 1]"),
    ("v2 wrong dims", "POST", V2, _JSON, _v2(shape=[1, 32, 32, 1]), 400, "shape is [1, 32, 32, 1]"),
    ("v2 negative shape", "POST", V2, _JSON, _v2(shape=[-1, 28, 28, 1]), 400, "negative"),
    ("v2 huge shape", "POST", V2, _JSON, _v2(shape=[2**40, 28, 28, 1]), 400, "impossibly large"),
    ("v2 shape not ints", "POST", V2, _JSON, _v2(shape=["1", 28, 28, 1]), 400, "list of integers"),
    ("v2 shape vs data length", "POST", V2, _JSON, _v2(shape=[2, 28, 28, 1]), 400, "1,568 elements) but 784"),
    ("v2 empty batch", "POST", V2, _JSON, _v2(shape=[0, 28, 28, 1], data=[]), 400, "empty batch"),
    ("v2 10,000 images", "POST", V2, _JSON, _v2(shape=[10_000, 28, 28, 1]), 413, "10,000 images"),
    ("v2 uint8 with floats", "POST", V2, _JSON, _v2(data=[0.5] * 784), 400, "non-integers"),
    ("v2 fp32 out of range", "POST", V2, _JSON, _v2(datatype="FP32", data=[3.0] * 784), 400, "[0, 1]"),
    ("v2 bytes bad base64", "POST", V2, _JSON, _v2(datatype="BYTES", shape=[1], data=["%%%"]), 400, "base64"),
    ("v2 bytes wrong shape", "POST", V2, _JSON, _v2(datatype="BYTES", shape=[1, 28], data=["x"]), 400, "[N] or [N, 1]"),
    (
        "v2 unknown output",
        "POST",
        V2,
        _JSON,
        _j({**json.loads(_v2()), "outputs": [{"name": "embeddings"}]}),
        400,
        "'embeddings'",
    ),
    ("v2 id not a string", "POST", V2, _JSON, _j({**json.loads(_v2()), "id": 5}), 400, '"id" must be a string'),
    (
        "v2 parameters not an object",
        "POST",
        V2,
        _JSON,
        _j({**json.loads(_v2()), "parameters": [1]}),
        400,
        '"parameters" must be a JSON object',
    ),
    (
        "binary header not a number",
        "POST",
        V2,
        {"inference-header-content-length": "ten"},
        _v2(),
        400,
        "must be an integer",
    ),
    (
        "binary header longer than body",
        "POST",
        V2,
        *_binary(_bin_images(784), bytes(784), length=10**6),
        400,
        "the body has",
    ),
    ("binary size vs bytes sent", "POST", V2, *_binary(_bin_images(900), bytes(784)), 400, "binary_data_size is 900"),
    ("binary bytes vs shape", "POST", V2, *_binary(_bin_images(700), bytes(700)), 400, "784 bytes of UINT8"),
    ("binary and data both", "POST", V2, *_binary(_bin_images(784, data=[1]), bytes(784)), 400, "both"),
    (
        "binary BYTES truncated",
        "POST",
        V2,
        *_binary(_bin_images(8, "BYTES", [1]), b"\x64\x00\x00\x00abcd"),
        400,
        "fewer remain",
    ),
    ("binary extension on v1", "POST", V1, {"inference-header-content-length": "2"}, b"{}", 400, "V2 extension"),
    (
        "unknown model v1",
        "POST",
        "/v1/models/nope:predict",
        _JSON,
        _j({"instances": [_OK_PIXELS]}),
        404,
        "'nope' is not served here",
    ),
    ("unknown model v2", "POST", "/v2/models/nope/infer", _JSON, _v2(), 404, "'nope' is not served"),
    ("unknown version", "GET", f"/v2/models/{MODEL}/versions/9", {}, b"", 404, "version '9'"),
    ("GET on infer", "GET", V2, {}, b"", 405, "use POST"),
    ("unknown route", "GET", "/predict", {}, b"", 404, "no route"),
    ("body over the limit", "POST", V1, _JSON, b" " * 2_100_000, 413, "the limit is 2,000,000"),
]


def test_at_least_forty_bad_inputs_are_covered() -> None:
    assert len(BAD) >= 40 and len({case[0] for case in BAD}) == len(BAD)


@pytest.mark.parametrize(("case", "method", "path", "headers", "body", "status", "words"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_a_clear_error(
    server: ServerProcess, case: str, method: str, path: str, headers: dict[str, str], body: bytes, status: int,
    words: str,
) -> None:  # fmt: skip
    reply = request(server.base, method, path, body or None, headers)
    assert reply.status == status, (case, reply.body)
    assert reply.headers["content-type"] == "application/json"
    assert words in reply.json()["error"], reply.json()


def test_still_healthy_and_correct_after_every_bad_input(server: ServerProcess, champion: tuple[Path, Path]) -> None:
    for case in BAD:  # all of them again, back to back, then a real request
        request(server.base, case[1], case[2], case[4] or None, case[3])
    assert request(server.base, "GET", "/v2/health/ready").status == 200
    images = sample_images(2, seed=9)
    reply = post_json(server.base, V2, _v2_pixels(images))
    got = np.reshape(reply.json()["outputs"][0]["data"], (2, 10))
    np.testing.assert_allclose(got, reference_probabilities(champion[1], images), atol=2e-6)
    assert "500" not in request(server.base, "GET", "/metrics").body.decode().split("distml_request_seconds")[0]


# -- batching across protocols, request logging, shutdown, workers --------------------------------------------
class _Sink(http.server.ThreadingHTTPServer):
    """A CloudEvents sink (what KServe's message-dumper is): records every event's headers and body."""

    def __init__(self) -> None:
        self.events: list[dict[str, str]] = []
        self.connections: list[socket.socket] = []
        self.lock = threading.Lock()
        sink = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                sink.connections.append(self.connection)

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                # Answer first, record after: killed in between, the sender has its 200 and the event is counted
                # sent; the other order could record an event whose sender never heard back (counted dropped)
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()
                self.wfile.flush()
                with sink.lock:
                    sink.events.append(
                        {**{k.lower(): v for k, v in self.headers.items()}, "body": body.decode("latin-1")}
                    )

            def log_message(self, format: str, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/"

    def kill(self) -> None:
        """Gone, as a crashed pod is: no listener and every open connection cut."""
        self.shutdown()
        self.server_close()
        for conn in self.connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


def _log_counts(base: str) -> dict[str, float]:
    counts = {}
    for line in request(base, "GET", "/metrics").body.decode().splitlines():
        if line.startswith("distml_log_events_total"):
            counts[line.split('"')[1]] = float(line.split()[-1])
    return counts


def test_request_log_reconciles_even_when_the_sink_dies_mid_run(champion: tuple[Path, Path]) -> None:
    sink = _Sink()
    proc = ServerProcess(["--home", str(champion[0]), "serve", "--port", "0", "--log-url", sink.url])
    n, killed_after = 300, 150
    try:
        statuses: list[int] = []
        pixels = {"instances": [_OK_PIXELS]}

        def one(i: int) -> int:
            if i == killed_after:
                sink.kill()
            return post_json(proc.base, V1, pixels, {"x-request-id": f"req-{i}"}).status

        with ThreadPoolExecutor(4) as pool:
            statuses = list(pool.map(one, range(n)))
        assert statuses == [200] * n  # the sink's death costs clients nothing
        deadline = time.monotonic() + 30
        while (counts := _log_counts(proc.base)) and counts["sent"] + counts["dropped"] < 2 * n:
            assert time.monotonic() < deadline, counts
            time.sleep(0.2)
    finally:
        assert proc.stop() == 0, proc.output
    events = sink.events
    ids = {e["ce-inferenceid"] for e in events}
    assert ids <= {f"req-{i}" for i in range(n)}
    assert len({e["ce-id"] for e in events}) == len(events)  # every event its own id
    assert counts["sent"] == len(events) and counts["sent"] + counts["dropped"] == 2 * n
    missing = 2 * n - len(events)
    assert missing > 0 and counts["dropped"] == missing, (counts, len(events))
    first = [e for e in events if e["ce-inferenceid"] == "req-0"]
    assert sorted(e["ce-type"] for e in first) == ["org.kubeflow.serving.inference.request",
                                                    "org.kubeflow.serving.inference.response"]  # fmt: skip
    response = next(e for e in first if e["ce-type"].endswith("response"))
    assert response["ce-statuscode"] == "200" and json.loads(response["body"])["predictions"]
    assert json.loads(next(e for e in first if e["ce-type"].endswith("request"))["body"]) == pixels


def test_sigterm_drains_readiness_first_then_flushes_the_log_and_exits(
    champion: tuple[Path, Path], tmp_path: Path
) -> None:
    log_file = tmp_path / "requests.jsonl"
    proc = ServerProcess(["--home", str(champion[0]), "serve", "--port", "0", "--drain-s", "2",
                          "--log-file", str(log_file)])  # fmt: skip
    n = 40
    for i in range(n):
        assert post_json(proc.base, V1, {"instances": [_OK_PIXELS]}, {"x-request-id": f"r{i}"}).status == 200
    proc.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert request(proc.base, "GET", "/v2/health/ready").status == 503  # load balancers stop sending...
    assert request(proc.base, "GET", "/v2/health/live").status == 200
    assert post_json(proc.base, V2, _v2_pixels(sample_images(1))).status == 200  # ...but requests still work
    started = time.monotonic()
    assert proc.stop(timeout=30) == 0, proc.output
    assert time.monotonic() - started < 15
    assert proc.lines[-1] == "stopped"
    events = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert len(events) == 2 * (n + 1)
    by_id: dict[str, list[str]] = {}
    for event in events:
        assert event["specversion"] == "1.0" and event["source"] == f"/distml/serve/{MODEL}"
        by_id.setdefault(event["inferenceid"], []).append(event["type"].rsplit(".", 1)[1])
    assert all(sorted(kinds) == ["request", "response"] for kinds in by_id.values())
    assert {f"r{i}" for i in range(n)} <= set(by_id)


def test_two_workers_share_one_port_and_sum_their_metrics(champion: tuple[Path, Path]) -> None:
    proc = ServerProcess(["--home", str(champion[0]), "serve", "--port", "0", "--workers", "2"])
    try:
        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(lambda _: post_json(proc.base, V1, {"instances": [_OK_PIXELS]}).status, range(64)))
        assert statuses == [200] * 64
        text = request(proc.base, "GET", "/metrics").body.decode()
        line = next(x for x in text.splitlines() if x.startswith("distml_requests_total{") and 'status="200"' in x)
        assert float(line.split()[-1]) == 64.0
    finally:
        assert proc.stop() == 0, proc.output


def test_serving_process_never_loads_torch(champion: tuple[Path, Path]) -> None:
    proc = ServerProcess(["--home", str(champion[0]), "serve", str(champion[1]), "--port", "0"])
    try:
        assert post_json(proc.base, V1, {"instances": [_OK_PIXELS]}).status == 200
        maps = Path(f"/proc/{proc.proc.pid}/maps").read_text()
        assert "onnxruntime" in maps and "libtorch" not in maps
    finally:
        proc.stop()


def test_serve_cli_errors_are_one_line(champion: tuple[Path, Path], tmp_path: Path) -> None:
    from conftest import run_cli

    result = run_cli("--home", champion[0], "serve", str(tmp_path / "nowhere"))
    assert result.code == 2 and "is not a model artifact" in result.err and "Traceback" not in result.err
    result = run_cli("--home", tmp_path / "empty", "serve")
    assert result.code != 0 and "fashion-mnist-classifier" in result.err
    result = run_cli("--home", champion[0], "serve", "--max-batch-size", "0")
    assert result.code == 2 and "max_batch_size" in result.err
    result = run_cli("--home", champion[0], "serve", "--log-url", "ftp://x", "--port", "0")
    assert result.code == 2 and "log_url" in result.err


# -- the app in-process (the real ASGI app and model, called without a socket) ------------------------------------
def _asgi_calls(model_dir: Path, calls: list[tuple[str, bytes]], **settings: Any) -> tuple[list[Any], Any]:
    import asyncio

    from distml.config import ServeConfig
    from distml.serve import build_app

    app = build_app(ServeConfig(**settings), model_dir)

    async def main() -> list[Any]:
        await app.startup()
        try:
            return list(await asyncio.gather(*(asgi_post(app, path, body) for path, body in calls)))
        finally:
            await app.shutdown()

    return asyncio.run(main()), app


def test_v1_and_v2_requests_share_one_batch(champion: tuple[Path, Path]) -> None:
    images = sample_images(2, seed=4)
    calls = [(V1, _j({"instances": [images[0, ..., 0].tolist()]})), (V2, _j(_v2_pixels(images[1:])))]
    results, app = _asgi_calls(champion[1], calls, max_batch_delay_ms=200)
    assert [status for status, _, _ in results] == [200, 200]
    assert app.metrics.registry.get_sample_value("distml_batch_size_count") == 1.0
    assert app.metrics.registry.get_sample_value("distml_batch_size_sum") == 2.0
    expected = reference_probabilities(champion[1], images)
    np.testing.assert_allclose(results[0][2]["predictions"][0]["probabilities"], expected[0], atol=2e-6)
    np.testing.assert_allclose(results[1][2]["outputs"][0]["data"], expected[1], atol=2e-6)


def test_a_full_queue_answers_503_with_retry_after(champion: tuple[Path, Path]) -> None:
    body = _j({"instances": [_OK_PIXELS]})
    results, _ = _asgi_calls(champion[1], [(V1, body), (V1, body)], max_queue=1, max_queue_wait_ms=0)
    assert [status for status, _, _ in results] == [200, 503]
    assert results[1][1]["retry-after"] == "1" and "queue is full" in results[1][2]["error"]


def test_a_full_queue_lets_a_request_wait_briefly_for_a_place(champion: tuple[Path, Path]) -> None:
    # The overload policy: a request that finds every place held waits (up to max_queue_wait_ms) for one to free
    # up instead of bouncing straight back as a 503; the second request here gets its answer.
    body = _j({"instances": [_OK_PIXELS]})
    results, app = _asgi_calls(champion[1], [(V1, body), (V1, body)], max_queue=1, max_queue_wait_ms=5000)
    assert [status for status, _, _ in results] == [200, 200]
    assert app.batcher.waiting == 0


# -- abuse of the connection: slow, idle, oversized and overlapping clients ------------------------------------
GUARDED = ["--max-queue", "4", "--header-timeout-s", "1", "--body-timeout-s", "2", "--idle-timeout-s", "1",
           "--max-header-bytes", "8192", "--max-inflight-bytes", "65536"]  # fmt: skip


@pytest.fixture(scope="module")
def guarded(champion: tuple[Path, Path]) -> Iterator[ServerProcess]:
    proc = ServerProcess(["--home", str(champion[0]), "serve", str(champion[1]), "--port", "0", *GUARDED])
    try:
        yield proc
    finally:
        assert proc.stop() == 0, proc.output


def _open(base: str) -> socket.socket:
    host, port = base.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def _head(path: str, length: int, extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n{extra}\r\n").encode()  # fmt: skip


def _read_reply(sock: socket.socket, timeout: float) -> bytes:
    """Everything the server sends until it closes the connection (or ``timeout`` passes)."""
    sock.settimeout(timeout)
    data = b""
    with contextlib.suppress(TimeoutError, ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


def test_slow_drip_bodies_hold_no_queue_place_and_get_408(guarded: ServerProcess) -> None:
    # max_queue (4) connections send their headers and then a byte now and then: they used to hold every place
    # in the queue while their bodies trickled in, and every other request got 503.
    drips = [_open(guarded.base) for _ in range(4)]
    started = time.monotonic()
    for sock in drips:
        sock.sendall(_head(V2, 5000) + b'{"inputs"')
    stop = threading.Event()

    def drip() -> None:
        while not stop.wait(0.2):
            for sock in drips:
                with contextlib.suppress(OSError):
                    sock.sendall(b" ")

    dripper = threading.Thread(target=drip, daemon=True)
    dripper.start()
    try:
        time.sleep(0.3)
        t0 = time.monotonic()
        reply = post_json(guarded.base, V2, _v2_pixels(sample_images(1)))
        assert reply.status == 200 and time.monotonic() - t0 < 1.0, reply.body
        for sock in drips:  # the body deadline (2 s) ends each of them with a 408 and a closed connection
            answer = _read_reply(sock, timeout=6)
            assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
            assert b"did not arrive within 2 s" in answer
        assert time.monotonic() - started < 5
    finally:
        stop.set()
        dripper.join(5)
        for sock in drips:
            sock.close()


def test_an_idle_connection_is_closed(guarded: ServerProcess) -> None:
    with _open(guarded.base) as sock:
        t0 = time.monotonic()
        assert _read_reply(sock, timeout=10) == b""  # closed without a word: nothing was asked
        assert time.monotonic() - t0 < 3


def test_headers_that_trickle_in_get_408(guarded: ServerProcess) -> None:
    with _open(guarded.base) as sock:
        sock.sendall(f"POST {V2} HTTP/1.1\r\nHost: t\r\n".encode())
        t0 = time.monotonic()
        for _ in range(10):  # one header byte every 0.3 s: the header deadline (1 s) passes first
            time.sleep(0.3)
            with contextlib.suppress(OSError):
                sock.sendall(b"X")
        answer = _read_reply(sock, timeout=5)
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
        assert b"headers did not arrive within 1 s" in answer and time.monotonic() - t0 < 5


def test_oversized_headers_get_431(guarded: ServerProcess) -> None:
    with _open(guarded.base) as sock:
        sock.sendall(_head(V2, 2, extra="X-Big: " + "a" * 100_000 + "\r\n") + b"{}")
        answer = _read_reply(sock, timeout=5)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert b"over 8,192 bytes" in answer
    assert request(guarded.base, "GET", "/v2/health/live").status == 200
    assert (
        'distml_requests_total{model="unknown",protocol="http",status="431"}'
        in request(guarded.base, "GET", "/metrics").body.decode()
    )


def test_bodies_in_flight_have_a_byte_budget(guarded: ServerProcess) -> None:
    # 64 KiB of bodies may be in flight; one client has declared 60,000 bytes and is still sending them.
    with _open(guarded.base) as hog:
        hog.sendall(_head(V2, 60_000) + b"{")
        time.sleep(0.2)
        body = _j(_v2_pixels(sample_images(2)))
        assert 5000 < len(body) < 10_000
        reply = request(guarded.base, "POST", V2, body, {"content-type": "application/json"})
        assert reply.status == 503 and reply.headers["retry-after"] == "1", reply.body
        assert "bytes of request bodies" in reply.json()["error"]
    time.sleep(0.2)  # the hog is gone: its share of the budget comes back
    assert request(guarded.base, "POST", V2, body, {"content-type": "application/json"}).status == 200


def test_error_messages_clip_what_the_client_sent(guarded: ServerProcess) -> None:
    reply = request(guarded.base, "GET", "/nowhere/" + "x" * 5000)
    assert reply.status == 404 and len(reply.body) < 400 and "characters)" in reply.json()["error"]


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(c) for c in text.split()]


def test_a_worker_that_keeps_dying_is_restarted_with_backoff(champion: tuple[Path, Path], tmp_path: Path) -> None:
    import shutil

    model = tmp_path / "model"
    shutil.copytree(champion[1], model)
    proc = ServerProcess(["--home", str(champion[0]), "serve", str(model), "--port", "0", "--workers", "2"])
    try:
        workers = [p for p in _children(proc.proc.pid) if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert len(workers) == 2
        deadline = time.monotonic() + 60  # both workers have their model (the first may answer alone before)
        while not all(b"onnxruntime" in Path(f"/proc/{p}/maps").read_bytes() for p in workers):
            assert time.monotonic() < deadline, proc.output
            time.sleep(0.2)
        time.sleep(1)
        shutil.rmtree(model)  # every new worker now fails to load its model and dies at once
        os.kill(workers[0], signal.SIGKILL)
        deadline = time.monotonic() + 30
        delays: list[float] = []
        while time.monotonic() < deadline and len(delays) < 3:
            delays = [float(line.split()[-2]) for line in proc.lines if line.startswith("worker 0 (pid")]
            time.sleep(0.2)
        assert delays[:3] == [0.5, 1.0, 2.0], proc.output  # doubling, not a tight respawn loop
        assert "cannot start" in proc.output and "Traceback" not in proc.output
        assert post_json(proc.base, V1, {"instances": [_OK_PIXELS]}).status == 200  # the other worker serves on
    finally:
        proc.stop()


def test_health_answers_within_100_ms_while_a_huge_body_is_parsed(champion: tuple[Path, Path]) -> None:
    # Two 16 MiB bodies that used to hold the event loop for about a second each: a JSON array of numbers, and a
    # binary BYTES tensor of four million empty elements.
    numbers = b'{"inputs":[{"name":"images","datatype":"UINT8","shape":[1,28,28,1],"data":[' + b"1," * 8_000_000
    numbers += b"1]}]}"
    count = 4_000_000
    header, blob = _binary(
        {
            "inputs": [
                {"name": "images", "datatype": "BYTES", "shape": [count], "parameters": {"binary_data_size": 4 * count}}
            ]
        },
        bytes(4 * count),
    )
    proc = ServerProcess(["--home", str(champion[0]), "serve", str(champion[1]), "--port", "0"])
    try:
        for headers, body in (({"content-type": "application/json"}, numbers), (header, blob)):
            assert len(body) < 16 << 20
            latencies: list[float] = []
            stop = threading.Event()

            def probe(stop: threading.Event = stop, latencies: list[float] = latencies) -> None:
                while not stop.is_set() and len(latencies) < 500:
                    t0 = time.perf_counter()
                    assert request(proc.base, "GET", "/v2/health/live").status == 200
                    latencies.append(time.perf_counter() - t0)
                    time.sleep(0.01)

            prober = threading.Thread(target=probe)
            prober.start()
            time.sleep(0.1)
            reply = request(proc.base, "POST", V2, body, headers)
            time.sleep(0.1)
            stop.set()
            prober.join(10)
            assert reply.status in (400, 413), reply.body[:300]
            assert len(latencies) >= 5 and max(latencies) < 0.1, (reply.body[:200], sorted(latencies)[-5:])
    finally:
        proc.stop()
