"""A shadow model: run on every request off the answer path, its top-1 agreement with the answer recorded.

The answer has already been computed when the shadow starts (:meth:`Shadow.start` is called with it), and the
shadow's run is a task of its own on its own batcher and inference thread: nothing on the answer path waits for
it, and nothing it returns reaches a client. When the shadow falls behind (``limit`` runs already waiting) a
request's shadow run is dropped and counted, never queued without bound. On one core the shadow's inference still
takes CPU time from the champion's: it costs throughput, never an answer's content.
"""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np

from distml.serve.metrics import Metrics
from distml.serve.variants import Variant

log = logging.getLogger("distml.serve")
WARN_EVERY_S = 60.0


class Shadow:
    """Runs ``variant`` on a copy of each request's images and compares its top-1 classes with the answer's."""

    def __init__(self, variant: Variant, metrics: Metrics, *, limit: int, timeout_s: float) -> None:
        self.variant = variant
        self.limit = limit  # shadow runs waiting at once, at most; past it they are dropped
        self.timeout_s = timeout_s
        self.pending = 0
        self._metrics = metrics
        self._tasks: set[asyncio.Task[None]] = set()  # strong references: a bare task may be collected mid-run
        self._warned = -WARN_EVERY_S
        self.agree = 0
        self.disagree = 0

    def start(self, images: np.ndarray, answer: np.ndarray) -> None:
        """Start a shadow run of ``images`` (N x H x W x C) whose answer was ``answer`` (N x classes)."""
        if self.pending >= self.limit or self.variant.closed:
            self._metrics.shadow_requests.labels("dropped").inc()
            return
        self.pending += 1
        task = asyncio.get_running_loop().create_task(self._run(images, answer.argmax(axis=1)))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, images: np.ndarray, top1: np.ndarray) -> None:
        try:
            result = await self.variant.batcher.submit(images, self.timeout_s)
        except Exception as exc:  # the shadow's failure is recorded, never anyone else's problem
            self._metrics.shadow_requests.labels("failed").inc()
            now = time.monotonic()
            if now - self._warned >= WARN_EVERY_S:
                self._warned = now
                log.warning(
                    "shadow %s version %s failed a request: %s", self.variant.model.name, self.variant.version, exc
                )
            return
        finally:
            self.pending -= 1
        same = int(np.count_nonzero(result.probabilities.argmax(axis=1) == top1))
        self.agree += same
        self.disagree += len(top1) - same
        self._metrics.shadow_requests.labels("compared").inc()
        self._metrics.shadow_images.labels("agree").inc(same)
        self._metrics.shadow_images.labels("disagree").inc(len(top1) - same)

    @property
    def agreement(self) -> float | None:
        """Top-1 agreement so far (agreeing images over compared images), None before any comparison."""
        total = self.agree + self.disagree
        return self.agree / total if total else None

    async def close(self) -> None:
        """Let the shadow runs in flight finish (they are bounded by the timeout), then close its batcher."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=self.timeout_s)
        self.variant.closed = True
        await self.variant.batcher.close()
