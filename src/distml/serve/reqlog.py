"""Request logging as KServe's logger does it: every inference request and response as a CloudEvent.

The request path only appends a small record to a bounded buffer (a dropped-and-counted append when it is full);
one background thread builds the events and delivers them:

- ``--log-url URL``: an HTTP POST per event in CloudEvents *binary* content mode (``ce-*`` headers, the original
  body as the payload), as KServe's logger sends to a message dumper or broker; a failed POST is retried
  (3 attempts, backoff) and then dropped and counted; for a second after that, events are dropped (and
  counted) without trying, so a dead sink costs nothing and the buffer never becomes a slow queue behind it;
- ``--log-file FILE``: one event per line in *structured* mode (JSON, the payload under ``data`` when it is JSON,
  ``data_base64`` otherwise), flushed after every drained batch and fsynced at shutdown.

Events: ``type`` ``org.kubeflow.serving.inference.request`` / ``.response``, ``source``
``/distml/serve/<model>``, a unique ``id`` per event, and the extension ``inferenceid`` (the server's request id,
also sent back in the ``X-Request-Id`` header) linking a response to its request. KServe reuses one ``id`` for
both events; CloudEvents requires ``source`` + ``id`` to be unique per event, so the link lives in
``inferenceid`` here. Other extensions: ``modelname``, ``modelversion`` (the version that answered: it changes
at a hot swap, and differs between a champion and its canary), ``variant`` (``champion`` or ``canary``, once the
request was routed), ``protocol``, ``endpoint``, and on responses ``statuscode``.

Server events go to the same sink, whatever ``mode`` says: ``io.distml.serve.swap`` (a hot swap, or a version
refused), ``io.distml.serve.rollback`` (a canary rolled back, and why), their data a small JSON document.

Every event is accounted for: ``sent`` + ``dropped`` (``distml_log_events_total``) equals the events produced,
once the logger has been closed. Each drop has a reason (``on_drop`` and :attr:`RequestLogger.dropped`):
``buffer_full`` (over ``buffer`` events or ``max_buffer_bytes`` of bodies), ``sink_error`` (the file cannot be
written, the URL does not answer 2xx after retries, or it just failed and is being skipped), ``encode_error``
(the event cannot be built or serialised), ``internal_error`` (a bug in this module; logged with its traceback)
and ``shutdown`` (still unsent at close). No failure of one event stops the delivery thread.

A JSON body nested deeper than orjson serialises (255 levels; it parses 1,024) goes to the file sink as
``data_base64`` instead of ``data``: it is still delivered, as the bytes that came in.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import logging
import os
import queue
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, Literal

import orjson

EVENT_TYPES = {
    "request": "org.kubeflow.serving.inference.request",
    "response": "org.kubeflow.serving.inference.response",
}
NOTE_TYPE = "io.distml.serve"  # server events (hot swap, rollback): io.distml.serve.<event>
ATTEMPTS = 3
BACKOFF_S = 0.05
SEND_TIMEOUT_S = 2.0
DOWN_PAUSE_S = 1.0  # after an event fails every attempt, events are dropped for this long before trying again
RECORD_OVERHEAD = 256  # bytes a buffered record costs besides its body (ids, endpoint, content type)
WARN_EVERY_S = 60.0  # a reason for dropping is logged at most this often

log = logging.getLogger("distml.serve.reqlog")
DropReason = Literal["buffer_full", "sink_error", "encode_error", "internal_error", "shutdown"]


@dataclass(frozen=True)
class _Record:  # built on the request path: only references, no copies or encoding
    kind: Literal["request", "response", "note"]
    inference_id: str
    endpoint: str
    protocol: str
    body: bytes
    content_type: str
    status: int | None
    time: float
    version: str | None = None  # the version that answered (None: the logger's)
    variant: str | None = None  # champion | canary (None: not known, e.g. refused before one was picked)
    note: str | None = None  # a server event's type suffix (kind "note")


class RequestLogger:
    """Delivers request/response CloudEvents to one sink from a background thread; never blocks a request."""

    def __init__(
        self,
        *,
        url: str | None,
        file: Path | None,
        mode: Literal["all", "request", "response"],
        model: str,
        version: str,
        buffer: int,
        on_outcome: Callable[[str, int], None],
        max_buffer_bytes: int = 64 << 20,
        on_drop: Callable[[DropReason, int], None] | None = None,
    ) -> None:
        """``buffer``: events waiting, at most; ``max_buffer_bytes``: their bodies' bytes, at most (a record counts
        its body plus :data:`RECORD_OVERHEAD`). ``on_outcome("sent" | "dropped", n)`` counts every event once;
        ``on_drop(reason, n)`` also says why for the dropped ones."""
        if (url is None) == (file is None):
            raise ValueError("RequestLogger needs exactly one of url and file")
        self._url = url
        self._file = file
        self._kinds = {"request", "response"} if mode == "all" else {mode}
        self._model, self._version = model, version
        self._source = f"/distml/serve/{model}"
        self._on_outcome = on_outcome  # ("sent" | "dropped", count)
        self._on_drop = on_drop
        self._buffer: queue.Queue[_Record | None] = queue.Queue(maxsize=buffer)
        self._max_bytes = max_buffer_bytes
        self._bytes = 0  # bodies in the buffer; log() adds, the delivery thread subtracts
        self._lock = threading.Lock()
        self._dropped: dict[str, int] = {}
        self._warned: dict[str, float] = {}
        self._thread = threading.Thread(target=self._deliver, name="distml-reqlog", daemon=True)
        self._deadline = float("inf")  # once closing: give up on the sink after this time
        self._thread.start()

    def log(
        self,
        kind: Literal["request", "response"],
        inference_id: str,
        endpoint: str,
        protocol: str,
        body: bytes,
        content_type: str,
        status: int | None = None,
        at: float | None = None,
        *,
        version: str | None = None,
        variant: str | None = None,
    ) -> None:
        """Queue one event (``at``: when it happened, default now; ``version`` and ``variant``: what answered);
        if the buffer is full it is dropped (and counted) rather than slowing the request."""
        if kind not in self._kinds:
            return
        record = _Record(
            kind, inference_id, endpoint, protocol, body, content_type, status, at or time.time(), version, variant
        )
        self._put(record)

    def note(self, event: str, doc: dict[str, object]) -> None:
        """Queue a server event (``io.distml.serve.<event>``: a hot swap, a canary rollback) with ``doc`` as its
        JSON data, whatever ``mode`` says: it is rare and explains the events around it."""
        body = orjson.dumps(doc)
        version, variant = str(doc.get("version", "")) or None, str(doc.get("variant", "")) or None
        self._put(_Record("note", "", "", "", body, "application/json", None, time.time(), version, variant, event))

    def _put(self, record: _Record) -> None:
        body = record.body
        size = len(body) + RECORD_OVERHEAD
        with self._lock:
            if self._bytes + size > self._max_bytes:
                full = True
            else:
                try:
                    self._buffer.put_nowait(record)
                    self._bytes += size
                    full = False
                except queue.Full:
                    full = True
        if full:
            self._drop("buffer_full", 1)

    @property
    def dropped(self) -> dict[str, int]:
        """Events dropped so far, by reason."""
        with self._lock:
            return dict(self._dropped)

    def _drop(self, reason: DropReason, n: int, detail: str = "") -> None:
        if n <= 0:
            return
        now = time.monotonic()
        with self._lock:
            self._dropped[reason] = self._dropped.get(reason, 0) + n
            warn = now - self._warned.get(reason, -WARN_EVERY_S) >= WARN_EVERY_S
            if warn:
                self._warned[reason] = now
        if warn:
            log.warning("request log: dropped %d event(s): %s%s", n, reason, f" ({detail})" if detail else "")
        self._on_outcome("dropped", n)
        if self._on_drop is not None:
            self._on_drop(reason, n)

    def close(self, timeout_s: float = 5.0) -> None:
        """Deliver what is buffered within ``timeout_s``; whatever is left is counted as dropped."""
        self._deadline = time.monotonic() + timeout_s
        while True:  # the sentinel must get in even when the buffer is full
            try:
                self._buffer.put(None, timeout=0.05)
                break
            except queue.Full:
                if not self._thread.is_alive():
                    break
        self._thread.join(timeout_s + SEND_TIMEOUT_S * ATTEMPTS + 1)
        if not self._thread.is_alive():
            self._drop_rest()  # normally already empty; counts what a thread that died could not

    # -- the delivery thread -------------------------------------------------------------------------------
    def _deliver(self) -> None:
        sink: _Sink = _FileSink(self._file) if self._file is not None else _HttpSink(self._url or "")
        try:
            while True:
                batch = self._take()
                events = [r for r in batch if r is not None]
                if events:
                    try:
                        self._send(sink, events)
                    except Exception as exc:  # a bug, not a sink failure: count the batch, keep the thread
                        log.exception("request log: delivering %d event(s) failed", len(events))
                        self._drop("internal_error", len(events), type(exc).__name__)
                if None in batch:
                    self._drop_rest()
                    return
        finally:
            with contextlib.suppress(Exception):
                sink.close()

    def _take(self) -> list[_Record | None]:
        """Wait for a record, then take what else is buffered (at most 256), releasing their bytes."""
        record = self._buffer.get()
        batch = [record]
        while record is not None and len(batch) < 256:
            try:
                record = self._buffer.get_nowait()
            except queue.Empty:
                break
            batch.append(record)
        size = sum(len(r.body) + RECORD_OVERHEAD for r in batch if r is not None)
        with self._lock:
            self._bytes -= size
        return batch

    def _send(self, sink: _Sink, records: list[_Record]) -> None:
        events: list[_Event] = []
        for record in records:
            try:
                events.append(self._event(record))
            except Exception as exc:  # one event that cannot be built costs only itself
                self._drop("encode_error", 1, f"{type(exc).__name__}: {exc}")
        result = sink.send(events, give_up_at=self._deadline)
        if result.sent:
            self._on_outcome("sent", result.sent)
        for reason, (n, detail) in result.dropped.items():
            self._drop(reason, n, detail)
        unaccounted = len(events) - result.sent - sum(n for n, _ in result.dropped.values())
        if unaccounted > 0:  # a sink's bug; never lose the count
            self._drop("internal_error", unaccounted, "sink did not account for every event")

    def _drop_rest(self) -> None:
        left, size = 0, 0
        with contextlib.suppress(queue.Empty):
            while True:
                record = self._buffer.get_nowait()
                if record is not None:
                    left += 1
                    size += len(record.body) + RECORD_OVERHEAD
        with self._lock:
            self._bytes -= size
        self._drop("shutdown", left)

    def _event(self, record: _Record) -> _Event:
        when = datetime.fromtimestamp(record.time, UTC).isoformat().replace("+00:00", "Z")
        attributes: dict[str, Any] = {"specversion": "1.0", "id": uuid.uuid4().hex, "source": self._source}
        if record.kind == "note":
            attributes.update(type=f"{NOTE_TYPE}.{record.note}", time=when, modelname=self._model)
        else:
            attributes.update(
                type=EVENT_TYPES[record.kind],
                time=when,
                inferenceid=record.inference_id,
                modelname=self._model,
                modelversion=record.version or self._version,
                protocol=record.protocol,
                endpoint=record.endpoint,
            )
        if record.kind == "note" and record.version:
            attributes["modelversion"] = record.version
        if record.variant is not None:
            attributes["variant"] = record.variant
        if record.status is not None:
            attributes["statuscode"] = str(record.status)
        return attributes, record.body, record.content_type


_Event = tuple[dict[str, Any], bytes, str]  # CloudEvent attributes, the body, its content type


@dataclass
class _Sent:
    """What a sink did with a batch: how many it sent, and how many it dropped, by reason (count, detail)."""

    sent: int = 0
    dropped: dict[DropReason, tuple[int, str]] = field(default_factory=dict)

    def drop(self, reason: DropReason, n: int = 1, detail: str = "") -> None:
        count, first = self.dropped.get(reason, (0, detail))
        self.dropped[reason] = (count + n, first or detail)


class _Sink:
    def send(self, events: list[_Event], give_up_at: float) -> _Sent:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _FileSink(_Sink):
    """JSON lines, CloudEvents structured mode. The file is opened on first use (and again after a failure)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._fh: BinaryIO | None = None

    def send(self, events: list[_Event], give_up_at: float) -> _Sent:
        result = _Sent()
        lines = []
        for attributes, body, content_type in events:
            try:
                lines.append(_json_line(attributes, body, content_type))
            except Exception as exc:  # one event that cannot be serialised costs only itself
                result.drop("encode_error", 1, f"{type(exc).__name__}: {exc}")
        if not lines:
            return result
        try:
            if self._fh is None:
                self._path.parent.mkdir(parents=True, exist_ok=True)
                self._fh = self._path.open("ab")
            self._fh.write(b"".join(lines))
            self._fh.flush()
        except OSError as exc:
            self.close()  # reopened for the next batch: the disk may have room again, the folder may be back
            result.drop("sink_error", len(lines), f"{self._path}: {exc.strerror or exc}")
            return result
        result.sent = len(lines)
        return result

    def close(self) -> None:
        if self._fh is None:
            return
        fh, self._fh = self._fh, None
        with contextlib.suppress(OSError):
            fh.flush()
            os.fsync(fh.fileno())
        with contextlib.suppress(OSError):
            fh.close()


def _json_line(attributes: dict[str, Any], body: bytes, content_type: str) -> bytes:
    event = dict(attributes, datacontenttype=content_type)
    if content_type.startswith("application/json"):
        try:
            event["data"] = orjson.loads(body)
            return orjson.dumps(event) + b"\n"
        except (orjson.JSONDecodeError, orjson.JSONEncodeError):
            # Not JSON after all, or nested deeper than orjson writes (255; it reads 1,024): the bytes as sent.
            del event["data"]
    event["data_base64"] = base64.b64encode(body).decode()
    return orjson.dumps(event) + b"\n"


class _HttpSink(_Sink):
    """One keep-alive connection; each event a POST in binary content mode, retried with backoff."""

    def __init__(self, url: str) -> None:
        parts = urllib.parse.urlsplit(url)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or (443 if self._https else 80)
        self._path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._conn: http.client.HTTPConnection | None = None
        self._down_until = 0.0

    def send(self, events: list[_Event], give_up_at: float) -> _Sent:
        result = _Sent()
        for i, (attributes, body, content_type) in enumerate(events):
            now = time.monotonic()
            if now >= give_up_at:  # shutting down and out of time
                result.drop("shutdown", len(events) - i)
                break
            if now < self._down_until:  # the sink just failed every retry: drop rather than queue behind it
                result.drop("sink_error", 1, "skipped while the sink is down")
                continue
            try:
                headers = {f"ce-{key}": str(value) for key, value in attributes.items()}
                headers["content-type"] = content_type
                for attempt in range(ATTEMPTS):
                    if self._post(body, headers):
                        result.sent += 1
                        break
                    if attempt + 1 < ATTEMPTS and time.monotonic() < give_up_at:
                        time.sleep(BACKOFF_S * 2**attempt)
                else:
                    self._down_until = time.monotonic() + DOWN_PAUSE_S
                    result.drop("sink_error", 1, f"{self._host}:{self._port} failed {ATTEMPTS} attempts")
            except (ValueError, UnicodeError) as exc:  # a header http.client refuses: this event only
                self.close()
                result.drop("encode_error", 1, f"{type(exc).__name__}: {exc}")
        return result

    def _post(self, body: bytes, headers: dict[str, str]) -> bool:
        try:
            if self._conn is None:
                cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
                self._conn = cls(self._host, self._port, timeout=SEND_TIMEOUT_S)
            self._conn.request("POST", self._path, body=body, headers=headers)
            response = self._conn.getresponse()
            response.read()
            return 200 <= response.status < 300
        except (OSError, http.client.HTTPException):
            self.close()
            return False

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
