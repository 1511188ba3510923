"""The dynamic batcher's policy and the request codecs, without HTTP (the server tests cover the wire)."""

from __future__ import annotations

import asyncio
import base64
import inspect
import io
import json
import struct
import sys
import threading
import time
import tracemalloc
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from distml.config import ServeConfig
from distml.errors import OverloadedError, PayloadTooLargeError, RequestError
from distml.serve import v1
from distml.serve.batcher import Batcher, Result
from distml.serve.codec import (
    InputSpec,
    ResponseTooLargeError,
    b64decode,
    declared_pixels,
    pixel_instances,
    pixels_to_uint8,
)
from distml.serve.inputs import Inputs
from distml.serve.reqlog import RequestLogger
from distml.serve.v2 import encode_infer, parse_infer


class Recorder:
    """A stand-in model: row i of the output holds the first pixel of image i, so answers can be traced."""

    def __init__(self, delay_s: float = 0.0, fail: bool = False) -> None:
        self.batches: list[int] = []
        self.delay_s, self.fail = delay_s, fail
        self.release = threading.Event()
        self.release.set()

    def __call__(self, images: np.ndarray) -> np.ndarray:
        self.release.wait(5)
        self.batches.append(len(images))
        time.sleep(self.delay_s)
        if self.fail:
            raise RuntimeError("model exploded")
        return images.reshape(len(images), -1)[:, :1].astype(np.float32)


def _images(first: int, n: int = 1) -> np.ndarray:
    return np.full((n, 2, 2, 1), first, dtype=np.uint8)


def _run(coro_fn: Callable[[Batcher], object], recorder: Recorder, **kwargs: float) -> object:
    async def main() -> object:
        settings = {"max_batch_size": 4, "max_batch_delay_s": 0.05, "max_queue": 16, **kwargs}
        batcher = Batcher(recorder, **settings)  # type: ignore[arg-type]
        batcher.start()
        try:
            return await coro_fn(batcher)  # type: ignore[misc]
        finally:
            await batcher.close()

    return asyncio.run(main())


async def _request(batcher: Batcher, first: int, n: int = 1, timeout_s: float = 5.0) -> Result:
    async with batcher.place():
        await asyncio.sleep(0)  # parsing and decoding the body
    return await batcher.submit(_images(first, n), timeout_s)


def test_a_lone_request_does_not_wait_for_a_batch() -> None:
    recorder = Recorder()

    async def go(batcher: Batcher) -> float:
        started = time.perf_counter()
        await _request(batcher, 7)
        return time.perf_counter() - started

    assert _run(go, recorder, max_batch_delay_s=2.0) < 0.5  # type: ignore[operator]
    assert recorder.batches == [1]


def test_concurrent_requests_share_a_batch_and_get_their_own_rows() -> None:
    recorder = Recorder()

    async def go(batcher: Batcher) -> list[Result]:
        return await asyncio.gather(*(_request(batcher, i) for i in range(3)))

    results = _run(go, recorder)
    assert recorder.batches == [3]
    assert [float(r.probabilities[0, 0]) for r in results] == [0.0, 1.0, 2.0]  # type: ignore[attr-defined]
    assert all(r.batch_size == 3 for r in results)  # type: ignore[attr-defined]


def test_batches_never_exceed_the_maximum_but_a_big_request_runs_alone() -> None:
    recorder = Recorder()

    async def go(batcher: Batcher) -> list[Result]:
        return await asyncio.gather(*(_request(batcher, i) for i in range(10)), _request(batcher, 50, n=7))

    results = _run(go, recorder)
    assert sum(recorder.batches) == 17 and 7 in recorder.batches
    assert all(size <= 4 for size in recorder.batches if size != 7)
    assert results[-1].probabilities.shape == (7, 1)  # type: ignore[index]


def test_a_full_queue_is_a_503_with_retry_after() -> None:
    recorder = Recorder()

    async def go(batcher: Batcher) -> None:
        holds = [batcher.place() for _ in range(2)]
        for hold in holds:
            await hold.__aenter__()
        with pytest.raises(OverloadedError) as info:
            await batcher.place().__aenter__()
        assert info.value.status == 503 and info.value.headers == {"retry-after": "1"}
        for hold in holds:
            await hold.__aexit__(None, None, None)

    _run(go, recorder, max_queue=2, max_queue_wait_s=0)


def test_a_full_queue_hands_places_to_the_newest_waiter_and_refuses_the_old_ones_late() -> None:
    # The overload policy: places go newest first, only to a request that has waited at most max_queue_wait_s;
    # one that gets none is answered 503 refusal_delay_s after it came, not at once.
    recorder = Recorder()

    async def go(batcher: Batcher) -> None:
        hold = batcher.place()
        await hold.__aenter__()  # the one place is held
        started = time.perf_counter()
        old = asyncio.create_task(batcher.place().__aenter__())
        await asyncio.sleep(0.15)  # the old waiter is past max_queue_wait_s (0.1 s) now
        new = asyncio.create_task(batcher.place().__aenter__())
        await asyncio.sleep(0.01)
        await hold.__aexit__(None, None, None)  # a place frees up: the new waiter gets it, not the old one
        await asyncio.sleep(0.01)
        assert new.done() and not new.exception() and not old.done()
        with pytest.raises(OverloadedError, match="no place freed up"):
            await old
        assert 0.45 < time.perf_counter() - started < 1.0  # refused at refusal_delay_s, not at once

    _run(go, recorder, max_queue=1, max_queue_wait_s=0.1, refusal_delay_s=0.5)


def test_loop_lag_says_late_while_the_loop_is_busy_and_after() -> None:
    from distml.serve.overload import LoopLag

    async def main() -> list[bool]:
        lag = LoopLag(target_s=0.05)
        lag.start()
        await asyncio.sleep(0.03)
        seen = [lag.late]
        time.sleep(0.12)  # a long pass of the loop: late already while it runs
        seen.append(lag.late)
        await asyncio.sleep(0.001)
        seen.append(lag.late)  # the probe that ran late says so
        await asyncio.sleep(0.05)
        seen.append(lag.late)  # and the loop has caught up
        lag.stop()
        return seen

    assert asyncio.run(main()) == [False, True, True, False]


def test_loop_lag_probe_sleeps_while_the_server_is_idle() -> None:
    """An idle server is not woken every 5 ms: with nothing in the server the probe stops after one look, a long
    pass of the loop then counts as nothing to be late for, and the first request wakes the probe again."""
    from distml.serve.overload import LoopLag

    busy = [False]

    async def main() -> list[bool]:
        lag = LoopLag(target_s=0.05, busy=lambda: busy[0])
        lag.start()
        await asyncio.sleep(0.03)  # the first probe found the server idle and stopped
        time.sleep(0.12)
        seen = [lag.late]  # asleep: not late
        busy[0] = True
        lag.wake()  # a request came in
        time.sleep(0.12)
        seen.append(lag.late)  # probing again: this pass is late
        await asyncio.sleep(0.001)
        seen.append(lag.late)
        lag.stop()
        return seen

    assert asyncio.run(main()) == [False, True, True]


def test_a_request_that_times_out_is_skipped_not_run() -> None:
    recorder = Recorder()
    recorder.release.clear()  # the model is stuck on the first batch

    async def go(batcher: Batcher) -> None:
        first = asyncio.create_task(_request(batcher, 1))
        await asyncio.sleep(0.05)
        with pytest.raises(OverloadedError, match="request timeout"):
            await _request(batcher, 2, timeout_s=0.1)
        recorder.release.set()
        await first

    _run(go, recorder)
    assert recorder.batches == [1]  # the timed-out request never reached the model


def test_a_model_failure_reaches_every_request_of_its_batch() -> None:
    recorder = Recorder(fail=True)

    async def go(batcher: Batcher) -> list[BaseException | Result]:
        return await asyncio.gather(*(_request(batcher, i) for i in range(2)), return_exceptions=True)

    outcomes = _run(go, recorder)
    assert [type(o) for o in outcomes] == [RuntimeError, RuntimeError]  # type: ignore[attr-defined]


def test_close_answers_what_is_queued_then_refuses() -> None:
    recorder = Recorder(delay_s=0.05)

    async def go(batcher: Batcher) -> None:
        tasks = [asyncio.create_task(_request(batcher, i)) for i in range(6)]
        await asyncio.sleep(0.01)
        await batcher.close()
        assert all(t.done() and not t.exception() for t in tasks)
        with pytest.raises(OverloadedError, match="shutting down"):
            await batcher.place().__aenter__()

    _run(go, recorder)
    assert sum(recorder.batches) == 6


# -- codecs ------------------------------------------------------------------------------------------------------
SPEC = InputSpec(2, 2, 1)


def test_pixels_integers_and_unit_floats_become_uint8() -> None:
    assert pixels_to_uint8(np.array([0, 255]), "x").tolist() == [0, 255]
    assert pixels_to_uint8(np.array([0.0, 0.5, 1.0]), "x").tolist() == [0, 128, 255]
    for bad in (np.array([-1]), np.array([1.5]), np.array([np.nan]), np.array([True]), np.array(["a"])):
        with pytest.raises(RequestError):
            pixels_to_uint8(bad, "x")


def test_pixel_instances_accept_hw_or_hwc_for_one_channel() -> None:
    assert pixel_instances([[[1, 2], [3, 4]]], SPEC, "i").shape == (1, 2, 2, 1)
    assert pixel_instances([[[[1], [2]], [[3], [4]]]], SPEC, "i").shape == (1, 2, 2, 1)
    with pytest.raises(RequestError, match="2x2 or 2x2x1, got 3x2"):
        pixel_instances([[[1, 2], [3, 4], [5, 6]]], SPEC, "i")


def test_b64_padding_is_optional_but_the_alphabet_is_strict() -> None:
    assert b64decode("aGk", "x") == b"hi" and b64decode("aGk=", "x") == b"hi"
    with pytest.raises(RequestError, match="not valid base64"):
        b64decode("a-_k", "x")


def test_v2_binary_round_trip_of_outputs() -> None:
    body = b'{"inputs":[{"name":"images","datatype":"UINT8","shape":[1,2,2],"data":[1,2,3,4]}],' \
           b'"outputs":[{"name":"label","parameters":{"binary_data":true}},{"name":"class_id"}]}'  # fmt: skip
    request = parse_infer(body, None, SPEC, max_instances=8)
    assert request.inputs.pixels is not None and request.inputs.pixels.shape == (1, 2, 2, 1)
    out, header_length = encode_infer(
        request, np.array([[0.1, 0.9]], np.float32), np.array(["a", "b"], object), "m", "1"
    )
    assert header_length is not None
    assert out[header_length:] == b"\x01\x00\x00\x00b"  # BYTES: 4-byte little-endian length, then the bytes
    assert b'"data":[1]' in out[:header_length]


def test_v2_too_many_images_is_413() -> None:
    body = b'{"inputs":[{"name":"images","datatype":"BYTES","shape":[9],"data":[]}]}'
    with pytest.raises(PayloadTooLargeError):
        parse_infer(body, None, SPEC, max_instances=8)


# -- hardening (issue 15) ----------------------------------------------------------------------------------------
def _deep(depth: int, leaf: str = '"aGk="') -> str:
    return "[" * depth + leaf + "]" * depth


DEEP = "@deep@"


def _deepen(body: str | bytes, leaf: str = '"aGk="') -> bytes:
    """``body`` with the string DEEP replaced by ``leaf`` in 1,000 nested lists (Python's json module recurses, so
    it cannot write that; orjson reads up to 1,024 levels)."""
    text = body.decode() if isinstance(body, bytes) else body
    return text.replace(f'"{DEEP}"', _deep(1000, leaf)).encode()


def _v2_body(**tensor: object) -> bytes:
    base: dict[str, object] = {"name": "images", "datatype": "UINT8", "shape": [1, 2, 2], "data": [1, 2, 3, 4]}
    merged = {key: value for key, value in {**base, **tensor}.items() if value is not None}  # None: leave it out
    return json.dumps({"inputs": [merged]}).encode()


def test_v2_outputs_beyond_the_models_or_repeated_are_refused() -> None:
    """Finding 2: each ``outputs`` entry is serialised in full; 3,000 copies of one made a 31 MB answer."""
    head = '{"inputs":[{"name":"images","datatype":"UINT8","shape":[1,2,2],"data":[1,2,3,4]}],"outputs":'
    many = (head + json.dumps([{"name": "probabilities"}] * 3000) + "}").encode()
    with pytest.raises(RequestError) as info:
        parse_infer(many, None, SPEC, max_instances=8)
    assert info.value.status == 400 and '"outputs" has 3,000 entries; this model has 3 outputs' in info.value.message
    twice = (head + '[{"name": "label"}, {"name": "class_id"}, {"name": "label"}]}').encode()
    with pytest.raises(RequestError, match=r"outputs\[2\] asks for 'label' again") as info:
        parse_infer(twice, None, SPEC, max_instances=8)
    assert info.value.status == 400
    three = (head + '[{"name": "label"}, {"name": "class_id"}, {"name": "probabilities"}]}').encode()
    assert [name for name, _ in parse_infer(three, None, SPEC, max_instances=8).outputs] == [
        "label",
        "class_id",
        "probabilities",
    ]


def test_responses_over_the_size_cap_are_refused_with_the_sizes() -> None:
    """Finding 2: the encoders refuse an answer over ``max_bytes`` (500: a server limit, see ResponseTooLargeError),
    and their default is ServeConfig's."""
    request = parse_infer(_v2_body(), None, SPEC, max_instances=8)
    probabilities = np.full((64, 1000), 1e-3, np.float32)
    labels = np.array([f"class{i}" for i in range(1000)], object)
    for encode in (
        lambda cap: encode_infer(request, probabilities, labels, "m", "1", max_bytes=cap)[0],
        lambda cap: v1.encode_predictions(probabilities, labels, max_bytes=cap),
    ):
        size = len(encode(10**9))
        assert len(encode(size)) == size  # exactly at the cap is fine
        for cap in (size - 1, 1024):  # just over (checked on the result) and far over (before serialising)
            with pytest.raises(ResponseTooLargeError) as info:
                encode(cap)
            assert info.value.status == 500
            assert f"this server answers at most {cap:,} bytes" in info.value.message
            assert "for 64 images" in info.value.message and "send fewer images" in info.value.message
    default = ServeConfig().max_response_bytes
    for fn in (encode_infer, v1.encode_predictions):
        assert inspect.signature(fn).parameters["max_bytes"].default == default


@pytest.mark.parametrize(
    "body",
    [
        _deepen(_v2_body(datatype="BYTES", shape=[1], data=DEEP)),  # recursive _flatten_strings
        _deepen(_v2_body(shape=DEEP), "1"),  # repr() of the shape in the message
        _deepen(_v2_body(name=DEEP), '"x"'),  # repr() of the name
        _deepen(_v2_body(datatype=DEEP), '"x"'),
        _deepen(_v2_body(data=DEEP), "1"),
        _deepen(_v2_body(parameters={"binary_data_size": DEEP}, data=None), "1"),
        _deepen(json.dumps({"inputs": json.loads(_v2_body())["inputs"], "outputs": [{"name": DEEP}]})),
        _deepen(json.dumps({"instances": DEEP}), "1"),
    ],
    ids=["bytes data", "shape", "name", "datatype", "uint8 data", "binary_data_size", "output name", "v1"],
)
def test_deep_nesting_is_a_400_not_a_recursion_error(body: bytes) -> None:
    """Finding 9: client JSON nested 1,000 deep (orjson reads up to 1,024) is walked without recursion: a 400."""
    parse = v1.parse_predict if body.startswith(b'{"instances"') else partial(parse_infer, header_length=None)
    with pytest.raises(RequestError) as info:
        parse(body, spec=SPEC, max_instances=8)
    assert info.value.status == 400 and len(info.value.message) < 300, info.value.message


def test_bytes_data_nested_as_the_shape_allows_still_works() -> None:
    png = _png_bytes(np.zeros((2, 2), np.uint8))
    for shape, data in (([2], [png, png]), ([2, 1], [[png], [png]])):
        request = parse_infer(_v2_body(datatype="BYTES", shape=shape, data=data), None, SPEC, max_instances=8)
        assert request.inputs.decode(SPEC, "d").shape == (2, 2, 2, 1)
    with pytest.raises(RequestError, match="nested more than 2 lists deep"):
        parse_infer(_v2_body(datatype="BYTES", shape=[1, 1], data=[[[png]]]), None, SPEC, max_instances=8)


MiB = 1 << 20


def _sixteen_mib_bodies() -> list[tuple[str, bytes, str | None, str]]:
    n = 16 * MiB // 4
    head = json.dumps({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1],
                                   "parameters": {"binary_data_size": 4 * n}}]}).encode()  # fmt: skip
    numbers = b'{"inputs":[{"name":"images","datatype":"UINT8","shape":[1,28,28,1],"data":[' + b"0," * (8 * MiB)
    strings = b'{"inputs":[{"name":"images","datatype":"BYTES","shape":[1],"data":[' + b'"",' * (5 * MiB)
    return [
        ("binary BYTES of empty elements", head + bytes(4 * n), str(len(head)), "the binary data holds more"),
        ("JSON numbers", numbers + b"0]}]}", None, "commas: more values than 256 images of 28x28x1"),
        ("JSON empty strings", strings + b'""]}]}', None, "commas: more values than 256 images of 28x28x1"),
    ]


def test_sixteen_mib_bodies_are_refused_before_anything_big_is_built() -> None:
    """Finding 7: the counts are checked before lists or arrays are built (on db4f3f5: 0.7-6 s and 60-210 MiB
    each; now ~20-40 ms and almost nothing allocated)."""
    spec = InputSpec(28, 28, 1)
    for case, body, header, words in _sixteen_mib_bodies():
        tracemalloc.start()
        started = time.perf_counter()
        try:
            with pytest.raises(RequestError, match=words):
                parse_infer(body, header, spec, max_instances=256)
            elapsed = time.perf_counter() - started
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 4 * MiB, (case, peak)  # the body is 16 MiB: nothing of its size was copied or built
        assert elapsed < 0.5, (case, elapsed)


def test_pixel_budget_is_summed_from_the_headers_before_any_image_is_decoded() -> None:
    """Finding 6: 3 PNGs of 4096 x 4096 (16 KB each, 50 M pixels in all) are over the default budget of
    2 x 4096 x 4096. The first one's pixel data is missing, so decoding it first would be a different error."""
    from serve_support import raw_png

    images = [raw_png(4096, 4096, rows=0), raw_png(4096, 4096), raw_png(4096, 4096)]
    spec = InputSpec(28, 28, 1)
    assert spec.max_request_pixels == ServeConfig().max_request_pixels == 2 * 4096 * 4096
    with pytest.raises(PayloadTooLargeError) as info:
        Inputs(encoded=images).decode(spec, "instances")
    assert info.value.status == 413
    assert "the request's 3 images are 50,331,648 pixels in all" in info.value.message
    assert "the limit is 33,554,432 per request" in info.value.message
    assert Inputs(encoded=images[1:2]).decode(spec, "instances").shape == (1, 28, 28, 1)  # one fits


def test_decoding_past_the_deadline_is_a_503_checked_between_images() -> None:
    """Finding 6: a request's images get ``decode_timeout_s`` in all (503 with Retry-After past it)."""
    from serve_support import raw_png

    big = raw_png(2048, 2048)  # ~30-50 ms to decode and resize
    spec = InputSpec(28, 28, 1, decode_timeout_s=0.001)
    assert InputSpec(28, 28, 1).decode_timeout_s == ServeConfig().decode_timeout_s
    with pytest.raises(OverloadedError) as info:
        Inputs(encoded=[big] * 6).decode(spec, "inputs[0].data")
    assert info.value.status == 503 and info.value.headers == {"retry-after": "1"}
    assert "decoding took over 0.001 s and was stopped after 1 of 6 images" in info.value.message
    assert Inputs(encoded=[big]).decode(spec, "d").shape == (1, 28, 28, 1)  # one image always decodes


def test_decoding_goes_off_the_loop_by_declared_pixels_not_only_bytes() -> None:
    """Finding 6: a 16 KB PNG of 4096 x 4096 was decoded on the event loop (under the 64 KiB offload threshold);
    the pixels its header declares (read by hand, PNG and JPEG) now count too."""
    from serve_support import raw_png

    def encoded(size: tuple[int, int], fmt: str, **options: object) -> bytes:
        buf = io.BytesIO()
        Image.new("L", size).save(buf, format=fmt, **options)
        return buf.getvalue()

    small, bomb = encoded((28, 28), "PNG"), raw_png(4096, 4096)
    assert len(bomb) < 64 << 10 and declared_pixels(bomb) == 4096 * 4096
    assert declared_pixels(encoded((300, 200), "JPEG")) == 300 * 200
    assert declared_pixels(encoded((300, 200), "JPEG", progressive=True)) == 300 * 200
    assert declared_pixels(b"GIF89a") is None
    assert Inputs(encoded=[bomb]).worth_offloading
    assert not Inputs(encoded=[small] * 8).worth_offloading
    assert Inputs(encoded=[small, b"not an image"]).worth_offloading  # cannot tell: assume costly
    assert not Inputs(pixels=np.zeros((1, 2, 2, 1), np.uint8)).worth_offloading


def test_only_png_and_jpeg_parsers_see_client_bytes() -> None:
    """Low: Image.open(formats=PNG, JPEG). Other formats' headers were parsed before: a BMP or GIF claiming
    60,000 x 60,000 was a 413 'decompression bomb' from their parsers; now no parser but PNG's and JPEG's runs."""
    bmp = (
        b"BM"
        + struct.pack("<IHHI", 0, 0, 0, 54)
        + struct.pack("<IiiHHIIiiII", 40, 60000, 60000, 1, 8, 0, 0, 0, 0, 0, 0)
    )
    gif = b"GIF89a" + struct.pack("<HHBBB", 60000, 60000, 0, 0, 0) + b"\x2c" + bytes(9) + b"\x08\x01\x00\x3b"
    for data, name in ((bmp, "BMP"), (gif, "GIF")):
        with pytest.raises(RequestError) as info:
            Inputs(encoded=[data]).decode(SPEC, "instances")
        assert info.value.status == 400 and info.value.message == f"instances[0]: is a {name} image; send PNG or JPEG"


def test_error_messages_clip_what_the_client_sent() -> None:
    """Low: a value the client sent is quoted at most ~80 characters long."""
    long = "x" * 100_000
    bodies = [
        _v2_body(name=long),
        _v2_body(datatype=long),
        _v2_body(shape=[long]),
        _v2_body(parameters={"binary_data_size": long}, data=None),
        json.dumps({"inputs": json.loads(_v2_body())["inputs"], "outputs": [{"name": long}]}).encode(),
    ]
    messages = []
    for body in bodies:
        with pytest.raises(RequestError) as info:
            parse_infer(body, None, SPEC, max_instances=8)
        messages.append(info.value.message)
    with pytest.raises(RequestError) as info:
        parse_infer(b"{}", long, SPEC, max_instances=8)
    messages.append(info.value.message)
    with pytest.raises(RequestError) as info:
        v1.parse_predict(json.dumps({long: 1}).encode(), SPEC, max_instances=8)
    messages.append(info.value.message)
    for message in messages:
        assert len(message) < 200 and "xxx..." in message, message


def test_parsing_is_thread_safe() -> None:
    """Finding 7: the lead calls the parsers off the event loop; run them on 4 threads at once, pixel arrays (once
    under warnings.catch_warnings, which is process-global) and PNGs mixed, and get what one thread gets."""
    png = _png_bytes(np.arange(4, dtype=np.uint8).reshape(2, 2))
    pixel_body = json.dumps({"instances": [[[1, 2], [3, 4]]] * 4}).encode()
    png_body = _v2_body(datatype="BYTES", shape=[3], data=[png] * 3)
    ragged = json.dumps({"instances": [[[1, 2], [3]]]}).encode()

    def work(i: int) -> int:
        for _ in range(50):
            assert v1.parse_predict(pixel_body, SPEC, 8).decode(SPEC, "i").sum() == 40
            assert parse_infer(png_body, None, SPEC, 8).inputs.decode(SPEC, "d").sum() == 18
            with pytest.raises(RequestError, match="rectangular"):
                v1.parse_predict(ragged, SPEC, 8)
        return i

    filters, interval = list(warnings.filters), sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: races show up within the test
    try:
        with ThreadPoolExecutor(4) as pool:
            assert list(pool.map(work, range(4))) == [0, 1, 2, 3]
    finally:
        sys.setswitchinterval(interval)
    assert warnings.filters == filters  # nothing leaked into the process-wide warning filters


def _png_bytes(image: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


# -- request log ---------------------------------------------------------------------------------------------------
class _Counts:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.outcomes: dict[str, int] = {}
        self.reasons: dict[str, int] = {}

    def outcome(self, outcome: str, n: int) -> None:
        with self.lock:
            self.outcomes[outcome] = self.outcomes.get(outcome, 0) + n

    def drop(self, reason: str, n: int) -> None:
        with self.lock:
            self.reasons[reason] = self.reasons.get(reason, 0) + n


def _logger(path: Path, counts: _Counts, **kwargs: int) -> RequestLogger:
    return RequestLogger(url=None, file=path, mode="all", model="m", version="1", on_outcome=counts.outcome,
                         on_drop=counts.drop, **{"buffer": 100, **kwargs})  # type: ignore[arg-type]  # fmt: skip


def test_request_log_survives_events_it_cannot_write(tmp_path: Path) -> None:
    """Finding 5: a body nested 300 deep (orjson writes only 255 levels) used to kill the delivery thread; now it
    is written as data_base64, an event that fails for any other reason is dropped with a reason, and the
    events after both are still delivered."""
    counts, path = _Counts(), tmp_path / "log.jsonl"
    logger = _logger(path, counts)
    poison = _deep(300, "1").encode()
    logger.log("request", "a", "/v1", "v1", b'{"instances": []}', "application/json")
    logger.log("request", "poison", "/v1", "v1", poison, "application/json")
    logger.log("request", "bug", "/v1", "v1", b"{}", None)  # type: ignore[arg-type]  # stands in for any bug
    logger.log("request", "after", "/v1", "v1", b'{"ok": 1}', "application/json")
    logger.close()
    assert counts.outcomes == {"sent": 3, "dropped": 1} and counts.reasons == {"encode_error": 1}
    assert logger.dropped == {"encode_error": 1}
    events = {e["inferenceid"]: e for e in map(json.loads, path.read_text().splitlines())}
    assert set(events) == {"a", "poison", "after"}
    assert base64.b64decode(events["poison"]["data_base64"]) == poison and "data" not in events["poison"]
    assert events["after"]["data"] == {"ok": 1}


def test_request_log_buffer_is_bounded_in_bytes(tmp_path: Path) -> None:
    """Finding 5: a body over ``max_buffer_bytes`` is dropped (buffer_full) even when the count has room."""
    counts, path = _Counts(), tmp_path / "log.jsonl"
    logger = _logger(path, counts, max_buffer_bytes=4096)
    logger.log("request", "big", "/v1", "v1", b"x" * 5000, "application/octet-stream")
    for i in range(5):
        logger.log("request", f"small{i}", "/v1", "v1", b"y" * 100, "application/octet-stream")
    logger.close()
    assert counts.reasons == {"buffer_full": 1}
    assert counts.outcomes["sent"] + counts.outcomes["dropped"] == 6 and counts.outcomes["dropped"] == 1
    assert "big" not in path.read_text() and path.read_text().count("small") == 5


def test_request_log_counts_a_sink_that_cannot_be_written(tmp_path: Path) -> None:
    """Finding 5: an unwritable log file is sink_error for every event, counted, and the thread keeps going."""
    counts = _Counts()
    (tmp_path / "file").write_text("")
    logger = _logger(tmp_path / "file" / "log.jsonl", counts)  # a file where the folder should be
    for i in range(3):
        logger.log("response", f"r{i}", "/v1", "v1", b"{}", "application/json", status=200)
        time.sleep(0.02)
    logger.close()
    assert counts.outcomes == {"dropped": 3} and counts.reasons == {"sink_error": 3}
