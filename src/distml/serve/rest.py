"""The REST transport: KServe V1 and V2 over HTTP as one plain ASGI handler, routes to encoded answer.

It is a plain ASGI callable rather than a web framework app because every request goes through a dozen lines here
and nothing else: that is where the req/s come from. An inference request's steps after its body are the app's,
shared with gRPC (:class:`~distml.serve.app.ServeApp`: admit, decode, predict, finish); what is REST's own:

1. its declared size against ``max_body_bytes`` (413) and the in-flight byte budget (503): bodies being read or
   waiting, all requests together, never exceed ``max_inflight_bytes``;
2. the body, within ``body_timeout_s`` of the headers (408), holding no queue place while it trickles in;
3. the body parsed (in a worker thread when it is large) as V1 or V2, and the answer encoded, with the
   ``x-request-id`` and ``x-model-version`` headers (the version that answered).

Errors: anything the client caused is a :class:`~distml.errors.RequestError`, answered in one place with its
status and ``{"error": message}``; anything else is logged with the request id and answered with a generic 500
that carries the id, never the exception text.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

import orjson

from distml import __version__
from distml.errors import OverloadedError, PayloadTooLargeError, RequestError
from distml.serve import v1, v2
from distml.serve.call import Call
from distml.serve.http import REFUSED_KEY
from distml.serve.inputs import Inputs
from distml.serve.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from distml.serve.model import ServedModel
from distml.serve.variants import Variant
from distml.text import clip

if TYPE_CHECKING:
    from distml.config import ServeConfig
    from distml.serve.app import ServeApp

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


class Rest:
    """The HTTP routes of ``app``: V1, V2, health, metadata and metrics."""

    def __init__(self, app: ServeApp) -> None:
        self.app = app
        self.route_header = app.config.route_header.lower().encode("latin-1")
        self.refresh()

    def refresh(self) -> None:
        """Build the metadata answers (sent as they are) for the current champion; again after a hot swap."""
        app = self.app
        model = app.router.champion.model
        versions = list(dict.fromkeys(v.version for v in app.router.variants()))
        self._static = {
            "/v2": orjson.dumps({"name": "distml", "version": __version__, "extensions": ["binary_tensor_data"]}),
            "/v1/models": orjson.dumps({"models": [model.name]}),
        }
        self._v1_model = orjson.dumps({"name": model.name, "ready": True})
        self._v2_model = orjson.dumps({**model.metadata_v2(), "versions": versions})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """One HTTP request (``scope["type"]`` is ``http``)."""
        app = self.app
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
                        send, 200 if app.ready else 503, b'{"ready":%s}' % (b"true" if app.ready else b"false")
                    )
        elif path in self._static:
            if await self._allowed(method, "GET", send):
                await _respond(send, 200, self._static[path])
        elif path == "/metrics":
            if await self._allowed(method, "GET", send):
                await _respond(send, 200, app.metrics.render(), METRICS_CONTENT_TYPE.encode())
        else:
            route = f"{clip(method, quote=False)} {clip(path, quote=False)}"
            await _respond(send, 404, _error(f"no route {route}; the APIs are under /v1/models and /v2"))

    # -- routes --------------------------------------------------------------------------------------------
    async def _v1_route(self, rest: str, method: str, scope: Scope, receive: Receive, send: Send) -> None:
        name = rest.removesuffix(":predict")
        predict = name != rest
        if name != self.app.name:
            await self._not_found(name, None, "v1", send)
        elif predict:
            if await self._allowed(method, "POST", send):
                await self._infer("v1", None, scope, receive, send)
        elif await self._allowed(method, "GET", send):
            await _respond(send, 200, self._v1_model)

    async def _v2_route(self, rest: str, method: str, scope: Scope, receive: Receive, send: Send) -> None:
        parts = rest.split("/")
        name, version, tail = parts[0], None, parts[1:]
        if len(tail) >= 2 and tail[0] == "versions":
            version, tail = tail[1], tail[2:]
        if name != self.app.name or (version is not None and self.app.variant_for(version) is None):
            await self._not_found(name, version, "v2", send)
        elif not tail:
            if await self._allowed(method, "GET", send):
                await _respond(send, 200, self._v2_model)
        elif tail == ["ready"]:
            if await self._allowed(method, "GET", send):
                body = orjson.dumps({"name": self.app.name, "ready": self.app.ready})
                await _respond(send, 200 if self.app.ready else 503, body)
        elif tail == ["infer"]:
            if await self._allowed(method, "POST", send):
                await self._infer("v2", version, scope, receive, send)
        else:
            await _respond(
                send, 404, _error(f"no route {clip(method, quote=False)} /v2/models/{clip(rest, quote=False)}")
            )

    async def _not_found(self, name: str, version: str | None, protocol: str, send: Send) -> None:
        await _respond(send, 404, _error(self.app.not_served(name, version)))
        self.app.metrics.request(protocol, "unknown", 404)

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

    # -- REST inference ------------------------------------------------------------------------------------
    async def _infer(self, protocol: str, version: str | None, scope: Scope, receive: Receive, send: Send) -> None:
        started, arrived = time.perf_counter(), time.time()
        headers = dict(scope["headers"])
        rid = request_id(headers.get(b"x-request-id"))
        key = headers.get(self.route_header)
        call = Call(protocol, rid, rid if key is None else key.decode("latin-1"), started, arrived, version)
        extra = [(b"x-request-id", rid.encode())]
        body = b""
        content_type = headers.get(b"content-type", b"application/json").decode("latin-1")
        app, config = self.app, self.app.config
        budget, declared, variant = Held(app.bodies), None, None
        call.counted = True  # app.count, inline: active from here, so a body that trickles in counts too
        app.active += 1
        app.lag.wake()
        try:
            try:
                declared = declared_length(headers, config.max_body_bytes)
                if app.active > config.max_queue and app.lag.late:
                    await app.refuse_later(started)  # a crowd and a late loop: overloaded, not just slow
                budget.take(declared or 0)
                body = await read_body(receive, config.max_body_bytes, budget, config.body_timeout_s)
                async with app.admit(call) as variant:
                    inputs, v2_request = await self._parse(protocol, headers, body, variant)
                    images = await app.decode(inputs, variant, "instances" if protocol == "v1" else "inputs[0].data")
                result = await app.predict(call, variant, images)
                model, max_out = variant.model, config.max_response_bytes
                if v2_request is None:
                    out = v1.encode_predictions(result.probabilities, model.labels, max_bytes=max_out)
                    header_length = None
                else:
                    out, header_length = v2.encode_infer(
                        v2_request, result.probabilities, model.labels, model.name, model.version, max_bytes=max_out
                    )
                out_type = JSON
                if header_length is not None:
                    extra.append((b"inference-header-content-length", str(header_length).encode()))
                    out_type = b"application/octet-stream"
                status = 200
            except RequestError as exc:
                status, out, out_type = exc.status, _error(exc.message), JSON
                extra.extend((k.encode(), v.encode()) for k, v in exc.headers.items())
                if status == 408 or (not body and (declared or 0) > KEEP_ALIVE_UNREAD_BYTES):
                    extra.append((b"connection", b"close"))  # the rest of the body is not worth reading
        except ClientGoneError:
            # nginx's "client closed request": counted, not answered; or the connection's body deadline passed
            # before any of the body came, and the HTTP layer has answered 408 itself
            status, out, out_type = scope.get(REFUSED_KEY, 499), b"", JSON
        except Exception:
            log.exception("internal error in request %s", rid)
            status, out, out_type = 500, _error(f"internal error (request id {rid})"), JSON
        finally:
            budget.release()
        if variant is not None:
            extra.append((b"x-model-version", variant.version.encode()))
        app.finish(call, variant, status, scope["path"], body, content_type, out, out_type.decode())
        if out or status not in (499, 408):
            await _respond(send, status, out, out_type, extra)

    async def _parse(
        self, protocol: str, headers: dict[bytes, bytes], body: bytes, variant: Variant
    ) -> tuple[Inputs, v2.InferRequest | None]:
        pool, config = self.app.decode_pool, self.app.config
        if len(body) >= PARSE_OFFLOAD_BYTES and pool is not None:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(pool, _parse_now, config, protocol, headers, body, variant.model)
        return _parse_now(config, protocol, headers, body, variant.model)


def _parse_now(
    config: ServeConfig, protocol: str, headers: dict[bytes, bytes], body: bytes, model: ServedModel
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
    spec, limit = model.spec, config.max_instances
    if protocol == "v1":
        if binary is not None:
            raise RequestError("Inference-Header-Content-Length is a V2 extension; V1 takes JSON only")
        return v1.parse_predict(body, spec, limit), None
    request = v2.parse_infer(body, None if binary is None else binary.decode("latin-1"), spec, limit)
    return request.inputs, request


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


class ClientGoneError(Exception):
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


class Held:
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


_ID_PREFIX = uuid.uuid4().hex[:16]  # per process: ids stay unique across workers and restarts
_ids = itertools.count(1)


def request_id(given: bytes | None) -> str:
    """The client's ``X-Request-Id`` when it is a sane token, else a fresh one (a process prefix and a counter:
    a uuid4 per request cost ~3% of a core at capacity)."""
    if given and len(given) <= 128 and given.isascii() and all(33 <= c < 127 for c in given):
        return given.decode()
    return f"{_ID_PREFIX}{next(_ids):016x}"


def declared_length(headers: dict[bytes, bytes], limit: int) -> int | None:
    """The body's Content-Length, or None when it is not given (chunked); 413 past ``limit``."""
    declared = headers.get(b"content-length")
    if declared is None or not declared.isdigit():
        return None  # httptools has already refused a malformed Content-Length
    if int(declared) > limit:
        raise PayloadTooLargeError(f"the body is {int(declared):,} bytes; the limit is {limit:,}")
    return int(declared)


async def read_body(receive: Receive, limit: int, held: Held, timeout_s: float) -> bytes:
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
            raise ClientGoneError
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
