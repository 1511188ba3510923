"""One ``distml train`` per run folder at a time: an advisory lock (``flock``) on a file in the folder.

Two commands training the same run at once would each clear the other's status markers and write checkpoints
and history into one folder. The lock is held on an open file, so the kernel drops it when its last holder exits,
however it exits: a killed command leaves no stale lock behind, only a file whose content the next holder
overwrites. It is released by closing, never by ``LOCK_UN``: a launched process shares the open file (see
:func:`distml.train.launch.run_job`), and the folder stays locked until it too has ended.

Hosts of one multi-host job may share the run folder (pods on one volume); each host locks its own file, so
they do not exclude each other, while a second command for the same host still does.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from distml.errors import TrainingError, WorkspaceError


class FileLock:
    """A held ``flock`` on an open file; :meth:`release` (or the end of the process) lets it go."""

    def __init__(self, fd: int, path: Path) -> None:
        self._fd: int | None = fd
        self.path = path

    @property
    def fileno(self) -> int:
        """The open lock file, for a child process that should hold the lock as long as it runs."""
        if self._fd is None:
            raise ValueError(f"the lock {self.path} was released")
        return self._fd

    def release(self) -> None:
        """Close this process's handle; the lock is free once no process holds the file open."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


RunLock = FileLock  # a run folder's lock (the name the launcher uses)


class LockHeld(Exception):  # noqa: N818 (not an error of the user's: the caller turns it into one)
    """Another process holds the lock; ``holder`` is the line it wrote into the file (may be empty)."""

    def __init__(self, holder: str) -> None:
        super().__init__(holder)
        self.holder = holder


def lock_exclusive(path: Path, owner: str) -> FileLock:
    """Take an exclusive ``flock`` on ``path`` (created if missing) and write ``owner`` into it, without waiting.

    Raises :class:`LockHeld` when another process holds it, WorkspaceError when the file cannot be opened or
    locked. A holder that died left its own line in the file; the kernel released its lock, and this write
    replaces the line.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise WorkspaceError(f"cannot open the lock file {path}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
        except OSError:
            holder = ""
        os.close(fd)
        raise LockHeld(holder) from None
    except OSError as exc:  # e.g. ENOLCK: a network file system without lock support
        os.close(fd)
        raise WorkspaceError(f"cannot lock {path}: {exc.strerror}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{owner}\n".encode(), 0)
    return FileLock(fd, path)


def lock_file(run_dir: Path, node_rank: int = 0) -> Path:
    """The lock file of ``run_dir`` for the host with ``node_rank``."""
    return run_dir / (".train.lock" if node_rank == 0 else f".train-node-{node_rank}.lock")


def lock_run(run_dir: Path, node_rank: int = 0) -> RunLock:
    """Lock ``run_dir`` for this host, or raise TrainingError naming the process that holds it."""
    try:
        return lock_exclusive(lock_file(run_dir, node_rank), f"{os.getpid()} {socket.gethostname()}")
    except LockHeld as held:
        raise TrainingError(
            f"run {run_dir.name} is already being trained by {_holder(held.holder)}",
            hint="wait for it to finish (or stop it), or use another --run-name",
        ) from None


def _holder(line: str) -> str:
    """'process PID on HOST' from the lock file's line (written right after locking; may be a moment late)."""
    fields = line.split()
    if len(fields) >= 2 and fields[0].isdigit():
        return f"process {fields[0]} on {fields[1][:64]}"
    return "another process"
