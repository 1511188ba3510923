"""The model server under hostile input, end to end: a real ``distml serve`` on 127.0.0.1 with a request log.

Each test sends what the security review (issue 15) sent and checks the answer on the wire; the last one checks
that the request log still accounts for every answered request after a body that used to stop it for good.
The protocol-level details (messages, limits, timings) are in tests/test_serve_units.py.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from serve_support import MODEL, ServerProcess, b64, png, post_json, raw_png, request, sample_images

V1 = f"/v1/models/{MODEL}:predict"
V2 = f"/v2/models/{MODEL}/infer"
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def log_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("reqlog") / "requests.jsonl"


@pytest.fixture(scope="module")
def server(champion: tuple[Path, Path], log_file: Path) -> Iterator[ServerProcess]:
    home, _ = champion
    proc = ServerProcess(["--home", str(home), "serve", "--port", "0", "--max-instances", "64",
                          "--log-file", str(log_file)])  # fmt: skip
    try:
        yield proc
    finally:
        assert proc.stop() == 0, proc.output


def _deep(depth: int, leaf: str) -> str:
    return "[" * depth + leaf + "]" * depth


def _pixels_doc(n: int = 1, **extra: Any) -> dict[str, Any]:
    images = sample_images(n)
    tensor = {"name": "images", "datatype": "UINT8", "shape": list(images.shape), "data": images.ravel().tolist()}
    return {"inputs": [tensor], **extra}


def _metrics(base: str) -> tuple[float, dict[str, float]]:
    """(inference requests answered, request-log events by outcome) from /metrics."""
    answered, events = 0.0, {}
    for line in request(base, "GET", "/metrics").body.decode().splitlines():
        if line.startswith("distml_requests_total{") and f'model="{MODEL}"' in line:
            answered += float(line.split()[-1])
        elif line.startswith("distml_log_events_total"):
            events[line.split('"')[1]] = float(line.split()[-1])
    return answered, events


def test_v2_repeated_outputs_are_a_400_not_a_31_mb_answer(server: ServerProcess) -> None:
    """Finding 2: 3,000 copies of {"name": "probabilities"} (276 KB) made a 30.9 MB answer."""
    reply = post_json(server.base, V2, _pixels_doc(outputs=[{"name": "probabilities"}] * 3000))
    assert reply.status == 400 and '"outputs" has 3,000 entries' in reply.json()["error"]
    reply = post_json(server.base, V2, _pixels_doc(outputs=[{"name": "label"}, {"name": "label"}]))
    assert reply.status == 400 and "asks for 'label' again" in reply.json()["error"]
    reply = post_json(server.base, V2, _pixels_doc(outputs=[{"name": "label"}, {"name": "class_id"}]))
    assert reply.status == 200 and [o["name"] for o in reply.json()["outputs"]] == ["label", "class_id"]


def test_deep_nesting_is_a_400_not_a_500(server: ServerProcess) -> None:
    """Finding 9: BYTES data nested 1,000 deep was a RecursionError: a 500 and a 1,000-frame traceback."""
    body = '{"inputs":[{"name":"images","datatype":"BYTES","shape":[1],"data":' + _deep(1000, '"aGk="') + "}]}"
    reply = request(server.base, "POST", V2, body.encode(), JSON)
    assert reply.status == 400 and "nested more than 2 lists deep" in reply.json()["error"]
    shape = '{"inputs":[{"name":"images","datatype":"UINT8","shape":' + _deep(1000, "1") + ',"data":[1]}]}'
    reply = request(server.base, "POST", V2, shape.encode(), JSON)
    assert reply.status == 400 and len(reply.json()["error"]) < 200
    assert 'status="500"' not in request(server.base, "GET", "/metrics").body.decode()


def test_pixel_budget_is_a_413_before_decoding(server: ServerProcess) -> None:
    """Finding 6: three 16 KB PNGs of 4096 x 4096 are 50 M pixels to decode; the default budget is 2 x 4096^2."""
    doc = {"instances": [{"b64": b64(raw_png(4096, 4096))} for _ in range(3)]}
    started = time.monotonic()
    reply = post_json(server.base, V1, doc)
    assert reply.status == 413, reply.body
    assert "50,331,648 pixels in all" in reply.json()["error"] and "33,554,432" in reply.json()["error"]
    assert time.monotonic() - started < 2.0
    one = post_json(server.base, V1, {"instances": [{"b64": b64(png(sample_images(1)[0]))}]})
    assert one.status == 200


def test_request_log_reconciles_after_a_poison_request(server: ServerProcess, log_file: Path) -> None:
    """Finding 5: a body nested 300 deep made the file sink's orjson.dumps raise TypeError, which killed the
    delivery thread: nothing logged after it, counters stuck. Now every answered request is two events, sent or
    dropped, and the requests after the poison are in the file."""
    doc = {"instances": [sample_images(1)[0, ..., 0].tolist()]}
    for i in range(3):
        assert post_json(server.base, V1, doc, {"x-request-id": f"before-{i}"}).status == 200
    poison = '{"instances": ' + _deep(300, "1") + "}"
    reply = request(server.base, "POST", V1, poison.encode(), {**JSON, "x-request-id": "poison"})
    assert reply.status == 400
    for i in range(5):
        assert post_json(server.base, V1, doc, {"x-request-id": f"after-{i}"}).status == 200
    deadline = time.monotonic() + 15
    while True:
        answered, events = _metrics(server.base)
        if events["sent"] + events["dropped"] == 2 * answered:
            break
        assert time.monotonic() < deadline, (answered, events)
        time.sleep(0.1)
    assert events["dropped"] == 0, events  # nothing here is a reason to drop: the poison is logged as bytes
    logged = {}
    for line in log_file.read_text().splitlines():
        event = json.loads(line)
        logged.setdefault(event["inferenceid"], []).append(event)
    assert {f"after-{i}" for i in range(5)} <= set(logged)
    request_event = next(e for e in logged["poison"] if e["type"].endswith("request"))
    assert base64.b64decode(request_event["data_base64"]) == poison.encode()
    assert np.isclose(sum(len(v) for v in logged.values()), events["sent"])
