"""The step cache: content-addressed entries that say why they exist, and why a step ran or hit.

A step's **key** hashes four things, kept apart so that a miss can be explained:

- ``code``: ``{module: sha256}`` of every distml module the step can run (:mod:`distml.pipeline.codever`);
- ``params``: its resolved parameters (what changes its output; not log intervals or thread counts);
- ``inputs``: the digests of what it reads (a dataset digest, the checkpoints of the runs it compares);
- ``libs``: the versions of the libraries that change its output (torch for training, onnx for export).

An entry, ``<home>/pipeline/cache/<step>/<key>.json``, is written only after the step succeeded (failures are
never cached), atomically. It records the four parts, the step's outputs, the sha256 of every output file, the
pipeline run that made it and how long it took. Before a hit is trusted its files are re-hashed (and the step
may check more, e.g. that the registry still holds the version); a hit that fails verification is a miss that
says why.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from distml.errors import PipelineError
from distml.files import sha256_file, write_atomic


@dataclass(frozen=True)
class KeyParts:
    step: str
    code: dict[str, str]
    params: dict[str, Any]
    inputs: dict[str, str]
    libs: dict[str, str | None]

    @property
    def key(self) -> str:
        doc = {"step": self.step, "code": self.code, "params": self.params, "inputs": self.inputs, "libs": self.libs}
        return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()

    def to_json(self) -> dict[str, Any]:
        return {"code": self.code, "params": self.params, "inputs": self.inputs, "libs": self.libs}


@dataclass
class Entry:
    """One successful execution of a step."""

    step: str
    key: str
    parts: dict[str, Any]
    outputs: dict[str, Any]
    files: dict[str, dict[str, Any]]  # label -> {"path": str, "sha256": str}
    run_id: str
    seconds: float
    created: float = field(default_factory=time.time)
    note: str = ""  # e.g. "resumed from the 3-epoch run of 1a2b…"

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "key": self.key,
            "parts": self.parts,
            "outputs": self.outputs,
            "files": self.files,
            "run_id": self.run_id,
            "seconds": self.seconds,
            "created": self.created,
            "note": self.note,
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Entry:
        return cls(
            **{k: doc[k] for k in ("step", "key", "parts", "outputs", "files", "run_id", "seconds")},
            created=doc.get("created", 0.0),
            note=doc.get("note", ""),
        )


def library_versions(names: tuple[str, ...]) -> dict[str, str | None]:
    """Installed versions of ``names`` (from package metadata: nothing is imported)."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def file_record(path: Path) -> dict[str, Any]:
    return {"path": str(path), "sha256": sha256_file(path), "bytes": path.stat().st_size}


def verify_files(files: dict[str, dict[str, Any]]) -> str | None:
    """``None`` when every recorded file is there with its sha256, else what is wrong with the first that is not."""
    for label, info in sorted(files.items()):
        path = Path(info["path"])
        if not path.is_file():
            return f"{label} {path} is missing"
        if path.stat().st_size != info.get("bytes", path.stat().st_size) or sha256_file(path) != info["sha256"]:
            return f"{label} {path} changed since it was cached"
    return None


def bookkeeping_error(what: str, path: Path, exc: OSError) -> PipelineError:
    """The one-line error for a failed write of the runner's own files (a cache entry, the run record)."""
    return PipelineError(
        f"cannot write {what} {path}: {exc.strerror or exc}",
        hint="free space on that file system, or fix its permissions, and run again",
    )


class StepCache:
    """The cache entries of every step, in ``<home>/pipeline/cache``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _folder(self, step: str) -> Path:
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in step)
        return self.root / safe

    def get(self, step: str, key: str) -> Entry | None:
        path = self._folder(step) / f"{key}.json"
        try:
            return Entry.from_json(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def entries(self, step: str) -> list[Entry]:
        """Every readable entry of ``step``, newest first."""
        out = []
        folder = self._folder(step)
        for path in folder.glob("*.json") if folder.is_dir() else []:
            try:
                out.append(Entry.from_json(json.loads(path.read_text())))
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return sorted(out, key=lambda e: e.created, reverse=True)

    def put(self, entry: Entry) -> None:
        """Write ``entry``, or raise :class:`PipelineError` naming the file and why (a full disk, permissions)."""
        folder = self._folder(entry.step)
        path = folder / f"{entry.key}.json"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            write_atomic(path, (json.dumps(entry.to_json(), indent=2) + "\n").encode())
        except OSError as exc:
            raise bookkeeping_error("the step cache entry", path, exc) from None

    def drop(self, step: str, key: str) -> None:
        (self._folder(step) / f"{key}.json").unlink(missing_ok=True)


def explain_miss(parts: KeyParts, previous: Entry | None) -> str:
    """Why a step whose key has no entry must run: what differs from its newest earlier entry."""
    if previous is None:
        return "no earlier run of this step"
    old = previous.parts
    reasons: list[str] = []
    for name in sorted(set(parts.params) | set(old.get("params", {}))):
        a, b = old.get("params", {}).get(name, "unset"), parts.params.get(name, "unset")
        if a != b:
            reasons.append(f"param {name} {_short(a)} → {_short(b)}")
    for name in sorted(set(parts.inputs) | set(old.get("inputs", {}))):
        a, b = old.get("inputs", {}).get(name), parts.inputs.get(name)
        if a != b:
            reasons.append(f"input {name} {_digest(a)} → {_digest(b)}")
    changed = sorted(
        m for m in set(parts.code) | set(old.get("code", {})) if old.get("code", {}).get(m) != parts.code.get(m)
    )
    if changed:
        shown = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
        reasons.append(f"code of {shown} changed")
    for name in sorted(set(parts.libs) | set(old.get("libs", {}))):
        a, b = old.get("libs", {}).get(name), parts.libs.get(name)
        if a != b:
            reasons.append(f"{name} {a} → {b}")
    return "; ".join(reasons) or "key scheme changed"


def _short(value: object) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:37] + "..."


def _digest(value: str | None) -> str:
    return "none" if value is None else f"{value[:8]}…"
