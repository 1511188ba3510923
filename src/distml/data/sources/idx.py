"""The IDX format of (Fashion-)MNIST, gzip-compressed or not, read with a bound on the decompressed size."""

from __future__ import annotations

import gzip
import hashlib
import io
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distml.errors import FormatError

_UBYTE = 0x08


@dataclass(frozen=True)
class IdxFile:
    content: bytes  # the uncompressed IDX bytes
    sha256: str  # of ``content``: stable across mirrors that re-compress
    md5_file: str  # of the file as stored (the published .gz MD5 when it was not re-compressed)


def read_idx_file(path: Path, *, max_bytes: int, shown: str | None = None) -> IdxFile:
    """Read (and gunzip, if needed) an IDX file, hashing both the stored and the uncompressed bytes.

    ``shown`` is the name used in errors (a download's temp file is better reported by its real name).
    """
    if path.stat().st_size > max_bytes:
        raise FormatError(f"{shown or path.name}: {path.stat().st_size} bytes is over the {max_bytes}-byte limit")
    raw = path.read_bytes()
    md5 = hashlib.md5(raw, usedforsecurity=False).hexdigest()
    is_gzip = raw[:2] == b"\x1f\x8b"
    content = _gunzip(raw, max_bytes=max_bytes, name=shown or path.name) if is_gzip else raw
    return IdxFile(content=content, sha256=hashlib.sha256(content).hexdigest(), md5_file=md5)


def _gunzip(raw: bytes, *, max_bytes: int, name: str) -> bytes:
    out = bytearray()
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(raw)) as gz:  # BytesIO shares, not copies, raw
            while chunk := gz.read(1 << 22):
                out += chunk
                if len(out) > max_bytes:
                    raise FormatError(f"{name}: decompresses to more than {max_bytes} bytes (gzip bomb?)")
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise FormatError(
            f"{name}: corrupt or truncated gzip ({exc})", hint="delete the file and download it again"
        ) from None
    return bytes(out)


def parse_idx(content: bytes, *, name: str, ndim: int) -> np.ndarray:
    """Parse IDX bytes into a read-only uint8 array of ``ndim`` dimensions, checking magic and length."""
    if len(content) < 4:
        raise FormatError(f"{name}: {len(content)} bytes is too short for an IDX header")
    zero, dtype, dims = int.from_bytes(content[:2], "big"), content[2], content[3]
    if zero != 0 or dtype != _UBYTE or dims != ndim:
        magic = int.from_bytes(content[:4], "big")
        raise FormatError(
            f"{name}: wrong IDX magic 0x{magic:08x} (expected 0x{0x0800 | ndim:08x}, unsigned bytes x {ndim} dims)"
        )
    header = 4 + 4 * ndim
    if len(content) < header:
        raise FormatError(f"{name}: truncated IDX header")
    shape = tuple(int.from_bytes(content[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape, dtype=np.int64))
    if len(content) != expected:
        raise FormatError(f"{name}: IDX header declares {shape} ({expected} bytes) but the file has {len(content)}")
    return np.frombuffer(content, dtype=np.uint8, offset=header).reshape(shape)
