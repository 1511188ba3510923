"""Finding source files: in a local folder, in the download cache, or on a list of mirrors.

Downloads stream to a temp file beside the target, are verified, and only then renamed into place; any failure
(connection, HTTP status, short read, checksum) moves on to the next mirror.
"""

from __future__ import annotations

import os
import secrets
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from urllib.parse import urlparse

from distml.data.sources.base import Log
from distml.errors import DataError, DownloadError, SourceNotFoundError, UsageError

Verify = Callable[[Path, str], None]  # (path, canonical file name) -> None, raises DataError when bad
_SCHEMES = ("http", "https", "file")
_CHUNK = 1 << 20


def is_url(text: str) -> bool:
    return urlparse(text).scheme in _SCHEMES and "://" in text


def check_url(url: str) -> str:
    if urlparse(url).scheme not in _SCHEMES:
        raise UsageError(f"source URL {url!r} is not http(s):// or file://", hint="pass a folder or an http(s) URL")
    return url


def find_local(folder: Path, names: Sequence[str], *, dataset: str) -> dict[str, Path]:
    """Map each expected file name to a file in ``folder`` (``name`` or, for ``x.gz``, also plain ``x``)."""
    if not folder.is_dir():
        raise SourceNotFoundError(f"source folder {folder} does not exist", hint="pass --source DIR with the files")
    found, missing = {}, []
    for name in names:
        for candidate in (name, name.removesuffix(".gz")):
            if (folder / candidate).is_file():
                found[name] = folder / candidate
                break
        else:
            missing.append(name)
    if missing:
        raise SourceNotFoundError(
            f"{dataset}: {folder} lacks {', '.join(missing)}",
            hint=f"put the files {', '.join(names)} in that folder",
        )
    return found


def download(
    names: Sequence[str],
    *,
    mirrors: Sequence[str],
    dest: Path,
    verify: Verify,
    log: Log,
    timeout_s: float,
    dataset: str,
    max_bytes: int = 1 << 30,
) -> dict[str, Path]:
    """Make sure every file in ``names`` is in ``dest``, verified, downloading the missing ones."""
    dest.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in names:
        target = dest / name
        if target.is_file():
            out[name] = target  # verified when it was downloaded; the ingest verifies content again
            continue
        failures = []
        for mirror in mirrors:
            url = f"{check_url(mirror).rstrip('/')}/{name}"
            try:
                _fetch_one(url, target, name, verify=verify, log=log, timeout_s=timeout_s, max_bytes=max_bytes)
                out[name] = target
                break
            except (OSError, DataError, ValueError) as exc:
                reason = _reason(exc)
                failures.append(f"{url}: {reason}")
                log(f"  {name}: {url} failed ({reason}); trying the next mirror")
        else:
            raise DownloadError(
                f"{dataset}: could not get {name} from any mirror ({'; '.join(failures)})",
                hint=f"offline? copy the files {', '.join(names)} into {dest} or pass --source DIR",
            )
    return out


def _fetch_one(
    url: str, target: Path, name: str, *, verify: Verify, log: Log, timeout_s: float, max_bytes: int
) -> None:
    part = target.with_name(f".{name}.{os.getpid()}-{secrets.token_hex(3)}.part")
    log(f"  downloading {url}")
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp, part.open("wb") as fh:
            expected = resp.headers.get("Content-Length")
            size = 0
            while chunk := resp.read(_CHUNK):
                fh.write(chunk)
                size += len(chunk)
                if size > max_bytes:
                    raise DownloadError(f"more than {max_bytes} bytes: not the expected file")
            if expected is not None and size != int(expected):
                raise DownloadError(f"short read: {size} of {expected} bytes")
            fh.flush()
            os.fsync(fh.fileno())
        verify(part, name)
        os.replace(part, target)
    finally:
        part.unlink(missing_ok=True)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code}"
    if isinstance(exc, urllib.error.URLError):
        return str(exc.reason)
    return str(exc)
