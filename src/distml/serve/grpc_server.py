"""The gRPC endpoint: KServe V2 / Open Inference Protocol (``inference.GRPCInferenceService``) and ``grpc.health.v1``.

It runs on grpc.aio in the same process and on the same event loop as the REST server (each worker has its own),
and an inference goes through the same :class:`~distml.serve.app.ServeApp` steps as REST's: ``admit`` (overload
refusals, the variant, a place in its batch queue), parse and ``decode`` inside that, ``predict`` (the shared
batcher), ``finish`` (the ``protocol="grpc"`` request counter and the request log). The messages are the
generated classes of Triton's client package; the codec is :mod:`~distml.serve.grpc_codec`.

``ModelInfer`` is registered without a deserializer: the handler gets the request's bytes, so a malformed
protobuf is an INVALID_ARGUMENT that names the problem (not gRPC's generic INTERNAL) and the request log gets the
bytes as sent. Errors are the project's :class:`~distml.errors.RequestError` tree, mapped from their HTTP-like
status to a gRPC code (:data:`CODES`); the same status goes to the metrics and the request log. A full queue is
RESOURCE_EXHAUSTED (not UNAVAILABLE, which clients such as KServe's retry at once) with "retry" in the message and
``retry-after`` in the trailing metadata. The client's deadline bounds the request: when it passes, gRPC cancels
the handler, the batcher skips the request, and it counts as 504 (a client's cancel as 499). Every answer carries
``x-model-version`` and ``x-request-id`` in its trailing metadata.

Messages are limited to ``max_body_bytes`` in and ``max_response_bytes`` out; gRPC refuses a larger request
itself (RESOURCE_EXHAUSTED) before the handler sees it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
import orjson
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from distml import __version__
from distml.errors import RequestError, UsageError
from distml.serve import grpc_codec
from distml.serve.app import ServeApp
from distml.serve.call import Call
from distml.serve.rest import request_id
from distml.serve.variants import Variant

log = logging.getLogger("distml.serve")

SERVICE = "inference.GRPCInferenceService"
CONTENT_TYPE = "application/grpc+proto"  # the request log's content type for both directions
# HTTP-like status (what the metrics and the request log record, for every protocol) -> gRPC status code.
CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    499: grpc.StatusCode.CANCELLED,
    500: grpc.StatusCode.INTERNAL,
    503: grpc.StatusCode.RESOURCE_EXHAUSTED,  # the queue is full or the server overloaded: retry after a while
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def code_for(status: int) -> grpc.StatusCode:
    """The gRPC status code for an HTTP-like ``status`` (other 4xx: INVALID_ARGUMENT, other 5xx: INTERNAL)."""
    return CODES.get(status, grpc.StatusCode.INVALID_ARGUMENT if status < 500 else grpc.StatusCode.INTERNAL)


class InferenceServicer(service_pb2_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    """The V2 calls this server implements; the protocol's other calls answer UNIMPLEMENTED."""

    def __init__(self, app: ServeApp) -> None:
        self.app = app

    # -- health and metadata -----------------------------------------------------------------------------
    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        return pb.ServerReadyResponse(ready=self.app.ready)

    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        await self._served(request.name, request.version, context)
        return pb.ModelReadyResponse(ready=self.app.ready)

    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        return pb.ServerMetadataResponse(name="distml", version=__version__)

    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        variant = await self._served(request.name, request.version, context)
        doc = variant.model.metadata_v2()
        response = pb.ModelMetadataResponse(name=doc["name"], versions=doc["versions"], platform=doc["platform"])
        for kind in ("inputs", "outputs"):
            for tensor in doc[kind]:  # type: ignore[attr-defined]
                getattr(response, kind).add(name=tensor["name"], datatype=tensor["datatype"], shape=tensor["shape"])
        return response

    async def ModelConfig(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        """Triton's model configuration (its extension of the protocol), which Triton's tools such as
        ``perf_analyzer`` read before they send anything."""
        variant = await self._served(request.name, request.version, context)
        c = self.app.config
        return grpc_codec.model_config(variant.model.metadata_v2(), c.max_batch_size, c.max_batch_delay_ms)

    async def _served(self, name: str, version: str, context: grpc.aio.ServicerContext) -> Variant:
        """The variant serving model ``name`` (at ``version``, when given); NOT_FOUND otherwise."""
        try:
            return self._variant(name, version)
        except RequestError as exc:
            await _abort(context, exc.status, exc.message)

    def _variant(self, name: str, version: str) -> Variant:
        """The variant serving ``name`` at ``version`` ("": the champion); a 404 naming what is served otherwise."""
        variant = self.app.variant_for(version or None) if name == self.app.name else None
        if variant is None:
            raise RequestError(self.app.not_served(name, version or None), status=404)
        return variant

    # -- inference -------------------------------------------------------------------------------------------
    async def ModelInfer(self, data: bytes, context: grpc.aio.ServicerContext) -> bytes:  # noqa: N802
        """One inference: ``data`` is the serialized ``ModelInferRequest``; the answer, serialized."""
        metadata = _metadata(context)
        call = self._call(metadata, request_id(metadata.get("x-request-id")))
        outcome = await self._infer(call, data, context, "ModelInfer")
        rid, variant = call.request_id, outcome.variant
        if outcome.status != 200:
            await _abort(context, outcome.status, outcome.failure, _trailer(rid, variant, *outcome.extra))
        context.set_trailing_metadata(_trailer(rid, variant))
        return outcome.out

    async def ModelStreamInfer(  # noqa: N802
        self, messages: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        """Triton's bidirectional stream: each ``ModelInferRequest`` in, one ``ModelStreamInferResponse`` out.

        Each message is one inference through the same steps as ``ModelInfer`` (its own request id, admission,
        metrics with endpoint ``ModelStreamInfer``, request-log line). Up to :data:`STREAM_WINDOW` messages of a
        stream are in the app at once (they batch together); past that the server stops reading the stream, so
        HTTP/2 flow control holds the client back rather than the server queueing its messages. Answers come in
        the order the messages came, each with the message's ``id``; a message that fails is answered with
        ``error_message`` (Triton's streaming convention) and the stream goes on.
        """
        metadata = _metadata(context)
        slots = asyncio.Semaphore(STREAM_WINDOW)
        pending: asyncio.Queue[asyncio.Future[bytes] | None] = asyncio.Queue()  # answers, in message order

        async def read() -> None:
            try:
                async for data in messages:
                    call = self._call(metadata, request_id(None))
                    pending.put_nowait(asyncio.ensure_future(self._stream_one(call, data, context)))
                    await slots.acquire()  # the window is full: read no more until an answer has gone out
            finally:
                pending.put_nowait(None)

        reader = asyncio.ensure_future(read())
        try:
            while (answer := await pending.get()) is not None:
                yield await answer
                slots.release()
            await reader  # the stream's end, or the error that ended reading
        finally:  # the client went away (or the stream failed): stop reading, cancel what is in the app
            reader.cancel()
            while not pending.empty():
                if (left := pending.get_nowait()) is not None:
                    left.cancel()

    async def _stream_one(self, call: Call, data: bytes, context: grpc.aio.ServicerContext) -> bytes:
        """One stream message's serialized ``ModelStreamInferResponse``: the answer, or ``error_message``."""
        outcome = await self._infer(call, data, context, "ModelStreamInfer")
        if outcome.status == 200:
            return grpc_codec.stream_answer(outcome.out)
        answer = pb.ModelStreamInferResponse(error_message=outcome.failure)
        answer.infer_response.id = outcome.message_id  # Triton's clients match answers to requests by id
        answer.infer_response.model_name = self.app.name
        data_out: bytes = answer.SerializeToString()
        return data_out

    def _call(self, metadata: dict[str, bytes], rid: str) -> Call:
        route = metadata.get(self.app.config.route_header.lower())
        return Call("grpc", rid, route.decode("latin-1") if route else rid, time.perf_counter(), time.time())

    async def _infer(self, call: Call, data: bytes, context: grpc.aio.ServicerContext, endpoint: str) -> Outcome:
        """One inference through the app's steps; every outcome counted and logged once (``finish``)."""
        outcome = Outcome()
        try:
            try:
                request = grpc_codec.read_request(data)
                outcome.message_id = request.id
                self._variant(request.model_name, request.model_version)  # unknown model: refused before admission
                call.version = request.model_version or None
                async with self.app.admit(call) as variant:
                    outcome.variant = variant
                    parsed = await self._parse(request, variant)
                    images = await self.app.decode(parsed.inputs, variant, "inputs[0]")
                result = await self.app.predict(call, variant, images)
                model = variant.model
                limit = self.app.config.max_response_bytes
                outcome.out = grpc_codec.encode_model_infer(
                    parsed, result.probabilities, model.labels, model.name, model.version, max_bytes=limit
                )
            except RequestError as exc:  # incl. a 404 when the version asked for went away (a hot swap) since
                outcome.fail(exc.status, exc.message, tuple(exc.headers.items()))  # retry-after
        except asyncio.CancelledError:
            # gRPC cancels the handler when the client's deadline passes or the client cancels: no one to answer
            remaining = context.time_remaining()
            outcome.status = 504 if remaining is not None and remaining <= 0 else 499
            raise
        except Exception:
            log.exception("internal error in gRPC request %s", call.request_id)
            outcome.fail(500, f"internal error (request id {call.request_id})")
        finally:
            variant_ = outcome.variant
            if outcome.status == 200:
                self.app.finish(call, variant_, 200, endpoint, data, CONTENT_TYPE, outcome.out, CONTENT_TYPE)
            else:  # the request log records a failure as REST does: {"error": message}
                error = orjson.dumps({"error": outcome.failure}) if outcome.failure else b""
                self.app.finish(call, variant_, outcome.status, endpoint, data, CONTENT_TYPE, error, "application/json")
        return outcome

    async def _parse(self, request: Any, variant: Variant) -> Any:
        """The request's images and outputs; in a worker thread when the message is large (like REST's bodies)."""
        spec, limit = variant.model.spec, self.app.config.max_instances
        if request.ByteSize() >= PARSE_OFFLOAD_BYTES:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(None, grpc_codec.parse_model_infer, request, spec, limit)
        return grpc_codec.parse_model_infer(request, spec, limit)


# Messages this large or larger are parsed off the event loop, as REST bodies are.
PARSE_OFFLOAD_BYTES = 256 << 10
# A stream's messages in the app at once (admitted or waiting for admission): enough to fill a batch from one
# stream; past it the server reads no more of the stream until an answer has gone out.
STREAM_WINDOW = 64


@dataclass(slots=True)
class Outcome:
    """How one inference ended: its HTTP-like status, the serialized answer or the failure, the variant."""

    status: int = 200
    out: bytes = b""
    failure: str = ""
    extra: tuple[tuple[str, str], ...] = ()  # trailing metadata a failure adds (retry-after)
    variant: Variant | None = None
    message_id: str = ""  # the request message's id, when it parsed

    def fail(self, status: int, failure: str, extra: tuple[tuple[str, str], ...] = ()) -> None:
        self.status, self.failure, self.extra = status, failure, extra


def _metadata(context: grpc.aio.ServicerContext) -> dict[str, bytes]:
    """The call's metadata, keys lower-case (gRPC's already are), values as bytes."""
    return {k: v if isinstance(v, bytes) else str(v).encode() for k, v in context.invocation_metadata() or ()}


def _trailer(rid: str, variant: Variant | None, *extra: tuple[str, str]) -> tuple[tuple[str, str], ...]:
    version = (("x-model-version", variant.version),) if variant is not None else ()
    return (("x-request-id", rid), *version, *extra)


async def _abort(
    context: grpc.aio.ServicerContext, status: int, message: str, trailer: tuple[tuple[str, str], ...] = ()
) -> NoReturn:
    await context.abort(code_for(status), message, trailer)
    raise AssertionError("context.abort returns only by raising")  # for the type checker


class GrpcEndpoint:
    """The gRPC server of one worker process: started after the app's startup, stopped before its shutdown."""

    def __init__(self, server: grpc.aio.Server, health: HealthServicer, port: int) -> None:
        self.server, self.health, self.port = server, health, port

    @classmethod
    async def start(cls, app: ServeApp, host: str, port: int) -> GrpcEndpoint:
        """Listen on ``host:port`` (0: a free port) and serve ``app`` on the running event loop."""

        config = app.config
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", config.max_body_bytes),
                ("grpc.max_send_message_length", config.max_response_bytes),
                ("grpc.so_reuseport", 1),  # every worker listens on the same port; the kernel spreads connections
            ],
            maximum_concurrent_rpcs=None,  # admission is the app's: a full queue is RESOURCE_EXHAUSTED with a hint
        )
        servicer = InferenceServicer(app)
        server.add_registered_method_handlers(SERVICE, _handlers(servicer))
        health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            bound = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise UsageError(f"cannot listen for gRPC on {address}: {exc}", hint="pick another --grpc-port") from None
        await server.start()
        for service in ("", SERVICE):
            await health.set(service, health_pb2.HealthCheckResponse.SERVING)
        return cls(server, health, bound)

    async def drain(self) -> None:
        """Health turns NOT_SERVING (load balancers stop sending); calls keep being answered."""
        await self.health.enter_graceful_shutdown()

    async def stop(self, grace_s: float) -> None:
        """Refuse new calls, let those in flight finish (at most ``grace_s``), then close."""
        await self.drain()
        await self.server.stop(grace_s)


def _handlers(servicer: InferenceServicer) -> dict[str, grpc.RpcMethodHandler]:
    def unary(method: Callable[..., Any], request: Any, response: Any) -> grpc.RpcMethodHandler:
        return grpc.unary_unary_rpc_method_handler(
            method, request_deserializer=request.FromString, response_serializer=response.SerializeToString
        )

    handlers: dict[str, grpc.RpcMethodHandler] = {
        "ServerLive": unary(servicer.ServerLive, pb.ServerLiveRequest, pb.ServerLiveResponse),
        "ServerReady": unary(servicer.ServerReady, pb.ServerReadyRequest, pb.ServerReadyResponse),
        "ModelReady": unary(servicer.ModelReady, pb.ModelReadyRequest, pb.ModelReadyResponse),
        "ServerMetadata": unary(servicer.ServerMetadata, pb.ServerMetadataRequest, pb.ServerMetadataResponse),
        "ModelMetadata": unary(servicer.ModelMetadata, pb.ModelMetadataRequest, pb.ModelMetadataResponse),
        "ModelConfig": unary(servicer.ModelConfig, pb.ModelConfigRequest, pb.ModelConfigResponse),
        # bytes in, bytes out: the handler parses and serializes itself (see the module docstring)
        "ModelInfer": grpc.unary_unary_rpc_method_handler(servicer.ModelInfer),
        "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(servicer.ModelStreamInfer),
    }
    return handlers
