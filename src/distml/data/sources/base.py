"""What every dataset source provides to the ingest step."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

Log = Callable[[str], None]


def no_log(message: str) -> None:
    """A :data:`Log` that says nothing."""


@dataclass
class SourceData:
    """A source converted to arrays: ``splits`` maps split name to (images N x H x W x C uint8, labels int64)."""

    class_names: list[str]
    splits: dict[str, tuple[np.ndarray, np.ndarray]]
    # Recorded in the manifest: the source kind, the parameters that shaped the arrays, the source checksums.
    # Nothing location-specific (paths, URLs), so the same bytes give the same digest wherever they came from.
    provenance: dict[str, Any]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason) left out by on_bad_file=skip


class Source(Protocol):
    """A dataset source. The ingest step calls ``prepare`` (locate or download and check the raw files),
    then ``fingerprint`` (cheap; identifies raw bytes + parameters), and only on an index miss, ``load``."""

    kind: str
    default_name: str

    def prepare(self, log: Log) -> None: ...

    def fingerprint(self) -> dict[str, Any]: ...

    def load(self, log: Log) -> SourceData: ...
