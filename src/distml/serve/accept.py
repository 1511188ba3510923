"""Accepting connections: every waiting connection on each pass of the event loop, not one.

uvloop (libuv) accepts connections from its own C callback, which must take the interpreter lock for each one.
Under overload the lock is busy and the loop's passes are long, and measured on the 2-core box at 1,000
connections it accepted one connection every 15-30 ms: 1,000 new connections took seconds to get in, and the
requests they had already sent waited unread in the kernel's accept queue (``ss -ltn`` showed 130 queued,
draining at ~30/s) with no answer, not even the 503 that would tell the client to back off. Those waits were the
2-10 s tail of accepted requests.

:class:`Acceptor` watches the listening socket itself: each time it is readable it accepts everything waiting
(up to :data:`MAX_PER_PASS`) in one go, and hands each connection to the loop with
``connect_accepted_socket``. The connection then goes through the same protocol (deadlines, limits) and the same
admission as before; what changes is only that it is seen, and so answered or refused, promptly.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable

log = logging.getLogger("distml.serve")

MAX_PER_PASS = 1024  # connections accepted per readable event: bounds one pass of the loop
PAUSE_ON_LIMIT_S = 0.5  # out of file descriptors or memory: stop accepting this long, let connections close

_RESOURCE_LIMITS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


class Acceptor:
    """Accepts every connection waiting on ``sock`` each time it is readable; ``factory`` makes its protocol."""

    def __init__(self, sock: socket.socket, factory: Callable[[], asyncio.Protocol]) -> None:
        self._sock = sock
        self._factory = factory
        self._loop = asyncio.get_running_loop()
        self._tasks: set[asyncio.Task[object]] = set()
        self._listening = False
        self._resume: asyncio.TimerHandle | None = None
        sock.setblocking(False)  # shared with the other workers' sockets: all of them accept without blocking

    def start(self) -> None:
        if not self._listening:
            self._loop.add_reader(self._sock.fileno(), self._accept_all)
            self._listening = True

    def stop(self) -> None:
        """Stop accepting (the socket stays open: it belongs to the process that bound it)."""
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        if self._listening:
            self._loop.remove_reader(self._sock.fileno())
            self._listening = False

    def _accept_all(self) -> None:
        for _ in range(MAX_PER_PASS):
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return  # none left (or another worker took it)
            except ConnectionAbortedError:
                continue  # the client gave up while it waited in the queue
            except OSError as exc:
                if exc.errno not in _RESOURCE_LIMITS:
                    raise
                log.warning("cannot accept connections (%s); pausing %.1f s", exc.strerror, PAUSE_ON_LIMIT_S)
                self.stop()
                self._resume = self._loop.call_later(PAUSE_ON_LIMIT_S, self.start)
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = self._loop.create_task(self._connect(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _connect(self, conn: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(self._factory, conn)
        except OSError:  # reset before the loop took it over: nothing to answer
            conn.close()
