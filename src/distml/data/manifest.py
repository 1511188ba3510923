"""``manifest.json``: what a dataset version holds, and the content digest that names its folder.

The digest is the sha256 of the canonical JSON of every manifest field except ``digest`` itself and the
informational ``created_at``. Because the manifest lists the sha256 of every shard file, the digest covers the
data too: the same sources always give the same digest, and any hand edit of the manifest is detected on open.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from distml.errors import CorruptDatasetError

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
_UNHASHED = ("digest", "created_at")
# File names inside a dataset folder: plain names only, so a crafted manifest cannot point outside it.
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class ShardInfo:
    """One shard: an images file (N x H x W x C uint8) and a labels file (N int64), both ``.npy``."""

    images: str
    labels: str
    num_samples: int


@dataclass(frozen=True)
class SplitInfo:
    num_samples: int
    shards: tuple[ShardInfo, ...]


@dataclass(frozen=True)
class Manifest:
    """A parsed, digest-checked manifest. Build with :func:`build_manifest` or :func:`parse_manifest`."""

    name: str
    digest: str
    created_at: str
    class_names: tuple[str, ...]
    image_shape: tuple[int, int, int]
    splits: dict[str, SplitInfo]
    files: dict[str, dict[str, Any]]  # file name -> {"sha256": hex, "bytes": int}
    source: dict[str, Any]  # kind, params, and the checksums of the source files
    stats: dict[str, list[float]]  # per-channel mean/std of the train split, pixels scaled to [0, 1]
    raw: dict[str, Any]  # the JSON document as stored

    @property
    def short_digest(self) -> str:
        return self.digest[:12]

    def to_json(self) -> str:
        return json.dumps(self.raw, indent=2, sort_keys=True) + "\n"


def content_digest(doc: dict[str, Any]) -> str:
    hashed = {k: v for k, v in doc.items() if k not in _UNHASHED}
    canonical = json.dumps(hashed, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def build_manifest(
    *,
    name: str,
    created_at: str,
    class_names: list[str],
    image_shape: tuple[int, int, int],
    splits: dict[str, list[ShardInfo]],
    files: dict[str, dict[str, Any]],
    source: dict[str, Any],
    stats: dict[str, list[float]],
) -> Manifest:
    doc: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "name": name,
        "class_names": list(class_names),
        "image_shape": list(image_shape),
        "splits": {
            split: {
                "num_samples": sum(s.num_samples for s in shards),
                "shards": [{"images": s.images, "labels": s.labels, "num_samples": s.num_samples} for s in shards],
            }
            for split, shards in splits.items()
        },
        "files": files,
        "source": source,
        "stats": stats,
        "created_at": created_at,
    }
    doc["digest"] = content_digest(doc)
    return parse_manifest(doc, where="new manifest")


def parse_manifest(doc: Any, *, where: str) -> Manifest:
    """Validate a manifest document and check its digest; raise CorruptDatasetError naming what is wrong."""

    def bad(what: str) -> CorruptDatasetError:
        return CorruptDatasetError(
            f"{where}: {what}", hint="re-ingest the dataset; the store never edits a manifest in place"
        )

    if not isinstance(doc, dict):
        raise bad("manifest is not a JSON object")
    if doc.get("schema_version") != SCHEMA_VERSION:
        raise bad(f"unsupported schema_version {doc.get('schema_version')!r} (this distml reads {SCHEMA_VERSION})")
    if content_digest(doc) != doc.get("digest"):
        raise bad("manifest content does not match its digest (was it edited by hand?)")
    try:
        splits = {
            name: SplitInfo(
                num_samples=int(s["num_samples"]),
                shards=tuple(
                    ShardInfo(images=str(x["images"]), labels=str(x["labels"]), num_samples=int(x["num_samples"]))
                    for x in s["shards"]
                ),
            )
            for name, s in sorted(doc["splits"].items(), key=lambda kv: (kv[0] != "train", kv[0]))
        }
        h, w, c = (int(v) for v in doc["image_shape"])
        manifest = Manifest(
            name=str(doc["name"]),
            digest=str(doc["digest"]),
            created_at=str(doc.get("created_at", "")),
            class_names=tuple(str(c) for c in doc["class_names"]),
            image_shape=(h, w, c),
            splits=splits,
            files={str(k): dict(v) for k, v in doc["files"].items()},
            source=dict(doc["source"]),
            stats={k: [float(x) for x in v] for k, v in doc["stats"].items()},
            raw=doc,
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise bad(f"malformed manifest field: {exc}") from None
    for fname, info in manifest.files.items():
        if not _FILE_NAME.fullmatch(fname) or fname == MANIFEST_NAME:
            raise bad(f"file name {fname!r} is not a plain file name inside the dataset folder")
        if not (isinstance(info.get("sha256"), str) and _SHA256.fullmatch(info["sha256"])):
            raise bad(f"file {fname!r} has no valid sha256")
        if type(info.get("bytes")) is not int or info["bytes"] < 0:
            raise bad(f"file {fname!r} has no valid byte count")
    for split in manifest.splits.values():
        for shard in split.shards:
            for fname in (shard.images, shard.labels):
                if fname not in manifest.files:
                    raise bad(f"shard file {fname!r} is not listed in 'files'")
    return manifest
