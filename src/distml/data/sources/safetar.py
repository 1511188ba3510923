"""Reading members of an untrusted tar archive without ever extracting it to disk.

Every member is checked before its bytes are used: no absolute paths, no ``..``, no links, devices or FIFOs,
and caps on the member count, each member's size and the total size. Members are read in one streaming pass.
"""

from __future__ import annotations

import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from distml.errors import FormatError, UnsafeArchiveError


@dataclass(frozen=True)
class TarLimits:
    max_members: int = 1_000
    max_member_bytes: int = 512 * 1024 * 1024
    max_total_bytes: int = 2 * 1024 * 1024 * 1024


def iter_regular_files(path: Path, *, limits: TarLimits = TarLimits()) -> Iterator[tuple[str, bytes]]:
    """Yield ``(normalised member name, content)`` for each regular file; raise on the first unsafe member."""
    total = 0
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for count, member in enumerate(tar, start=1):
                if count > limits.max_members:
                    raise UnsafeArchiveError(f"{path.name}: more than {limits.max_members} members")
                name = check_member(member, path.name)
                if member.isdir():
                    continue
                if member.size > limits.max_member_bytes:
                    raise UnsafeArchiveError(f"{path.name}: member {name} is {member.size} bytes, over the cap")
                total += member.size
                if total > limits.max_total_bytes:
                    raise UnsafeArchiveError(f"{path.name}: members add up to over {limits.max_total_bytes} bytes")
                fh = tar.extractfile(member)
                if fh is None:  # pragma: no cover - regular files always have a stream
                    raise UnsafeArchiveError(f"{path.name}: member {name} has no content")
                data = fh.read()
                if len(data) != member.size:
                    raise FormatError(f"{path.name}: member {name} is truncated")
                yield name, data
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise FormatError(f"{path.name}: corrupt or truncated archive ({exc})") from None


def check_member(member: tarfile.TarInfo, archive: str) -> str:
    """Return the member's normalised relative name, or raise UnsafeArchiveError."""
    raw = member.name
    if not (member.isfile() or member.isdir()):
        kind = "link" if member.issym() or member.islnk() else "device or special file"
        raise UnsafeArchiveError(f"{archive}: member {raw!r} is a {kind}; only regular files are accepted")
    pure = PurePosixPath(raw)
    if pure.is_absolute() or raw.startswith(("/", "\\")) or (pure.parts and ":" in pure.parts[0]):
        raise UnsafeArchiveError(f"{archive}: member {raw!r} has an absolute path")
    if ".." in pure.parts or "\\" in raw or "\x00" in raw:
        raise UnsafeArchiveError(f"{archive}: member {raw!r} would escape the target folder")
    return str(pure)
