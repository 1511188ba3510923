"""Automatic canary rollback: the canary is judged against the champion over a sliding window.

Every answered request of the champion or the canary is recorded (time, whether it was a server error, its
latency from arrival to answer); a client's own mistakes (4xx) and requests whose client left (499) say nothing
about the model and are not counted. At most every :data:`CHECK_EVERY_S` seconds, over the last
``rollback_window_s`` seconds, once the canary has ``rollback_min_requests`` requests:

- its error rate (5xx share) minus the champion's is more than ``rollback_error_margin``, or
- its p99 latency is more than ``rollback_latency_ratio`` times the champion's and more than
  ``rollback_latency_floor_ms`` above it (when the champion has answered at least ``rollback_min_requests``
  requests in the window too: a p99 of a handful of requests is noise; so is a ratio of sub-millisecond p99s,
  which one scheduling hiccup doubles),

and the canary is rolled back: its share goes to 0 at once (the router stops sending it requests), and
``on_rollback`` is called with why (the app logs it, counts it, writes a request-log event and, with
``rollback_alias``, moves the registry alias back). A rolled-back canary stays at 0 until the server restarts.

The windows are per worker process: with ``--workers N`` each worker judges the requests it served.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from distml.config import ServeConfig
from distml.serve.variants import Router, Variant

CHECK_EVERY_S = 0.1  # how often the windows are judged at most (p99 of a window is a sort: not per request)


@dataclass(frozen=True)
class Verdict:
    """Why a canary was rolled back: the two variants' figures over the window."""

    reason: str
    canary_requests: int
    canary_error_rate: float
    canary_p99_s: float | None
    champion_requests: int
    champion_error_rate: float
    champion_p99_s: float | None

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


class _Window:
    """One variant's outcomes over the last ``span_s`` seconds."""

    def __init__(self, span_s: float) -> None:
        self.span_s = span_s
        self._items: deque[tuple[float, bool, float]] = deque()  # (when, server error, seconds)
        self.errors = 0

    def add(self, now: float, error: bool, seconds: float) -> None:
        self._items.append((now, error, seconds))
        self.errors += error

    def prune(self, now: float) -> None:
        oldest = now - self.span_s
        items = self._items
        while items and items[0][0] < oldest:
            self.errors -= items.popleft()[1]

    def __len__(self) -> int:
        return len(self._items)

    @property
    def error_rate(self) -> float:
        return self.errors / len(self._items) if self._items else 0.0

    def p99(self) -> float | None:
        if not self._items:
            return None
        return float(np.percentile(np.fromiter((s for _, _, s in self._items), float, len(self._items)), 99))


class Rollout:
    """Watches a router's canary and rolls it back (see the module docstring)."""

    def __init__(self, router: Router, config: ServeConfig, on_rollback: Callable[[Verdict], None]) -> None:
        self.router = router
        self.window_s = config.rollback_window_s
        self.min_requests = config.rollback_min_requests
        self.error_margin = config.rollback_error_margin
        self.latency_ratio = config.rollback_latency_ratio
        self.latency_floor_s = config.rollback_latency_floor_ms / 1000
        self._on_rollback = on_rollback
        self._windows = {"champion": _Window(self.window_s), "canary": _Window(self.window_s)}
        self._next_check = 0.0
        self.verdict: Verdict | None = None  # set once rolled back

    def record(self, variant: Variant, status: int, seconds: float) -> None:
        """One answered request of ``variant``: its HTTP-equivalent status and latency (arrival to answer)."""
        if self.verdict is not None or 400 <= status < 500:
            return  # rolled back already, or the client's mistake (or it left): nothing to say about the model
        window = self._windows.get(variant.role)
        if window is None or (variant.role == "champion" and variant is not self.router.champion):
            return  # a shadow, or a champion retired by a hot swap finishing its last requests
        now = time.monotonic()
        window.add(now, status >= 500, seconds)
        if now >= self._next_check:
            self._next_check = now + CHECK_EVERY_S
            self.check(now)

    def check(self, now: float | None = None) -> Verdict | None:
        """Judge the windows now; roll back (and return why) when the canary is worse past the margins."""
        if self.verdict is not None:
            return self.verdict
        now = time.monotonic() if now is None else now
        canary, champion = self._windows["canary"], self._windows["champion"]
        canary.prune(now)
        champion.prune(now)
        if len(canary) < self.min_requests:
            return None
        reason = None
        if canary.error_rate - champion.error_rate > self.error_margin:
            reason = (
                f"error rate {canary.error_rate:.1%} against the champion's {champion.error_rate:.1%} "
                f"(margin {self.error_margin:.1%})"
            )
        canary_p99, champion_p99 = canary.p99(), champion.p99()
        if (
            reason is None
            and len(champion) >= self.min_requests
            and _slower(canary_p99, champion_p99, self.latency_ratio, self.latency_floor_s)
        ):
            reason = (
                f"p99 latency {canary_p99 or 0:.4f} s against the champion's {champion_p99 or 0:.4f} s "
                f"(ratio limit {self.latency_ratio:g}, at least {self.latency_floor_s * 1000:g} ms slower)"
            )
        if reason is None:
            return None
        self.verdict = Verdict(
            reason=reason,
            canary_requests=len(canary),
            canary_error_rate=canary.error_rate,
            canary_p99_s=canary_p99,
            champion_requests=len(champion),
            champion_error_rate=champion.error_rate,
            champion_p99_s=champion_p99,
        )
        self.router.set_canary_percent(0)
        self._on_rollback(self.verdict)
        return self.verdict


def _slower(canary_p99: float | None, champion_p99: float | None, ratio: float, floor_s: float) -> bool:
    if canary_p99 is None or champion_p99 is None:
        return False
    return canary_p99 > ratio * champion_p99 and canary_p99 - champion_p99 > floor_s
