"""The workspace: one folder (``DISTML_HOME``, default ``./.distml``) that holds everything distml writes.

Layout (later stages add their own folders)::

    <home>/datasets/<digest>/      one folder per dataset version (see distml.data.store)
    <home>/datasets/.tmp-*/        ingests in progress; never visible as datasets
    <home>/datasets/.index/        source-checksum -> digest, so a re-ingest is a no-op
    <home>/downloads/<dataset>/    verified source files fetched from mirrors
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from distml.errors import WorkspaceError


@dataclass(frozen=True)
class Workspace:
    """Paths inside the workspace. Creating one touches nothing; :meth:`ensure` creates and checks the folder."""

    home: Path

    @property
    def datasets(self) -> Path:
        return self.home / "datasets"

    @property
    def downloads(self) -> Path:
        return self.home / "downloads"

    def ensure(self, sub: Path | None = None) -> Path:
        """Create ``sub`` (default: the home) if needed and prove it is writable, or raise WorkspaceError."""
        target = sub or self.home
        try:
            target.mkdir(parents=True, exist_ok=True)
            # Root ignores permission bits, so probe with a real write rather than os.access().
            with tempfile.NamedTemporaryFile(dir=target, prefix=".probe-"):
                pass
        except OSError as exc:
            raise WorkspaceError(
                f"workspace folder {target} is not writable: {exc.strerror or exc}",
                hint="pass --home DIR or set DISTML_HOME to a writable folder",
            ) from None
        return target


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file inside ``path`` durable (POSIX requires syncing the directory)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
