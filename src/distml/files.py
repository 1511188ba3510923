"""Small file helpers shared by the store and the sources: hashing and atomic writes."""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import BinaryIO

from distml.workspace import fsync_dir

CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


class HashingWriter:
    """A write-only file object that hashes what passes through it (so a file is never read back to hash)."""

    def __init__(self, fh: BinaryIO) -> None:
        self._fh = fh
        self._sha = hashlib.sha256()
        self.bytes_written = 0

    def write(self, data: bytes | memoryview) -> int:
        self._sha.update(data)
        self.bytes_written += len(data)
        return self._fh.write(data)

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old content or the new, never a mix.

    The data is fsynced before the rename and the folder after it, so that after a crash the file holds the old
    content or the new one (the rename itself is durable only once its folder is). On any failure (a full disk,
    a quota) the temp file is removed and ``path`` keeps its old content; the error is raised as it was.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
