"""The workspace lock: one ``distml run`` per workspace at a time, and a clear error naming the one that holds it."""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

from distml.errors import PipelineError


@contextlib.contextmanager
def workspace_lock(home: Path) -> Iterator[None]:
    """Hold ``<home>/pipeline/lock`` (an exclusive ``flock``); a second run gets a PipelineError naming the first."""
    folder = home / "pipeline"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise PipelineError(
                f"another distml run is using the workspace {home} ({holder})",
                hint="wait for it to finish, or use another --home",
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock (also when the process dies)
