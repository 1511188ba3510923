"""The one dynamic batcher behind both protocols.

Requests (V1 or V2, any number of images each) join one queue; one inference thread takes them in arrival order
into batches of up to ``max_batch_size`` images, runs each batch (ONNX Runtime releases the GIL while it works)
and hands the results back to the event loop in one callback per batch. The thread, not an asyncio task, forms
the batches: under overload one pass of the event loop handles hundreds of requests, and a batching task that
got one step per pass ran one batch per pass (measured: queue waits of 250-500 ms at 1,000 connections).

When to close a batch is the whole policy, and it is adaptive rather than a fixed wait:

- while a batch runs, new requests queue up; the next batch takes everything queued (natural batching under
  load, no added delay);
- it waits for more, up to ``max_batch_delay_ms`` after its first request arrived, only while other requests
  have been admitted and are still being parsed or decoded: those are certain to arrive soon. A lone client
  (concurrency 1) therefore never waits for a batch that is not coming.

A request bigger than ``max_batch_size`` runs as a batch of its own. A request whose client gave up (timeout)
is skipped when its turn comes.

Admission (who may join the queue) is the overload policy. A request holds a place from the moment it is
admitted (after its body has arrived, before it is parsed) until a batch takes it. When all ``max_queue`` places
are held, a new request waits for one, and places go to the newest waiter first, and only to one that has waited
at most ``max_queue_wait_s``, so an admitted request is never one that has already waited long. A request that
gets no place is answered 503 ``refusal_delay_s`` after it arrived (or ``max_queue_wait_s`` if that is longer),
not at once. Answering 503 at once looks cheaper but is not: closed-loop clients (load generators, callers that
retry at once) come straight back, and under 10x overload the event loop spent its core refusing while the
batches starved (measured: goodput fell to 6% of capacity). Held refusals cost a timer each and bound the
refusal rate by the number of refused clients over the delay, the same pace ``Retry-After: 1`` asks of a client.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
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
        max_queue_wait_s: float = 0.05,
        refusal_delay_s: float = 1.0,
        on_batch: Callable[[int, int], None] | None = None,
    ) -> None:
        self._predict = predict
        self.max_batch_size = max_batch_size
        self.max_batch_delay_s = max_batch_delay_s
        self.max_queue = max_queue
        self.max_queue_wait_s = max_queue_wait_s
        self.refusal_delay_s = refusal_delay_s
        self._on_batch = on_batch  # (batch size in images, queue depth after taking it), for metrics
        self._queue: deque[_Item] = deque()  # appended on the loop, taken by the inference thread, under _cond
        self._cond = threading.Condition()
        self._incoming = 0  # admitted, still being parsed or decoded
        self._waiting: deque[tuple[float, asyncio.Future[None]]] = deque()  # (arrived, place), oldest first
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False

    @property
    def depth(self) -> int:
        """Requests waiting for the model, plus those admitted and on their way to the queue."""
        return len(self._queue) + self._incoming

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="distml-infer", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        """Requests waiting for a place in the queue."""
        return sum(not place.done() for _, place in self._waiting)

    @contextlib.asynccontextmanager
    async def place(self) -> AsyncIterator[None]:
        """Hold a place for a request while it is parsed, decoded and queued; wait for one when all are held.

        Raises :class:`OverloadedError` (503) when none frees up within ``max_queue_wait_s``, or when closing.
        """
        if self._closing:
            raise OverloadedError("the server is shutting down")
        if self.depth >= self.max_queue:
            await self._wait_for_place()
        else:
            self._incoming += 1
        try:
            yield
        finally:
            self._incoming -= 1
            self._hand_out_places()

    async def _wait_for_place(self) -> None:
        """Wait for a place, handed over (``_incoming`` counted) by :meth:`_hand_out_places`, or a held 503."""
        if self.max_queue_wait_s <= 0:
            raise OverloadedError(f"the queue is full ({self.max_queue} requests waiting); retry shortly")
        loop = asyncio.get_running_loop()
        place: asyncio.Future[None] = loop.create_future()
        while self._waiting and self._waiting[0][1].done():  # the oldest expire first: drop them from the front
            self._waiting.popleft()
        self._waiting.append((time.perf_counter(), place))
        hold = max(self.max_queue_wait_s, self.refusal_delay_s)
        expiry = loop.call_later(hold, _expire, place, self.max_queue, self.max_queue_wait_s)
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
        oldest = time.perf_counter() - self.max_queue_wait_s
        while self._waiting and self.depth < self.max_queue:
            arrived, place = self._waiting[-1]  # newest first (see the module docstring)
            if place.done():  # expired
                self._waiting.pop()
                continue
            if arrived < oldest:
                break  # this one and every one before it waited too long: their 503s are due at their expiry
            self._waiting.pop()
            self._incoming += 1
            place.set_result(None)

    async def submit(self, images: np.ndarray, timeout_s: float) -> Result:
        """Queue ``images`` (``uint8`` N x H x W x C) and wait for their probabilities, at most ``timeout_s``."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Result] = loop.create_future()
        with self._cond:
            self._queue.append(_Item(images, future))
            self._cond.notify()
        # A timer on the future rather than asyncio.timeout(): no task cancellation, a third of the cost
        expiry = loop.call_later(timeout_s, _time_out, future, timeout_s)
        try:
            return await future
        finally:
            expiry.cancel()

    async def close(self) -> None:
        """Finish what is queued, then stop the inference thread."""
        self._closing = True
        while self._waiting:
            _, place = self._waiting.popleft()
            if not place.done():
                place.set_exception(OverloadedError("the server is shutting down"))
        with self._cond:
            self._cond.notify()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
        for _ in range(3):  # the thread's last results were handed to the loop: let their requests run
            await asyncio.sleep(0)

    # -- the inference thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        assert self._loop is not None
        loop = self._loop
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            loop.call_soon_threadsafe(self._hand_out_places)  # their places are free now
            images = batch[0].images if len(batch) == 1 else np.concatenate([item.images for item in batch])
            started = time.perf_counter()
            if self._on_batch is not None:
                self._on_batch(len(images), len(self._queue))
            try:
                probabilities = self._predict(images)
            except Exception as exc:  # an internal failure: every request of the batch gets it (as a 500)
                loop.call_soon_threadsafe(_fail, batch, exc)
                continue
            loop.call_soon_threadsafe(_deliver, batch, probabilities, started, time.perf_counter() - started)

    def _next_batch(self) -> list[_Item] | None:
        """Wait for the first live request, then gather more as the policy allows; ``None`` once closed and empty."""
        with self._cond:
            while True:
                while not self._queue:
                    if self._closing:
                        return None
                    self._cond.wait()
                first = self._queue.popleft()
                if not first.future.done():  # skip requests whose client timed out
                    break
            batch, size = [first], len(first.images)
            deadline = first.queued_at + self.max_batch_delay_s
            while size < self.max_batch_size:
                if self._queue:
                    item = self._queue[0]
                    if item.future.done():
                        self._queue.popleft()
                        continue
                    if size + len(item.images) > self.max_batch_size:
                        break
                    batch.append(self._queue.popleft())
                    size += len(item.images)
                    continue
                wait = deadline - time.perf_counter()
                if self._incoming == 0 or wait <= 0 or self._closing:
                    break
                self._cond.wait(wait)
            return batch


def _deliver(batch: list[_Item], probabilities: np.ndarray, started: float, infer_s: float) -> None:
    """On the event loop: each request of a batch gets its rows."""
    size, start = len(probabilities), 0
    for item in batch:
        n = len(item.images)
        if not item.future.done():
            item.future.set_result(Result(probabilities[start : start + n], started - item.queued_at, infer_s, size))
        start += n


def _fail(batch: list[_Item], exc: Exception) -> None:
    for item in batch:
        if not item.future.done():
            item.future.set_exception(exc)


def _expire(place: asyncio.Future[None], max_queue: int, wait_s: float) -> None:
    if not place.done():
        place.set_exception(
            OverloadedError(
                f"the queue is full ({max_queue} requests) and no place freed up within {wait_s:g} s; retry shortly"
            )
        )


def _time_out(future: asyncio.Future[Result], timeout_s: float) -> None:
    if not future.done():  # the batcher skips a done future when its turn comes
        future.set_exception(
            OverloadedError(
                f"no answer within the request timeout ({timeout_s:g} s): the model is overloaded; retry shortly"
            )
        )
