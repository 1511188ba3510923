"""How the server knows it is overloaded before its model does: the event loop's lag.

At 10x overload the first thing to run out is the event loop, not the model: parsing HTTP, JSON and building
tasks for 1,000 connections takes longer than answering them, requests wait unread in the kernel's socket
buffers, and the batch queue never looks full. What does show it is how late the loop runs a timer: one pass
over hundreds of ready connections takes hundreds of milliseconds, and a timer due every few milliseconds runs
that late. While the lag is over ``target_s`` the server refuses new inference requests (held, see
:mod:`~distml.serve.batcher`) before it reads or parses them, so the requests it does take are answered within
their latency budget and the refused clients come back at the refusal pace, not at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

PROBE_INTERVAL_S = 0.005


class LoopLag:
    """The event loop's lateness: a timer due every :data:`PROBE_INTERVAL_S` seconds, and how late it runs.

    :attr:`late` also counts the lateness building up *now*: the time since the next probe was due. One pass
    over a burst of requests can take a second, and a probe only runs after it; without this, every request of
    the first burst would be admitted by the measurement taken before the burst.

    The probe runs only while ``busy()`` says there is work (requests in the server): an idle server is not woken
    200 times a second. :meth:`wake` restarts it when work arrives; until its first probe is due the loop counts
    as on time, which it is: it has just picked up the request that woke it.
    """

    def __init__(self, target_s: float, busy: Callable[[], bool] = lambda: True) -> None:
        self.target_s = target_s
        self.lag_s = 0.0  # how late the last probe ran
        self._busy = busy
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0  # time.monotonic() when the next probe should run

    @property
    def late(self) -> bool:
        """Whether the loop runs (or is now running) later than the target: new work should be refused."""
        return self.current_s > self.target_s

    @property
    def current_s(self) -> float:
        if self._handle is None:
            return 0.0  # asleep: nothing to be late for
        return max(self.lag_s, time.monotonic() - self._due)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.wake()

    def wake(self) -> None:
        """Start probing again if idle (cheap when already probing: call it for every request)."""
        if self._handle is None and self._loop is not None:
            self._schedule(time.monotonic())

    def stop(self) -> None:
        self._loop = None
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _schedule(self, now: float) -> None:
        assert self._loop is not None
        self._due = now + PROBE_INTERVAL_S
        self._handle = self._loop.call_later(PROBE_INTERVAL_S, self._probe)

    def _probe(self) -> None:
        now = time.monotonic()
        self.lag_s = max(0.0, now - self._due)
        if self._busy() or self.lag_s > 0.001:
            self._schedule(now)
        else:  # idle and on time: sleep until the next request wakes it
            self._handle, self.lag_s = None, 0.0
