"""The dataset store: one folder per dataset version, named by its content digest.

A version is written into ``<home>/datasets/.tmp-<pid>-<token>/`` and renamed into place only once every
shard and the manifest are on disk and fsynced, so a crash (even SIGKILL) never leaves a visible, half-written
dataset; the next ingest removes temp folders whose process is gone. ``.index/`` maps a fingerprint of the
source files and ingest parameters to the digest they produced, which makes re-ingesting unchanged sources a
lookup instead of a conversion.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import math
import os
import re
import secrets
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from distml._proc import pid_alive
from distml.data.manifest import MANIFEST_NAME, Manifest, ShardInfo, build_manifest
from distml.errors import NotFoundError, UsageError, WorkspaceError
from distml.files import HashingWriter, write_atomic
from distml.workspace import Workspace, fsync_dir

_TMP_PREFIX = ".tmp-"
_MIN_PREFIX = 4
DEFAULT_SHARD_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class StoredVersion:
    """A dataset folder as listed, before it is opened and verified."""

    digest: str
    path: Path
    name: str | None  # None when the manifest cannot even be read as JSON
    created_at: str


class DatasetStore:
    """Lists, resolves, writes and indexes dataset versions under one workspace."""

    def __init__(self, workspace: Workspace, *, shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
        self.workspace = workspace
        self.root = workspace.datasets
        self.shard_bytes = shard_bytes

    # -- reading -------------------------------------------------------------------------------------------

    def versions(self) -> list[StoredVersion]:
        """All dataset folders, newest first. Reads each manifest as JSON only; :meth:`open` verifies."""
        if not self.root.is_dir():
            return []
        found = []
        for path in self.root.iterdir():
            if path.name.startswith(".") or not path.is_dir():
                continue
            name, created = None, ""
            try:
                doc = json.loads((path / MANIFEST_NAME).read_text())
                name, created = str(doc.get("name")), str(doc.get("created_at", ""))
            except (OSError, ValueError, AttributeError):
                pass
            found.append(StoredVersion(digest=path.name, path=path, name=name, created_at=created))
        return sorted(found, key=lambda v: (v.created_at, v.digest), reverse=True)

    def resolve(self, ref: str) -> Path:
        """Resolve a dataset name (its newest version) or a digest prefix to a folder."""
        versions = self.versions()
        by_name = [v for v in versions if v.name == ref]
        if by_name:
            return by_name[0].path
        prefix = ref.removeprefix("sha256:").lower()
        if len(prefix) >= _MIN_PREFIX and all(ch in "0123456789abcdef" for ch in prefix):
            matches = [v for v in versions if v.digest.startswith(prefix)]
            if len(matches) == 1:
                return matches[0].path
            if len(matches) > 1:
                shown = ", ".join(v.digest[:12] for v in matches[:5])
                raise NotFoundError(f"digest prefix {ref!r} is ambiguous ({shown})", hint="give more characters")
        names = sorted({v.name for v in versions if v.name})
        known = f"known: {', '.join(names)}" if names else "the store is empty"
        raise NotFoundError(
            f"no dataset {ref!r} in {self.root} ({known})",
            hint="run 'distml data list', or ingest it with 'distml data ingest'",
        )

    # -- the re-ingest index ---------------------------------------------------------------------------------

    def lookup(self, source_key: str) -> Path | None:
        """The dataset folder a source fingerprint produced before, if it is still there."""
        try:
            doc = json.loads((self.root / ".index" / f"{source_key}.json").read_text())
        except (OSError, ValueError):
            return None
        folder = self.root / str(doc.get("digest", ""))
        return folder if doc.get("digest") and (folder / MANIFEST_NAME).is_file() else None

    def remember(self, source_key: str, manifest: Manifest) -> None:
        index = self.root / ".index"
        index.mkdir(exist_ok=True)
        write_atomic(index / f"{source_key}.json", json.dumps({"digest": manifest.digest}).encode())

    # -- writing ---------------------------------------------------------------------------------------------

    def begin(self) -> DatasetWriter:
        """Start writing a new version; use as a context manager so a failure removes the temp folder."""
        self.workspace.ensure(self.root)
        self.remove_stale_temps()
        tmp = self.root / f"{_TMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        # The lock is taken before the temp folder exists and held until it is gone: while the writer lives
        # (on this host or another sharing the workspace) no cleaner can take it; the kernel drops it on SIGKILL.
        lock_fd = _lock(self._lock_path(tmp), blocking=True)
        try:
            tmp.mkdir()
        except OSError as exc:
            _unlock(self._lock_path(tmp), lock_fd)
            raise WorkspaceError(f"cannot create {tmp}: {exc.strerror}") from None
        return DatasetWriter(self, tmp, lock_fd)

    def _lock_path(self, tmp: Path) -> Path:
        locks = self.root / ".locks"
        locks.mkdir(exist_ok=True)
        return locks / f"{tmp.name}.lock"

    def remove_stale_temps(self) -> list[Path]:
        """Remove temp folders left by ingests that died (killed, crashed): those whose lock nobody holds."""
        removed = []
        for path in self.root.glob(f"{_TMP_PREFIX}*"):
            lock_path = self._lock_path(path)
            if lock_path.exists():
                fd = _lock(lock_path, blocking=False)
                if fd is None:
                    continue  # a live ingest
                shutil.rmtree(path, ignore_errors=True)
                _unlock(lock_path, fd)
            else:
                # No lock file: a temp folder from elsewhere; fall back to whether its pid lives on this host.
                pid_text = path.name[len(_TMP_PREFIX) :].split("-", 1)[0]
                if not pid_text.isdigit() or pid_alive(int(pid_text)):
                    continue
                shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        return removed


class DatasetWriter:
    """Writes shards into a temp folder, then :meth:`commit` publishes the version atomically."""

    def __init__(self, store: DatasetStore, tmp: Path, lock_fd: int | None) -> None:
        self.store = store
        self.tmp = tmp
        self._lock_fd = lock_fd
        self._splits: dict[str, list[ShardInfo]] = {}
        self._files: dict[str, dict[str, Any]] = {}
        self._stats: dict[str, list[float]] = {}
        self._image_shape: tuple[int, int, int] | None = None

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)
        _unlock(self.store._lock_path(self.tmp), self._lock_fd)
        self._lock_fd = None

    def add_split(self, split: str, images: np.ndarray, labels: np.ndarray) -> None:
        """Write one split as shards of at most ~``shard_bytes`` of images each."""
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 N x H x W x C, got {images.dtype} {images.shape}")
        if labels.shape != (len(images),):
            raise ValueError(f"labels shape {labels.shape} does not match {len(images)} images")
        shape = (images.shape[1], images.shape[2], images.shape[3])
        if self._image_shape not in (None, shape):
            raise ValueError(f"split {split} has image shape {shape}, others have {self._image_shape}")
        self._image_shape = shape
        labels = labels.astype(np.int64, copy=False)
        count = max(1, min(len(images), math.ceil(images.nbytes / self.store.shard_bytes)))
        bounds = np.linspace(0, len(images), count + 1).astype(np.int64)
        shards = []
        for i, (lo, hi) in enumerate(itertools.pairwise(bounds)):
            base = f"{split}-{i:05d}"
            shards.append(ShardInfo(f"{base}-images.npy", f"{base}-labels.npy", int(hi - lo)))
            self._write_npy(f"{base}-images.npy", images[lo:hi])
            self._write_npy(f"{base}-labels.npy", labels[lo:hi])
        self._splits[split] = shards
        if split == "train":
            self._stats = _channel_stats(images)

    def _write_npy(self, fname: str, array: np.ndarray) -> None:
        with (self.tmp / fname).open("wb") as fh:
            writer = HashingWriter(fh)
            np.lib.format.write_array(writer, np.ascontiguousarray(array), allow_pickle=False)
            fh.flush()
            os.fsync(fh.fileno())
        self._files[fname] = {"sha256": writer.hexdigest(), "bytes": writer.bytes_written}

    def commit(self, *, name: str, class_names: list[str], source: dict[str, Any]) -> Manifest:
        """Write the manifest and rename the folder into place. Returns the manifest of the published version."""
        if self._image_shape is None or "train" not in self._splits:
            raise ValueError("a dataset needs at least a train split")
        manifest = build_manifest(
            name=name,
            created_at=datetime.now(UTC).isoformat(timespec="microseconds"),  # orders versions
            class_names=class_names,
            image_shape=self._image_shape,
            splits=self._splits,
            files=self._files,
            source=source,
            stats=self._stats,
        )
        write_atomic(self.tmp / MANIFEST_NAME, manifest.to_json().encode())
        fsync_dir(self.tmp)
        final = self.store.root / manifest.digest
        if final.exists() and not _complete(final, manifest):
            # A damaged copy of this very version (files deleted or truncated by hand): replace it.
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.rename(self.tmp, final)
        except OSError:
            if not _complete(final, manifest):
                raise
            # The same content was published meanwhile (a concurrent ingest): keep that one.
            shutil.rmtree(self.tmp, ignore_errors=True)
        fsync_dir(self.store.root)
        return manifest


def _complete(folder: Path, manifest: Manifest) -> bool:
    """Whether ``folder`` holds this manifest's files at their recorded sizes (no hashing)."""
    if not (folder / MANIFEST_NAME).is_file():
        return False
    for fname, info in manifest.files.items():
        path = folder / fname
        if not path.is_file() or path.stat().st_size != info["bytes"]:
            return False
    return True


def _channel_stats(images: np.ndarray) -> dict[str, list[float]]:
    """Exact per-channel mean and std of pixels scaled to [0, 1], from a 256-bin histogram (fast, no floats)."""
    levels = np.arange(256, dtype=np.float64) / 255.0
    means, stds = [], []
    for c in range(images.shape[3]):
        hist = np.bincount(np.ascontiguousarray(images[..., c]).ravel(), minlength=256).astype(np.float64)
        total = hist.sum()
        mean = float((hist * levels).sum() / total) if total else 0.0
        var = float((hist * (levels - mean) ** 2).sum() / total) if total else 0.0
        means.append(round(mean, 6))
        stds.append(round(math.sqrt(var), 6))
    return {"mean": means, "std": stds}


def _lock(path: Path, *, blocking: bool) -> int | None:
    """Open ``path`` and take an exclusive flock on it; None if ``blocking`` is False and someone holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _unlock(path: Path, fd: int | None) -> None:
    if fd is None:
        return
    path.unlink(missing_ok=True)  # while still holding the lock, so nobody locks a file about to vanish
    os.close(fd)


def check_dataset_name(name: str) -> str:
    """Dataset names appear in paths, registry names and Kubernetes labels: keep them to a safe alphabet."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", name):
        raise UsageError(
            f"dataset name {name!r} is not allowed",
            hint="use 1-63 letters, digits, '-', '_' or '.', starting with a letter or digit",
        )
    return name
