"""Running the app: uvicorn (uvloop + httptools), N worker processes on one port, and a graceful SIGTERM.

Shutdown, as Kubernetes expects it: on SIGTERM readiness turns 503 at once while the server keeps answering for
``drain_s`` (time for endpoints to stop routing here), then it stops accepting, lets requests in flight finish
(at most ``graceful_timeout_s``), drains the batch queue, flushes the request log and exits. Ctrl-C (SIGINT)
skips the drain period.

With ``workers`` > 1 the parent binds the socket and starts the workers (spawned processes sharing it, each
loading the model and running its own event loop); it passes SIGTERM/SIGINT on to them and replaces any worker
that dies. uvicorn's own supervisor is not used because its workers cannot have the drain period.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import uvicorn

from distml.config import ServeConfig
from distml.serve.accept import Acceptor
from distml.serve.app import ServeApp
from distml.serve.http import ConnectionLimits, protocol_class
from distml.serve.model import ServedModel, load_configured
from distml.serve.source import ModelSource

if TYPE_CHECKING:
    from distml.serve.grpc_server import GrpcEndpoint

log = logging.getLogger("distml.serve")


def build_app(config: ServeConfig, source: ModelSource | Path) -> ServeApp:
    """Load the model ``source`` names and build the ASGI app for it (startup runs in the app's lifespan)."""
    source = source if isinstance(source, ModelSource) else ModelSource(Path(source))
    return ServeApp(load_configured(source.path, config), config, source=source)


class _DrainingServer(uvicorn.Server):
    """uvicorn's server with a drain period after SIGTERM (readiness 503, still serving) before it stops."""

    def __init__(self, config: uvicorn.Config, serve_config: ServeConfig) -> None:
        super().__init__(config)
        self._settings = serve_config
        self._drain_s = serve_config.drain_s
        self._stop_at: float | None = None
        self._acceptors: list[Acceptor] = []
        self._grpc: GrpcEndpoint | None = None
        self._grpc_draining = False

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        # uvicorn's startup (the lifespan, its state) without its listening servers: an Acceptor takes each socket
        # instead, accepting every waiting connection per pass (see distml.serve.accept)
        await super().startup(sockets=[])
        if self.should_exit:  # the app's startup failed; uvicorn has said why
            return
        app, port = self._app(), self._settings.grpc_port
        if app is not None and port is not None:
            # gRPC on this loop, after the app's startup (its batchers run) and before REST accepts: a server
            # that answers REST readiness answers gRPC too
            from distml.serve.grpc_server import GrpcEndpoint

            self._grpc = await GrpcEndpoint.start(app, self._settings.host, port)
        config = self.config

        def create_protocol() -> asyncio.Protocol:
            return config.http_protocol_class(  # type: ignore[call-arg]
                config=config, server_state=self.server_state, app_state=self.lifespan.state
            )

        self._acceptors = [Acceptor(sock, create_protocol) for sock in sockets or []]
        for acceptor in self._acceptors:
            acceptor.start()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for acceptor in self._acceptors:
            acceptor.stop()
        if self._grpc is not None:  # before the app's shutdown closes the batchers its calls are queued on
            await self._grpc.stop(self._settings.graceful_timeout_s)
        await super().shutdown(sockets=sockets)

    def _app(self) -> ServeApp | None:
        app = getattr(self.config, "loaded_app", None)
        return app if isinstance(app, ServeApp) else None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Unlike uvicorn's own handler this does not re-raise the signal after shutdown: a clean, drained stop
        # exits 0. A second SIGINT still forces the exit.
        app = self._app()
        if app is not None:
            app.drain()
        if sig == signal.SIGTERM and self._drain_s > 0 and self._stop_at is None:
            self._stop_at = time.monotonic() + self._drain_s  # on_tick stops the server when this passes
        elif self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        else:
            self.should_exit = True

    async def on_tick(self, counter: int) -> bool:
        app = self._app()
        if self._grpc is not None and app is not None and app.draining and not self._grpc_draining:
            self._grpc_draining = True
            await self._grpc.drain()  # gRPC health NOT_SERVING with REST readiness; calls are still answered
        if self._stop_at is not None and time.monotonic() >= self._stop_at:
            self.should_exit = True
        return await super().on_tick(counter)


def serve(config: ServeConfig, source: ModelSource, *, announce: Callable[[str], None] = print) -> None:
    """Serve the model ``source`` names until SIGTERM/SIGINT. Loads it once here first, so a bad model fails fast."""
    model = load_configured(source.path, config)
    sock = _bind(config.host, config.port)
    host, port = sock.getsockname()[:2]
    base = f"http://{host}:{port}" if ":" not in host else f"http://[{host}]:{port}"
    grpc_hold: socket.socket | None = None
    if config.grpc_port is not None:
        # The gRPC port is chosen here, once, so every worker listens on the same one (a port 0 per worker would
        # give each its own); held bound, not listening, until the end so nothing else takes it meanwhile.
        grpc_hold = _reserve(config.host, config.grpc_port)
        config = config.model_copy(update={"grpc_port": grpc_hold.getsockname()[1]})
    try:
        if config.workers == 1:
            _announce(announce, model, base, config)
            _run_worker(sock, ServeApp(model, config, source=source), config)
        else:
            _announce(announce, model, base, config)
            del model  # each worker loads its own
            _supervise(sock, config, source)
    finally:
        sock.close()
        if grpc_hold is not None:
            grpc_hold.close()


def _uvicorn_config(app: ServeApp, config: ServeConfig) -> uvicorn.Config:
    limits = ConnectionLimits(
        idle_s=config.idle_timeout_s,
        header_s=config.header_timeout_s,
        body_s=config.body_timeout_s,
        max_header_bytes=config.max_header_bytes,
    )
    return uvicorn.Config(
        app,
        loop="uvloop",
        http=protocol_class(limits, on_refusal=app.refused),
        ws="none",
        lifespan="on",
        interface="asgi3",
        proxy_headers=False,
        server_header=False,
        access_log=config.access_log,
        log_level="info" if config.access_log else "warning",
        timeout_graceful_shutdown=math.ceil(config.graceful_timeout_s),
        timeout_keep_alive=math.ceil(config.idle_timeout_s),  # the protocol sets the exact value per connection
    )


def _run_worker(sock: socket.socket, app: ServeApp, config: ServeConfig) -> None:
    _DrainingServer(_uvicorn_config(app, config), config).run(sockets=[sock])


def _worker_main(sock: socket.socket, settings: dict[str, Any]) -> None:
    """A worker process (``--workers`` > 1): its own model, app and event loop on the shared socket."""
    from distml.errors import DistmlError

    config = ServeConfig.model_validate(settings["config"])
    try:
        app = build_app(config, ModelSource(**settings["source"]))
    except DistmlError as exc:  # e.g. the model folder is gone: one line in the log, and the supervisor backs off
        log.error("worker %d cannot start: %s", os.getpid(), exc)
        raise SystemExit(1) from None
    _run_worker(sock, app, config)


def _supervise(sock: socket.socket, config: ServeConfig, source: ModelSource) -> None:
    """Start ``config.workers`` processes on ``sock``; pass SIGTERM/SIGINT on to them; replace any that dies."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    settings = {"config": config.model_dump(mode="json"), "source": dataclasses.asdict(source)}
    metrics_dir = tempfile.mkdtemp(prefix="distml-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # inherited by the workers: metrics summed across them
    stopping: list[int] = []
    previous = {
        sig: signal.signal(sig, lambda sig, _frame: stopping.append(sig)) for sig in (signal.SIGTERM, signal.SIGINT)
    }

    def start() -> Any:
        process = ctx.Process(target=_worker_main, args=(sock, settings), name="distml-serve-worker", daemon=False)
        process.start()
        return process

    workers = [start() for _ in range(config.workers)]
    started = [time.monotonic()] * config.workers
    restart_at: list[float | None] = [None] * config.workers
    backoff = [RespawnBackoff() for _ in range(config.workers)]
    try:
        while not stopping:
            time.sleep(0.2)
            now = time.monotonic()
            for i, process in enumerate(workers):
                if stopping:
                    break
                if restart_at[i] is None and not process.is_alive():
                    from prometheus_client import multiprocess

                    multiprocess.mark_process_dead(process.pid)  # type: ignore[no-untyped-call]
                    delay = backoff[i].next_delay(lived_s=now - started[i])
                    restart_at[i] = now + delay
                    log.warning("worker %d (pid %s) exited with code %s; restarting in %.1f s",
                                i, process.pid, process.exitcode, delay)  # fmt: skip
                if restart_at[i] is not None and now >= restart_at[i]:  # type: ignore[operator]
                    workers[i], started[i], restart_at[i] = start(), now, None
        for process in workers:
            if process.pid is not None and process.is_alive():
                os.kill(process.pid, stopping[0])
        limit = time.monotonic() + config.drain_s + config.graceful_timeout_s + 10
        for process in workers:
            process.join(max(0.0, limit - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutil.rmtree(metrics_dir, ignore_errors=True)
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)


class RespawnBackoff:
    """How long to wait before restarting a worker that died: doubling from ``first_s`` up to ``max_s`` while
    workers keep dying young, back to ``first_s`` once one has lived ``healthy_s``. A worker that cannot start
    (a model file gone, memory exhausted) must not be respawned in a tight loop that starves the live ones."""

    def __init__(self, first_s: float = 0.5, max_s: float = 30.0, healthy_s: float = 60.0) -> None:
        self.first_s, self.max_s, self.healthy_s = first_s, max_s, healthy_s
        self._delay = 0.0

    def next_delay(self, lived_s: float) -> float:
        """The wait before the next start, given how long the worker that just died had lived."""
        if lived_s >= self.healthy_s or self._delay == 0.0:
            self._delay = self.first_s
        else:
            self._delay = min(self.max_s, self._delay * 2)
        return self._delay


def _bind(host: str, port: int) -> socket.socket:
    sock = _bound(host, port, socket.SO_REUSEADDR, "", "--port")
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _reserve(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` with SO_REUSEPORT, as gRPC binds its own: the workers' gRPC servers can
    listen on the port while this holds it; a port in use is one line now rather than a worker failing later.
    It never listens: the kernel would hand it a share of the connections, and no one accepts them."""
    return _bound(host, port, socket.SO_REUSEPORT, " for gRPC", "--grpc-port")


def _bound(host: str, port: int, option: int, what: str, flag: str) -> socket.socket:
    """A TCP socket bound to ``host:port`` with ``option`` set; a port in use is a one-line UsageError."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, option, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        from distml.errors import UsageError

        raise UsageError(f"cannot listen{what} on {host}:{port}: {exc.strerror}", hint=f"pick another {flag}") from None
    return sock


def _announce(announce: Callable[[str], None], model: ServedModel, base: str, config: ServeConfig) -> None:
    workers = f"{config.workers} worker(s)"
    batching = f"batches of up to {config.max_batch_size} within {config.max_batch_delay_ms:g} ms"
    announce(f"serving {model.name} version {model.version} from {model.path} ({workers}, {batching})")
    announce(f"  V1: POST {base}/v1/models/{model.name}:predict")
    announce(f"  V2: POST {base}/v2/models/{model.name}/infer")
    announce(f"  health: {base}/v2/health/ready  metrics: {base}/metrics")
    if config.grpc_port is not None:
        host = f"[{config.host}]" if ":" in config.host else config.host
        announce(f"  gRPC V2: {host}:{config.grpc_port} (inference.GRPCInferenceService, grpc.health.v1.Health)")
    if config.log_url or config.log_file:
        announce(f"  request log ({config.log_mode}): {config.log_url or config.log_file}")
    announce(f"listening on {base}")
