"""The dynamic batcher's policy and the request codecs, without HTTP (the server tests cover the wire)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest

from distml.errors import OverloadedError, PayloadTooLargeError, RequestError
from distml.serve.batcher import Batcher, Result
from distml.serve.codec import InputSpec, b64decode, pixel_instances, pixels_to_uint8
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
    with batcher.admit():
        await asyncio.sleep(0)  # reading and decoding the body
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
        holds = [batcher.admit() for _ in range(2)]
        for hold in holds:
            hold.__enter__()
        with pytest.raises(OverloadedError) as info:
            batcher.admit().__enter__()
        assert info.value.status == 503 and info.value.headers == {"retry-after": "1"}
        for hold in holds:
            hold.__exit__(None, None, None)

    _run(go, recorder, max_queue=2)


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
            batcher.admit().__enter__()

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
