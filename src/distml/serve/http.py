"""The HTTP/1.1 connection: uvicorn's httptools protocol with the deadlines and size limits it lacks.

uvicorn arms no timer before a connection's first response and puts no bound on header size, so a client can
hold a connection open forever without sending anything, drip its headers a byte at a time, or send megabytes of
headers that the parser buffers. This protocol adds, per connection:

- an **idle** deadline from the moment the connection opens until the first byte of a request (after a response,
  uvicorn's own keep-alive timer plays this part; it is given the same value);
- a **header** deadline from a request's first byte until its headers are complete (``408``, connection closed);
- a **header size** limit on the request line plus headers (``431``, connection closed), checked as bytes arrive,
  so the parser never buffers more than the limit plus one read;
- a **body** backstop: a request whose body has not started when the body deadline has passed (plus half a
  second; the application times out a body that has started and stalls, and answers its own ``408``) gets 408
  here, and its connection is closed; so is one whose answer has gone out while its body still trickles in.

Everything it answers is a pre-built byte string written straight to the transport: refusing a misbehaving client
costs no ASGI task. Each refusal is reported through ``on_refusal(status)`` (the app counts it in its metrics).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

BODY_BACKSTOP_S = 0.5  # after the body deadline: the app answers 408 itself; this only catches what it does not
REFUSED_KEY = "distml.refused"  # the scope key through which this layer tells the app it answered a request


@dataclass(frozen=True)
class ConnectionLimits:
    """Deadlines (seconds) and the header size limit (bytes) applied to every connection."""

    idle_s: float
    header_s: float
    body_s: float
    max_header_bytes: int


class _RefusedError(Exception):
    """Raised inside a parser callback to stop parsing a request that has just been refused."""


def _raw_response(status: int, reason: str, message: str) -> bytes:
    body = orjson.dumps({"error": message})
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


def protocol_class(limits: ConnectionLimits, on_refusal: Callable[[int], None]) -> type[HttpToolsProtocol]:
    """A protocol class for ``uvicorn.Config(http=...)`` that applies ``limits`` to every connection."""
    header_timeout = _raw_response(
        408, "Request Timeout", f"the request headers did not arrive within {limits.header_s:g} s"
    )
    body_timeout = _raw_response(408, "Request Timeout", f"the body did not arrive within {limits.body_s:g} s")
    too_large = _raw_response(
        431,
        "Request Header Fields Too Large",
        f"the request line and headers are over {limits.max_header_bytes:,} bytes; send smaller headers",
    )

    class GuardedProtocol(HttpToolsProtocol):
        """uvicorn's httptools protocol plus idle/header/body deadlines and a header size limit."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.timeout_keep_alive = limits.idle_s  # type: ignore[assignment]  # call_later takes a float
            self._timer: asyncio.TimerHandle | None = None
            self._in_headers = True  # between requests or inside a request line + headers
            self._header_bytes = 0  # bytes received while in the headers
            self._parsed_header_bytes = 0  # the request line and headers the parser has handed over
            self._refused = False

        # -- the one timer: what it guards depends on where the connection is ----------------------------------
        def _arm(self, seconds: float, on_expiry: Callable[[], None]) -> None:
            self._disarm()
            self._timer = self.loop.call_later(seconds, on_expiry)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _refuse(self, status: int, response: bytes) -> None:
            self._disarm()
            self._refused = True
            if not self.transport.is_closing():
                self.transport.write(response)
                self.transport.close()
                on_refusal(status)

        def _idle_expired(self) -> None:
            self._timer = None
            if not self.transport.is_closing():
                self.transport.close()  # nothing was asked: nothing to answer

        def _headers_expired(self) -> None:
            self._timer = None
            self._refuse(408, header_timeout)

        def _body_expired(self) -> None:
            self._timer = None
            if self.transport.is_closing():
                return
            if self.cycle is not None and not self.cycle.response_started:
                # No body byte came (the app times out a body that has started): answer 408 for the app, which
                # sees a disconnect and counts the status it finds in the scope
                self.scope[REFUSED_KEY] = 408  # type: ignore[literal-required]
                self.transport.write(body_timeout)
            self.transport.close()

        # -- uvicorn/httptools callbacks -------------------------------------------------------------------------
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm(limits.idle_s, self._idle_expired)

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def send_400_response(self, msg: str) -> None:
            if not self._refused:  # a refusal stops the parser with an error; it has been answered already
                super().send_400_response(msg)

        def _count_header(self, n: int) -> None:
            self._parsed_header_bytes += n
            if self._parsed_header_bytes > limits.max_header_bytes:
                self._refuse(431, too_large)
                raise _RefusedError

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return
            if self._in_headers:
                self._header_bytes += len(data)
            super().data_received(data)
            # Checked after the parser has seen the chunk: a chunk may end the headers and carry body bytes too,
            # so the parser never holds more than the limit plus one read of header bytes.
            if self._in_headers and self._header_bytes > limits.max_header_bytes:
                self._refuse(431, too_large)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm(limits.header_s, self._headers_expired)

        def on_url(self, url: bytes) -> None:
            self._count_header(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._count_header(len(name) + len(value) + 4)
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._in_headers = False
            self._arm(limits.body_s + BODY_BACKSTOP_S, self._body_expired)
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self._disarm()
            self._in_headers, self._header_bytes, self._parsed_header_bytes = True, 0, 0
            super().on_message_complete()

    return GuardedProtocol
