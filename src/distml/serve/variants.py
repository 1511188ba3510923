"""The models a server answers with, and which one answers a request.

A :class:`Variant` is one loaded model with its own :class:`~distml.serve.batcher.Batcher` (its own inference
thread and queue), in a role: ``champion`` (the model the server serves), ``canary`` (a challenger that answers a
share of the requests) or ``shadow`` (runs on every request off the answer path; see :mod:`distml.serve.shadow`).

The :class:`Router` picks the variant that answers a request. With no canary, or a canary at 0%, that is one
attribute read. With a canary, the request's sticky key (the ``route_header``'s value, else its request id) is
hashed (BLAKE2b, 64 bits: stable across processes and restarts, unlike Python's ``hash``) onto [0, 1) and the
requests below the canary's share go to it, so one client that sends the same key always lands on the same
variant, and a share of P% of distinct keys goes to the canary.

A hot swap replaces :attr:`Router.champion` in one assignment on the event loop: a request picks its variant
once, at admission, and finishes on it, so requests in flight finish on the model (and batcher) they started on.
The old variant is *retired*: closed once nothing holds a place in its queue and no request is in its
:meth:`~Router.predict` step (see :meth:`Variant.retire`).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass, field

from distml.serve.batcher import Batcher
from distml.serve.model import ServedModel

_SPAN = float(1 << 64)  # the sticky hash is 64 bits; a key's bucket is hash / _SPAN, in [0, 1)


@dataclass(eq=False)
class Variant:
    """One loaded model, its batcher and its role (``champion`` | ``canary`` | ``shadow``)."""

    role: str
    model: ServedModel
    batcher: Batcher
    pending: int = 0  # requests between submitting to this batcher and their answer (see ServeApp.predict)
    closed: bool = False  # retired: the batcher is closed (or closing) and takes no more requests
    loaded_at: float = field(default_factory=time.time)
    version: str = field(init=False)  # the model's registry version ("1" for an unregistered folder)

    def __post_init__(self) -> None:
        self.version = self.model.version  # a plain attribute: read twice per request

    def busy(self) -> bool:
        """Whether a request still holds a place in this variant's queue or waits for its answer."""
        return self.pending > 0 or self.batcher.depth > 0 or self.batcher.waiting > 0

    async def retire(self, timeout_s: float, poll_s: float = 0.02) -> bool:
        """Close the batcher once no request uses it any more (at most ``timeout_s``); True if it drained.

        The variant is already out of the router: new requests go elsewhere. Requests that were admitted to it
        still finish here; past ``timeout_s`` (the request timeout, so nothing legitimate is left) it closes anyway.
        """
        deadline = time.monotonic() + timeout_s
        while self.busy() and time.monotonic() < deadline:
            await asyncio.sleep(poll_s)
        drained = not self.busy()
        self.closed = True
        await self.batcher.close()
        return drained


class Router:
    """Which variant answers a request: the champion, or the canary for its share of sticky keys."""

    def __init__(self, champion: Variant, canary: Variant | None = None, canary_percent: float = 0.0) -> None:
        self.champion = champion
        self.canary = canary
        self._cut = 0  # keys whose 64-bit hash is below this go to the canary; 0: none do
        self.set_canary_percent(canary_percent if canary is not None else 0.0)

    @property
    def canary_percent(self) -> float:
        """The canary's current share of keys, in percent (0 once rolled back)."""
        return self._cut / _SPAN * 100

    def set_canary_percent(self, percent: float) -> None:
        """Send ``percent`` % of keys to the canary (0..100); 0 stops routing to it at once."""
        if not 0 <= percent <= 100:
            raise ValueError(f"canary percent must be within 0..100, not {percent}")
        self._cut = 0 if self.canary is None else round(percent / 100 * _SPAN)

    def pick(self, key: str) -> Variant:
        """The variant that answers a request with sticky key ``key``."""
        if not self._cut:  # no canary, or rolled back: the hot path is this one test
            return self.champion
        assert self.canary is not None
        return self.canary if sticky_hash(key) < self._cut else self.champion

    def variants(self) -> list[Variant]:
        """The variants requests can be routed to (the champion first)."""
        return [self.champion] if self.canary is None else [self.champion, self.canary]

    def by_version(self, version: str) -> Variant | None:
        """The routable variant serving ``version`` (a request may ask for one by its V2 version path)."""
        for variant in self.variants():
            if variant.version == version and (variant is self.champion or self._cut):
                return variant
        return None


def sticky_hash(key: str) -> int:
    """A key's stable 64-bit hash: the same in every process and on every run (unlike ``hash(str)``)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")
