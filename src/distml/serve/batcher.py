"""The one dynamic batcher behind both protocols.

Requests (V1 or V2, any number of images each) join one queue; a single task takes them in arrival order into
batches of up to ``max_batch_size`` images and runs each batch on one inference thread, so the event loop keeps
reading and parsing requests while ONNX Runtime works (it releases the GIL).

When to close a batch is the whole policy, and it is adaptive rather than a fixed wait:

- while a batch runs, new requests queue up; the next batch takes everything queued (natural batching under
  load, no added delay);
- it waits for more, up to ``max_batch_delay_ms`` after its first request arrived, only while other requests
  have been admitted and are still being read or decoded: those are certain to arrive soon. A lone client
  (concurrency 1) therefore never waits for a batch that is not coming.

A request bigger than ``max_batch_size`` runs as a batch of its own. A request whose client gave up (timeout)
is skipped when its turn comes.

Admission (who may join the queue) is the overload policy. A request holds a place from the moment it is
admitted (after its body has arrived, before it is parsed) until a batch takes it. When all ``max_queue`` places
are held, a new request waits, first come first served, up to ``max_queue_wait_s`` for one to free up, and only
then gets a 503. Answering 503 at once looks cheaper but is not: closed-loop clients (load generators, retrying
callers) come straight back, and under 10x overload the event loop spends its core refusing while the inference
thread starves for the GIL (measured: goodput fell to 6% of capacity). Waiting a little keeps the queue full, so
every batch is a full one, and bounds the refusal rate by the number of waiting clients over the wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from distml.errors import OverloadedError


@dataclass(frozen=True)
class Result:
    """One request's share of a batch: its probabilities and how long it queued and ran."""

    probabilities: np.ndarray
    queue_s: float
    infer_s: float
    batch_size: int


@dataclass
class _Item:
    images: np.ndarray
    future: asyncio.Future[Result]
    queued_at: float = field(default_factory=time.perf_counter)


class Batcher:
    """Batches ``predict`` calls across concurrent requests (see the module docstring for the policy)."""

    def __init__(
        self,
        predict: Callable[[np.ndarray], np.ndarray],
        *,
        max_batch_size: int,
        max_batch_delay_s: float,
        max_queue: int,
        max_queue_wait_s: float = 0.1,
        on_batch: Callable[[int, int], None] | None = None,
    ) -> None:
        self._predict = predict
        self.max_batch_size = max_batch_size
        self.max_batch_delay_s = max_batch_delay_s
        self.max_queue = max_queue
        self.max_queue_wait_s = max_queue_wait_s
        self._on_batch = on_batch  # (batch size in images, queue depth after taking it), for metrics
        self._queue: deque[_Item] = deque()
        self._incoming = 0  # admitted, still being parsed or decoded
        self._waiting: deque[asyncio.Future[None]] = deque()  # for a place, in arrival order
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="distml-infer")
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    @property
    def depth(self) -> int:
        """Requests waiting for the model, plus those admitted and on their way to the queue."""
        return len(self._queue) + self._incoming

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="distml-batcher")

    @property
    def waiting(self) -> int:
        """Requests waiting for a place in the queue."""
        return len(self._waiting)

    @contextlib.contextmanager
    def admit(self) -> Iterator[None]:
        """Hold a place without waiting for one: 503 at once when the queue is full (TODO: tests move to place())."""
        if self._closing:
            raise OverloadedError("the server is shutting down")
        if self.depth >= self.max_queue:
            raise OverloadedError(f"the queue is full ({self.max_queue} requests waiting); retry shortly")
        self._incoming += 1
        try:
            yield
        finally:
            self._incoming -= 1
            self._hand_out_places()

    @contextlib.asynccontextmanager
    async def place(self) -> AsyncIterator[None]:
        """Hold a place for a request while it is parsed, decoded and queued; wait for one when all are held.

        Raises :class:`OverloadedError` (503) when none frees up within ``max_queue_wait_s``, or when closing.
        """
        if self._closing:
            raise OverloadedError("the server is shutting down")
        if self._waiting or self.depth >= self.max_queue:
            await self._wait_for_place()
        else:
            self._incoming += 1
        try:
            yield
        finally:
            self._incoming -= 1
            self._hand_out_places()

    async def _wait_for_place(self) -> None:
        """Wait in line; the place is handed over (``_incoming`` counted) by :meth:`_hand_out_places`."""
        if self.max_queue_wait_s <= 0:
            raise OverloadedError(f"the queue is full ({self.max_queue} requests waiting); retry shortly")
        loop = asyncio.get_running_loop()
        place: asyncio.Future[None] = loop.create_future()
        self._waiting.append(place)
        expiry = loop.call_later(self.max_queue_wait_s, _expire, place, self.max_queue, self.max_queue_wait_s)
        try:
            await place
        except asyncio.CancelledError:
            if place.done() and not place.cancelled() and place.exception() is None:
                self._incoming -= 1  # handed a place just as the request was cancelled: give it back
                self._hand_out_places()
            raise
        finally:
            expiry.cancel()

    def _hand_out_places(self) -> None:
        while self._waiting and self.depth < self.max_queue:
            place = self._waiting.popleft()
            if not place.done():  # expired waiters are skipped
                self._incoming += 1
                place.set_result(None)

    async def submit(self, images: np.ndarray, timeout_s: float) -> Result:
        """Queue ``images`` (``uint8`` N x H x W x C) and wait for their probabilities, at most ``timeout_s``."""
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._queue.append(_Item(images, future))
        self._wakeup.set()
        try:
            async with asyncio.timeout(timeout_s):
                return await future
        except TimeoutError:
            raise OverloadedError(
                f"no answer within the request timeout ({timeout_s:g} s): the model is overloaded; retry shortly"
            ) from None

    async def close(self) -> None:
        """Finish what is queued, then stop the batching task and the inference thread."""
        self._closing = True
        while self._waiting:
            place = self._waiting.popleft()
            if not place.done():
                place.set_exception(OverloadedError("the server is shutting down"))
        self._wakeup.set()
        if self._task is not None:
            await self._task
        self._executor.shutdown(wait=True)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            if batch is None:
                return
            images = batch[0].images if len(batch) == 1 else np.concatenate([item.images for item in batch])
            started = time.perf_counter()
            if self._on_batch is not None:
                self._on_batch(len(images), len(self._queue))
            try:
                probabilities = await loop.run_in_executor(self._executor, self._predict, images)
            except Exception as exc:  # an internal failure: every request of the batch gets it (as a 500)
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)
                continue
            infer_s = time.perf_counter() - started
            start = 0
            for item in batch:
                n = len(item.images)
                if not item.future.done():
                    result = Result(probabilities[start : start + n], started - item.queued_at, infer_s, len(images))
                    item.future.set_result(result)
                start += n

    async def _next_batch(self) -> list[_Item] | None:
        """Wait for the first live request, then gather more as the policy allows; ``None`` once closed and empty."""
        while True:
            while not self._queue:
                if self._closing:
                    return None
                self._wakeup.clear()
                await self._wakeup.wait()
            first = self._queue.popleft()
            self._hand_out_places()
            if not first.future.done():  # skip requests whose client timed out
                break
        batch, size = [first], len(first.images)
        deadline = first.queued_at + self.max_batch_delay_s
        while size < self.max_batch_size:
            if self._queue:
                item = self._queue[0]
                if item.future.done():
                    self._queue.popleft()
                    self._hand_out_places()
                    continue
                if size + len(item.images) > self.max_batch_size:
                    break
                batch.append(self._queue.popleft())
                size += len(item.images)
                self._hand_out_places()
                continue
            wait = deadline - time.perf_counter()
            if self._incoming == 0 or wait <= 0 or self._closing:
                break
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wakeup.wait()
        return batch


def _expire(place: asyncio.Future[None], max_queue: int, wait_s: float) -> None:
    if not place.done():
        place.set_exception(
            OverloadedError(
                f"the queue is full ({max_queue} requests) and no place freed up within {wait_s:g} s; retry shortly"
            )
        )
