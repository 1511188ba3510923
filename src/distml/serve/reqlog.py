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
``inferenceid`` here. Other extensions: ``modelname``, ``modelversion``, ``protocol``, ``endpoint``, and on
responses ``statuscode``.

Every event is accounted for: ``sent`` + ``dropped`` (``distml_log_events_total``) equals the events produced,
once the logger has been closed.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import os
import queue
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, Literal

import orjson

EVENT_TYPES = {
    "request": "org.kubeflow.serving.inference.request",
    "response": "org.kubeflow.serving.inference.response",
}
ATTEMPTS = 3
BACKOFF_S = 0.05
SEND_TIMEOUT_S = 2.0
DOWN_PAUSE_S = 1.0  # after an event fails every attempt, events are dropped for this long before trying again


@dataclass(frozen=True)
class _Record:
    kind: Literal["request", "response"]
    inference_id: str
    endpoint: str
    protocol: str
    body: bytes
    content_type: str
    status: int | None
    time: float


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
    ) -> None:
        if (url is None) == (file is None):
            raise ValueError("RequestLogger needs exactly one of url and file")
        self._url = url
        self._file = file
        self._kinds = {"request", "response"} if mode == "all" else {mode}
        self._model, self._version = model, version
        self._source = f"/distml/serve/{model}"
        self._on_outcome = on_outcome  # ("sent" | "dropped", count)
        self._buffer: queue.Queue[_Record | None] = queue.Queue(maxsize=buffer)
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
    ) -> None:
        """Queue one event (``at``: when it happened, default now); if the buffer is full it is dropped (and
        counted) rather than slowing the request."""
        if kind not in self._kinds:
            return
        record = _Record(kind, inference_id, endpoint, protocol, body, content_type, status, at or time.time())
        try:
            self._buffer.put_nowait(record)
        except queue.Full:
            self._on_outcome("dropped", 1)

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

    # -- the delivery thread -------------------------------------------------------------------------------
    def _deliver(self) -> None:
        sink: _Sink = _FileSink(self._file) if self._file is not None else _HttpSink(self._url or "")
        try:
            while True:
                record = self._buffer.get()
                batch = [record]
                while record is not None and len(batch) < 256:
                    try:
                        record = self._buffer.get_nowait()
                    except queue.Empty:
                        break
                    batch.append(record)
                events = [r for r in batch if r is not None]
                if events:
                    sent = sink.send([self._event(r) for r in events], give_up_at=self._deadline)
                    if sent:
                        self._on_outcome("sent", sent)
                    if len(events) - sent:
                        self._on_outcome("dropped", len(events) - sent)
                if None in batch:
                    self._drop_rest()
                    return
        finally:
            sink.close()

    def _drop_rest(self) -> None:
        left = 0
        with contextlib.suppress(queue.Empty):
            while True:
                left += self._buffer.get_nowait() is not None
        if left:
            self._on_outcome("dropped", left)

    def _event(self, record: _Record) -> tuple[dict[str, Any], bytes, str]:
        attributes: dict[str, Any] = {
            "specversion": "1.0",
            "id": uuid.uuid4().hex,
            "source": self._source,
            "type": EVENT_TYPES[record.kind],
            "time": datetime.fromtimestamp(record.time, UTC).isoformat().replace("+00:00", "Z"),
            "inferenceid": record.inference_id,
            "modelname": self._model,
            "modelversion": self._version,
            "protocol": record.protocol,
            "endpoint": record.endpoint,
        }
        if record.status is not None:
            attributes["statuscode"] = str(record.status)
        return attributes, record.body, record.content_type


class _Sink:
    def send(self, events: list[tuple[dict[str, Any], bytes, str]], give_up_at: float) -> int:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _FileSink(_Sink):
    """JSON lines, CloudEvents structured mode."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fh: BinaryIO = path.open("ab")

    def send(self, events: list[tuple[dict[str, Any], bytes, str]], give_up_at: float) -> int:
        lines = []
        for attributes, body, content_type in events:
            event = dict(attributes, datacontenttype=content_type)
            if content_type.startswith("application/json"):
                try:
                    event["data"] = orjson.loads(body)
                except orjson.JSONDecodeError:
                    event["data_base64"] = base64.b64encode(body).decode()
            else:
                event["data_base64"] = base64.b64encode(body).decode()
            lines.append(orjson.dumps(event) + b"\n")
        try:
            self._fh.write(b"".join(lines))
            self._fh.flush()
        except OSError:
            return 0
        return len(events)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._fh.flush()
            os.fsync(self._fh.fileno())
        self._fh.close()


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

    def send(self, events: list[tuple[dict[str, Any], bytes, str]], give_up_at: float) -> int:
        sent = 0
        for attributes, body, content_type in events:
            now = time.monotonic()
            if now >= give_up_at:
                break  # shutting down and out of time: the caller counts the rest as dropped
            if now < self._down_until:
                continue  # the sink just failed every retry: drop (counted) rather than queue behind it
            headers = {f"ce-{key}": str(value) for key, value in attributes.items()}
            headers["content-type"] = content_type
            for attempt in range(ATTEMPTS):
                if self._post(body, headers):
                    sent += 1
                    break
                if attempt + 1 < ATTEMPTS and time.monotonic() < give_up_at:
                    time.sleep(BACKOFF_S * 2**attempt)
            else:
                self._down_until = time.monotonic() + DOWN_PAUSE_S
        return sent

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
