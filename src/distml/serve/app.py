"""The model server as one ASGI application: routing, body limits, the error handler, lifecycle.

Layers, from the wire inwards (as in KServe's Python server): this module is the transport (HTTP routes for
V1, V2, health and metrics); :mod:`~distml.serve.v1` and :mod:`~distml.serve.v2` are the protocols (parse a
body, encode a result, no HTTP); :mod:`~distml.serve.batcher` is the data plane shared by both; and
:mod:`~distml.serve.model` is the model. It is a plain ASGI callable rather than a web framework app because
every request goes through a dozen lines here and nothing else: that is where the req/s come from.

Errors: anything the client caused is a :class:`~distml.errors.RequestError`, answered in one place with its
status and ``{"error": message}``; anything else is logged with the request id and answered with a generic 500
that carries the id, never the exception text.

An inference request, in order (each step bounded, the cheap refusals first):

1. its declared size against ``max_body_bytes`` (413) and the in-flight byte budget (503): bodies being read or
   waiting, all requests together, never exceed ``max_inflight_bytes``;
2. the body, within ``body_timeout_s`` of the headers (408), holding no queue place while it trickles in;
3. a place in the batch queue (waiting up to ``max_queue_wait_ms`` when all are held, then 503; see
   :mod:`~distml.serve.batcher`), so an overloaded server refuses before it parses anything;
4. parse (in a worker thread when the body is large), decode, batch, encode.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NoReturn

import orjson

from distml import __version__
from distml.config import ServeConfig
from distml.errors import OverloadedError, PayloadTooLargeError, RequestError
from distml.serve import v1, v2
from distml.serve.batcher import Batcher
from distml.serve.http import REFUSED_KEY
from distml.serve.inputs import Inputs
from distml.serve.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from distml.serve.metrics import Metrics
from distml.serve.model import ServedModel
from distml.serve.overload import LoopLag
from distml.serve.reqlog import RequestLogger
from distml.serve.source import ModelSource
from distml.text import clip

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

log = logging.getLogger("distml.serve")
JSON = b"application/json"


# Bodies this large or larger are parsed in a worker thread, so health checks and small requests keep flowing.
PARSE_OFFLOAD_BYTES = 256 << 10
# A request refused before its body was read keeps its connection only when the unread rest is this small.
KEEP_ALIVE_UNREAD_BYTES = 64 << 10
V1_MODELS, V2_MODELS = "/v1/models/", "/v2/models/"  # the two protocols' model routes


class _ClientGoneError(Exception):
    """The client went away before its body arrived; there is no one to answer."""


class ByteBudget:
    """Bytes of request bodies being read or waiting, across all requests; 503 past ``limit``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, n: int) -> None:
        if self.used + n > self.limit:
            raise OverloadedError(
                f"the server holds {self.used:,} bytes of request bodies and this one needs {n:,} more; "
                f"the limit is {self.limit:,}; retry shortly"
            )
        self.used += n

    def give(self, n: int) -> None:
        self.used -= n


class ServeApp:
    """ASGI app serving one model over KServe V1 and V2 with one dynamic batcher (see the package docstring)."""

    def __init__(self, model: ServedModel, config: ServeConfig, source: ModelSource | None = None) -> None:
        self.model = model
        self.config = config
        self.source = source or ModelSource(model.path)  # where the model came from: a hot swap re-resolves it
        self.metrics = Metrics(model.name, model.version)
        self.ready = False  # after startup; false again while draining
        self.draining = False
        self.batcher: Batcher | None = None
        self.reqlog: RequestLogger | None = None
        self._decode_pool: ThreadPoolExecutor | None = None
        self.bodies = ByteBudget(config.max_inflight_bytes)
        self.lag = LoopLag(config.max_loop_lag_ms / 1000, busy=lambda: self.active > 0)
        self.active = 0  # inference requests inside the app (reading, waiting, parsing, queued, answering)
        self._static = {
            "/v2": orjson.dumps({"name": "distml", "version": __version__, "extensions": ["binary_tensor_data"]}),
            "/v1/models": orjson.dumps({"models": [model.name]}),
        }
        self._v1_model = orjson.dumps({"name": model.name, "ready": True})
        self._v2_model = orjson.dumps(model.metadata_v2())

    # -- lifecycle -----------------------------------------------------------------------------------------
    async def startup(self) -> None:
        self.batcher = Batcher(
            self.model.predict,
            max_batch_size=self.config.max_batch_size,
            max_batch_delay_s=self.config.max_batch_delay_ms / 1000,
            max_queue=self.config.max_queue,
            max_queue_wait_s=self.config.max_queue_wait_ms / 1000,
            refusal_delay_s=self.config.refusal_delay_ms / 1000,
            on_batch=self.metrics.batch,
        )
        self.batcher.start()
        self.lag.start()
        self._decode_pool = ThreadPoolExecutor(2, thread_name_prefix="distml-decode")
        if self.config.log_url or self.config.log_file:
            self.reqlog = RequestLogger(
                url=self.config.log_url,
                file=self.config.log_file,
                mode=self.config.log_mode,
                model=self.model.name,
                version=self.model.version,
                buffer=self.config.log_buffer,
                max_buffer_bytes=self.config.log_buffer_bytes,
                on_outcome=lambda outcome, n: self.metrics.log_events.labels(outcome).inc(n),
                on_drop=lambda reason, n: self.metrics.log_dropped.labels(reason).inc(n),
            )
        self.ready = True

    async def shutdown(self) -> None:
        """Stop taking requests, finish the queued ones, flush the request log."""
        self.ready = False
        self.lag.stop()
        if self.batcher is not None:
            await self.batcher.close()
        if self._decode_pool is not None:
            self._decode_pool.shutdown(wait=True)
        if self.reqlog is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.reqlog.close)

    def refused(self, status: int) -> None:
        """A connection the HTTP layer refused before any route saw it (header deadline or size): counted."""
        self.metrics.request("http", "unknown", status)

    def drain(self) -> None:
        """Readiness goes false (load balancers stop sending), requests in flight still complete."""
        self.draining = True
        self.ready = False

    # -- ASGI ----------------------------------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
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

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        method: str = scope["method"]
        if path.startswith(V2_MODELS):
            await self._v2_route(path.removeprefix(V2_MODELS), method, scope, receive, send)
        elif path.startswith(V1_MODELS):
            await self._v1_route(path.removeprefix(V1_MODELS), method, scope, receive, send)
        elif path in ("/v2/health/live", "/v2/health/ready"):
            if await self._allowed(method, "GET", send):
                if path.endswith("live"):
                    await _respond(send, 200, b'{"live":true}')
                else:
                    await _respond(
                        send, 200 if self.ready else 503, b'{"ready":%s}' % (b"true" if self.ready else b"false")
                    )
        elif path in self._static:
            if await self._allowed(method, "GET", send):
                await _respond(send, 200, self._static[path])
        elif path == "/metrics":
            if await self._allowed(method, "GET", send):
                await _respond(send, 200, self.metrics.render(), METRICS_CONTENT_TYPE.encode())
        else:
            route = f"{clip(method, quote=False)} {clip(path, quote=False)}"
            await _respond(send, 404, _error(f"no route {route}; the APIs are under /v1/models and /v2"))

    # -- routes --------------------------------------------------------------------------------------------
    async def _v1_route(self, rest: str, method: str, scope: Scope, receive: Receive, send: Send) -> None:
        name = rest.removesuffix(":predict")
        predict = name != rest
        if name != self.model.name:
            await self._not_found(name, None, "v1", send)
        elif predict:
            if await self._allowed(method, "POST", send):
                await self._infer("v1", scope, receive, send)
        elif await self._allowed(method, "GET", send):
            await _respond(send, 200, self._v1_model)

    async def _v2_route(self, rest: str, method: str, scope: Scope, receive: Receive, send: Send) -> None:
        parts = rest.split("/")
        name, version, tail = parts[0], None, parts[1:]
        if len(tail) >= 2 and tail[0] == "versions":
            version, tail = tail[1], tail[2:]
        if name != self.model.name or (version is not None and version != self.model.version):
            await self._not_found(name, version, "v2", send)
        elif not tail:
            if await self._allowed(method, "GET", send):
                await _respond(send, 200, self._v2_model)
        elif tail == ["ready"]:
            if await self._allowed(method, "GET", send):
                body = orjson.dumps({"name": self.model.name, "ready": self.ready})
                await _respond(send, 200 if self.ready else 503, body)
        elif tail == ["infer"]:
            if await self._allowed(method, "POST", send):
                await self._infer("v2", scope, receive, send)
        else:
            await _respond(
                send, 404, _error(f"no route {clip(method, quote=False)} /v2/models/{clip(rest, quote=False)}")
            )

    async def _not_found(self, name: str, version: str | None, protocol: str, send: Send) -> None:
        what = f"model {clip(name, quote=False)!r}" + (
            f" version {clip(version, quote=False)!r}" if version is not None else ""
        )
        served = f"{self.model.name!r} version {self.model.version}"
        await _respond(send, 404, _error(f"{what} is not served here; this server serves {served}"))
        self.metrics.request(protocol, "unknown", 404)

    async def _allowed(self, method: str, allowed: str, send: Send) -> bool:
        if method == allowed:
            return True
        await _respond(
            send,
            405,
            _error(f"{clip(method, quote=False)} is not allowed here; use {allowed}"),
            extra=[(b"allow", allowed.encode())],
        )
        return False

    # -- inference -----------------------------------------------------------------------------------------
    async def _infer(self, protocol: str, scope: Scope, receive: Receive, send: Send) -> None:
        started, arrived = time.perf_counter(), time.time()
        headers = _headers(scope)
        request_id = _request_id(headers.get(b"x-request-id"))
        extra = [(b"x-request-id", request_id.encode())]
        body = b""
        content_type = headers.get(b"content-type", b"application/json").decode("latin-1")
        assert self.batcher is not None, "requests arrive only after startup"
        budget, declared = _Held(self.bodies), None
        self.active += 1
        self.lag.wake()
        try:
            try:
                declared = _declared_length(headers, self.config.max_body_bytes)
                if self.active > self.config.max_queue and self.lag.late:
                    await self._refuse_later(started)  # a crowd and a late loop: overloaded, not just slow
                budget.take(declared or 0)
                body = await _read_body(receive, self.config.max_body_bytes, budget, self.config.body_timeout_s)
                async with self.batcher.place():
                    inputs, v2_request = await self._parse(protocol, headers, body)
                    images = await self._decode(inputs, protocol)
                decoded = time.perf_counter()
                result = await self.batcher.submit(images, self.config.request_timeout_s)
                encode_started = time.perf_counter()
                header_length, max_out = None, self.config.max_response_bytes
                if v2_request is None:
                    out = v1.encode_predictions(result.probabilities, self.model.labels, max_bytes=max_out)
                else:
                    out, header_length = v2.encode_infer(
                        v2_request,
                        result.probabilities,
                        self.model.labels,
                        self.model.name,
                        self.model.version,
                        max_bytes=max_out,
                    )
                out_type = JSON
                if header_length is not None:
                    extra.append((b"inference-header-content-length", str(header_length).encode()))
                    out_type = b"application/octet-stream"
                status = 200
                done = time.perf_counter()
                m = self.metrics
                m.stage(protocol, "decode", decoded - started)
                m.stage(protocol, "queue", result.queue_s)
                m.stage(protocol, "infer", result.infer_s)
                m.stage(protocol, "encode", done - encode_started)
                m.stage(protocol, "total", done - started)
            except RequestError as exc:
                status, out, out_type = exc.status, _error(exc.message), JSON
                extra.extend((k.encode(), v.encode()) for k, v in exc.headers.items())
                if status == 408 or (not body and (declared or 0) > KEEP_ALIVE_UNREAD_BYTES):
                    extra.append((b"connection", b"close"))  # the rest of the body is not worth reading
        except _ClientGoneError:
            # nginx's "client closed request": counted, not answered; or the connection's body deadline passed
            # before any of the body came, and the HTTP layer has answered 408 itself
            status, out, out_type = scope.get(REFUSED_KEY, 499), b"", JSON
        except Exception:
            log.exception("internal error in request %s", request_id)
            status, out, out_type = 500, _error(f"internal error (request id {request_id})"), JSON
        finally:
            budget.release()
            self.active -= 1
        if out or status not in (499, 408):
            await _respond(send, status, out, out_type, extra)
        self.metrics.request(protocol, self.model.name, status)
        if self.reqlog is not None:
            endpoint = scope["path"]
            self.reqlog.log("request", request_id, endpoint, protocol, body, content_type, at=arrived)
            self.reqlog.log("response", request_id, endpoint, protocol, out, out_type.decode(), status)

    async def _refuse_later(self, started: float) -> NoReturn:
        """503 for a request that arrives while the loop runs late (see :mod:`~distml.serve.overload`); nothing
        of it is read or parsed. The answer goes out ``refusal_delay_ms`` after the request came, give or take half
        of that at random: refused together, clients that retry at once would otherwise come back together."""
        lag_ms = self.lag.current_s * 1000
        delay = self.config.refusal_delay_ms / 1000 * (0.5 + random.random())  # noqa: S311 (not for security)
        await asyncio.sleep(max(0.0, started + delay - time.perf_counter()))
        raise OverloadedError(f"the server is overloaded (its event loop ran {lag_ms:.0f} ms late); retry shortly")

    async def _parse(
        self, protocol: str, headers: dict[bytes, bytes], body: bytes
    ) -> tuple[Inputs, v2.InferRequest | None]:
        if len(body) >= PARSE_OFFLOAD_BYTES and self._decode_pool is not None:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._decode_pool, self._parse_now, protocol, headers, body)
        return self._parse_now(protocol, headers, body)

    def _parse_now(
        self, protocol: str, headers: dict[bytes, bytes], body: bytes
    ) -> tuple[Inputs, v2.InferRequest | None]:
        if headers.get(b"content-encoding", b"identity") != b"identity":
            raise RequestError(f"Content-Encoding {headers[b'content-encoding'].decode('latin-1')!r} is not supported; "
                               "send the body uncompressed", status=415)  # fmt: skip
        binary = headers.get(v2.HEADER_LENGTH.encode())
        kind = headers.get(b"content-type", b"application/json").split(b";")[0].strip().lower()
        if kind != JSON and not (binary is not None and kind == b"application/octet-stream"):
            raise RequestError(
                f"Content-Type {kind.decode('latin-1')!r} is not accepted; send application/json "
                "(curl: -H 'Content-Type: application/json')"
                + (" (or application/octet-stream with Inference-Header-Content-Length)" if protocol == "v2" else ""),
                status=415,
            )
        spec, limit = self.model.spec, self.config.max_instances
        if protocol == "v1":
            if binary is not None:
                raise RequestError("Inference-Header-Content-Length is a V2 extension; V1 takes JSON only")
            return v1.parse_predict(body, spec, limit), None
        request = v2.parse_infer(body, None if binary is None else binary.decode("latin-1"), spec, limit)
        return request.inputs, request

    async def _decode(self, inputs: Inputs, protocol: str) -> Any:
        where = "instances" if protocol == "v1" else "inputs[0].data"
        if inputs.worth_offloading and self._decode_pool is not None:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._decode_pool, inputs.decode, self.model.spec, where)
        return inputs.decode(self.model.spec, where)


# -- HTTP helpers ------------------------------------------------------------------------------------------
def _headers(scope: Scope) -> dict[bytes, bytes]:
    return dict(scope["headers"])


_ID_PREFIX = uuid.uuid4().hex[:16]  # per process: ids stay unique across workers and restarts
_ids = itertools.count(1)


def _request_id(given: bytes | None) -> str:
    """The client's ``X-Request-Id`` when it is a sane token, else a fresh one (a process prefix and a counter:
    a uuid4 per request cost ~3% of a core at capacity)."""
    if given and len(given) <= 128 and given.isascii() and all(33 <= c < 127 for c in given):
        return given.decode()
    return f"{_ID_PREFIX}{next(_ids):016x}"


def _declared_length(headers: dict[bytes, bytes], limit: int) -> int | None:
    """The body's Content-Length, or None when it is not given (chunked); 413 past ``limit``."""
    declared = headers.get(b"content-length")
    if declared is None or not declared.isdigit():
        return None  # httptools has already refused a malformed Content-Length
    if int(declared) > limit:
        raise PayloadTooLargeError(f"the body is {int(declared):,} bytes; the limit is {limit:,}")
    return int(declared)


class _Held:
    """One request's share of the byte budget: what it declared, topped up as undeclared bytes arrive."""

    def __init__(self, budget: ByteBudget) -> None:
        self.budget = budget
        self.held = 0

    def take(self, n: int) -> None:
        self.budget.take(n)
        self.held += n

    def release(self) -> None:
        self.budget.give(self.held)
        self.held = 0


async def _read_body(receive: Receive, limit: int, held: _Held, timeout_s: float) -> bytes:
    """The whole body, within ``limit`` bytes (413) and ``timeout_s`` seconds (408).

    The first read has no timer of its own: nearly every body arrives with its headers, and an asyncio timeout per
    request costs ~4% of a core at capacity. A body that has not started by the deadline is the HTTP layer's to
    answer (:mod:`distml.serve.http`); one that has started and stalls is answered here.
    """
    deadline = time.perf_counter() + timeout_s
    message = await receive()
    chunks, size = [], 0
    while True:
        if message["type"] == "http.disconnect":
            raise _ClientGoneError
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError(f"the body is more than {limit:,} bytes; the limit is {limit:,}")
        if size > held.held:
            held.take(size - held.held)  # more than declared (or nothing declared): count it as it arrives
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)
        try:
            async with asyncio.timeout(deadline - time.perf_counter()):
                message = await receive()
        except TimeoutError:
            raise RequestError(f"the body did not arrive within {timeout_s:g} s", status=408) from None


def _error(message: str) -> bytes:
    return orjson.dumps({"error": message})


async def _respond(
    send: Send, status: int, body: bytes, content_type: bytes = JSON, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    if extra:
        headers.extend(extra)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
