"""The model server: one ASGI application, its lifecycle, and the steps every inference request takes.

Layers, from the wire inwards (as in KServe's Python server): the transports, REST (:mod:`~distml.serve.rest`:
HTTP routes for V1, V2, health and metrics) and gRPC (:mod:`distml.serve.grpc_server`); the transport-neutral
steps here; the protocols (:mod:`~distml.serve.v1`, :mod:`~distml.serve.v2`: parse a body, encode a result);
the variants (:mod:`~distml.serve.variants`: the loaded models, each with its
:mod:`~distml.serve.batcher`, and which one answers) and what changes them while the server runs
(:mod:`~distml.serve.fleet`: hot swap, canary rollback, shadow).

An inference request, as a :class:`~distml.serve.call.Call`, in order (each step bounded, the cheap refusals
first), after its transport has read it:

1. :meth:`ServeApp.admit`: counted active, refused when the event loop runs late under a crowd (503, see
   :mod:`~distml.serve.overload`), its variant picked (the champion, or the canary for its share of sticky keys),
   and a place held in that variant's queue (waiting up to ``max_queue_wait_ms`` when all are held, then 503), so
   an overloaded server refuses before it parses anything;
2. inside it, the transport's parse and :meth:`ServeApp.decode`;
3. :meth:`ServeApp.predict`: the variant's batch, then the shadow started off the answer path;
4. the transport's encode, then :meth:`ServeApp.finish`: counted, the request log, the canary's rollout window.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any, NoReturn

import numpy as np

from distml.config import ServeConfig
from distml.errors import OverloadedError, RequestError
from distml.serve.batcher import Batcher, Result
from distml.serve.call import Call
from distml.serve.fleet import Fleet
from distml.serve.inputs import Inputs
from distml.serve.metrics import Metrics
from distml.serve.model import ServedModel
from distml.serve.overload import LoopLag
from distml.serve.reqlog import RequestLogger
from distml.serve.rest import ByteBudget, Rest
from distml.serve.source import ModelSource
from distml.serve.variants import Router, Variant
from distml.text import clip

__all__ = ["Call", "ServeApp"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

log = logging.getLogger("distml.serve")


class ServeApp:
    """ASGI app serving a champion (and a canary, a shadow) over KServe V1 and V2 (see the module docstring)."""

    def __init__(self, model: ServedModel, config: ServeConfig, source: ModelSource | None = None) -> None:
        self.config = config
        self.source = source or ModelSource(model.path)  # where the model came from: a hot swap re-resolves it
        self.name = model.name  # the served model's name: a hot swap brings a version of the same one
        self.metrics = Metrics(model.name, model.version)
        self.ready = False  # after startup; false again while draining
        self.draining = False
        self.reqlog: RequestLogger | None = None
        self.decode_pool: ThreadPoolExecutor | None = None
        self.bodies = ByteBudget(config.max_inflight_bytes)
        self.lag = LoopLag(config.max_loop_lag_ms / 1000, busy=lambda: self.active > 0)
        self.active = 0  # inference requests inside the app (reading, waiting, parsing, queued, answering)
        self._flusher: asyncio.Task[None] | None = None
        self.fleet = Fleet(model, config, self.source, self.metrics, on_change=lambda: self.rest.refresh())
        self.rest = Rest(self)  # the HTTP routes; gRPC (distml.serve.grpc_server) calls the steps below directly

    @property
    def router(self) -> Router:
        """Picks the variant that answers (the champion, or the canary for its share); swapped atomically."""
        return self.fleet.router

    @property
    def model(self) -> ServedModel:
        """The champion's model."""
        return self.fleet.router.champion.model

    @property
    def batcher(self) -> Batcher:
        """The champion's batcher."""
        return self.fleet.router.champion.batcher

    def variant_for(self, version: str | None) -> Variant | None:
        """The variant serving ``version`` (None: the champion), or None when no variant serves it."""
        return self.router.champion if version is None else self.router.by_version(version)

    # -- lifecycle -----------------------------------------------------------------------------------------
    async def startup(self) -> None:
        self.lag.start()
        self.decode_pool = ThreadPoolExecutor(2, thread_name_prefix="distml-decode")
        c = self.config
        if c.log_url or c.log_file:
            self.reqlog = self.fleet.reqlog = RequestLogger(
                url=c.log_url,
                file=c.log_file,
                mode=c.log_mode,
                model=self.name,
                version=self.router.champion.version,
                buffer=c.log_buffer,
                max_buffer_bytes=c.log_buffer_bytes,
                on_outcome=lambda outcome, n: self.metrics.log_events.labels(outcome).inc(n),
                on_drop=lambda reason, n: self.metrics.log_dropped.labels(reason).inc(n),
            )
        self.fleet.start()
        self._flusher = asyncio.get_running_loop().create_task(self._flush_metrics())
        self.ready = True

    async def _flush_metrics(self) -> None:
        # Counts gathered off the prometheus counters (Metrics.variant_request) reach them at least every second:
        # with --workers N a scrape reads every worker's counters from the shared files, not its own pending ones
        while True:
            await asyncio.sleep(1.0)
            self.metrics.flush()

    async def shutdown(self) -> None:
        """Stop taking requests, finish the queued ones (every variant's), flush the request log."""
        self.ready = False
        self.lag.stop()
        if self._flusher is not None:
            self._flusher.cancel()
        await self.fleet.stop()
        self.metrics.flush()
        if self.decode_pool is not None:
            self.decode_pool.shutdown(wait=True)
        if self.reqlog is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.reqlog.close)

    def refused(self, status: int) -> None:
        """A connection the HTTP layer refused before any route saw it (header deadline or size): counted."""
        self.metrics.request("http", "unknown", status)

    def drain(self) -> None:
        """Readiness goes false (load balancers stop sending), requests in flight still complete."""
        self.draining = True
        self.ready = False

    # -- the steps of an inference request, for every protocol ---------------------------------------------
    def admit(self, call: Call) -> AbstractAsyncContextManager[Variant]:
        """Count the request active, refuse it on overload (:class:`OverloadedError`), pick its variant and hold
        a place in that variant's queue (:class:`OverloadedError` when none frees up) while the request is parsed
        and decoded inside the block. After the block, call :meth:`predict` at once (no ``await`` in between):
        the variant's batcher stays open for a request that holds a place or is in ``predict``."""
        return _Admission(self, call)

    def count(self, call: Call) -> None:
        """Count ``call`` active once (admit does it; REST does it before reading the body, so a body that
        trickles in counts too)."""
        if not call.counted:
            call.counted = True
            self.active += 1
            self.lag.wake()

    def pick_version(self, call: Call) -> Variant:
        """The variant a request for one version (``call.version``) goes to; a 404 when none serves it (the
        transport checked the version, but a hot swap may have retired it since: a client error, never a 500)."""
        assert call.version is not None
        variant = self.fleet.router.by_version(call.version)
        if variant is None:
            raise RequestError(self.not_served(self.name, call.version), status=404)
        return variant

    async def decode(self, inputs: Inputs, variant: Variant, where: str) -> np.ndarray:
        """The request's images as the variant's ``uint8`` N x H x W x C (in a worker thread when large)."""
        spec = variant.model.spec
        if inputs.worth_offloading and self.decode_pool is not None:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self.decode_pool, inputs.decode, spec, where)
        return inputs.decode(spec, where)

    async def predict(self, call: Call, variant: Variant, images: np.ndarray) -> Result:
        """Run ``images`` in the variant's batch (after :meth:`admit`'s block), record the stage times, start the
        shadow off the answer path."""
        if variant.closed:  # retired while the caller awaited something after admit: never hang on its batcher
            raise OverloadedError("the model was replaced while this request waited; retry")
        variant.pending += 1
        decoded = time.perf_counter()
        try:
            result = await variant.batcher.submit(images, self.config.request_timeout_s)
        finally:
            variant.pending -= 1
        m, protocol = self.metrics, call.protocol
        m.stage(protocol, "decode", decoded - call.started)
        m.stage(protocol, "queue", result.queue_s)
        m.stage(protocol, "infer", result.infer_s)
        shadow = self.fleet.shadow
        if shadow is not None:
            shadow.start(images, result.probabilities)
        call.answered = time.perf_counter()
        return result

    def finish(
        self,
        call: Call,
        variant: Variant | None,
        status: int,
        endpoint: str,
        request: bytes,
        request_type: str,
        response: bytes,
        response_type: str,
    ) -> None:
        """Once per request, every outcome: uncount it, its stage times and counters, the rollout window, the
        request log (``status`` is HTTP-equivalent for every protocol)."""
        now = time.perf_counter()
        if call.counted:
            call.counted = False
            self.active -= 1
        m = self.metrics
        if status == 200 and call.answered:
            m.stage(call.protocol, "encode", now - call.answered)
            m.stage(call.protocol, "total", now - call.started)
        m.request(call.protocol, self.name, status)
        version = role = None
        if variant is not None:
            version, role = variant.version, variant.role
            m.variant_request(role, version, status)
            if self.fleet.rollout is not None:
                self.fleet.rollout.record(variant, status, now - call.started)
        if self.reqlog is not None:
            log_ = self.reqlog
            rid, protocol = call.request_id, call.protocol
            log_.log(
                "request",
                rid,
                endpoint,
                protocol,
                request,
                request_type,
                at=call.arrived,
                version=version,
                variant=role,
            )
            log_.log(
                "response", rid, endpoint, protocol, response, response_type, status, version=version, variant=role
            )

    async def refuse_later(self, started: float) -> NoReturn:
        """503 for a request that arrives while the loop runs late (see :mod:`~distml.serve.overload`); nothing
        of it is read or parsed. The answer goes out ``refusal_delay_ms`` after the request came, give or take half
        of that at random: refused together, clients that retry at once would otherwise come back together."""
        lag_ms = self.lag.current_s * 1000
        delay = self.config.refusal_delay_ms / 1000 * (0.5 + random.random())  # noqa: S311 (not for security)
        await asyncio.sleep(max(0.0, started + delay - time.perf_counter()))
        raise OverloadedError(f"the server is overloaded (its event loop ran {lag_ms:.0f} ms late); retry shortly")

    def not_served(self, name: str, version: str | None) -> str:
        what = f"model {clip(name, quote=False)!r}" + (
            f" version {clip(version, quote=False)!r}" if version is not None else ""
        )
        served = " and ".join(f"version {v.version}" for v in self.router.variants())
        return f"{what} is not served here; this server serves {self.name!r} {served}"

    # -- ASGI ----------------------------------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self.rest(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self.startup()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return


class _Admission(AbstractAsyncContextManager[Variant]):
    """:meth:`ServeApp.admit` as a plain class: no generator per request on the hot path."""

    __slots__ = ("app", "call", "place")

    def __init__(self, app: ServeApp, call: Call) -> None:
        self.app, self.call = app, call
        self.place: AbstractAsyncContextManager[None] | None = None

    async def __aenter__(self) -> Variant:
        app, call = self.app, self.call
        if not call.counted:  # the transport may have counted it (and checked the loop) before reading its body
            app.count(call)
            if app.active > app.config.max_queue and app.lag.late:
                await app.refuse_later(call.started)  # a crowd and a late loop: overloaded, not just slow
        variant = app.fleet.router.pick(call.route_key) if call.version is None else app.pick_version(call)
        place = variant.batcher.place()
        await place.__aenter__()
        self.place = place
        return variant

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        assert self.place is not None
        return await self.place.__aexit__(kind, exc, tb)
