"""The ingest step: source -> verified arrays -> a new (or the existing) dataset version in the store."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field

from distml.data.manifest import SCHEMA_VERSION
from distml.data.reader import Dataset, open_path
from distml.data.sources.base import Log, Source, no_log
from distml.data.store import DatasetStore, check_dataset_name
from distml.errors import CorruptDatasetError

# Bump when the conversion of an existing source changes its output, so old index entries stop matching.
CONVERTER_VERSION = 1


@dataclass(frozen=True)
class IngestResult:
    dataset: Dataset
    reused: bool  # True when the same sources were ingested before and that version was reused
    seconds: float
    skipped: list[tuple[str, str]] = field(default_factory=list)


def ingest(source: Source, *, store: DatasetStore, name: str | None = None, log: Log = no_log) -> IngestResult:
    """Ingest ``source`` into ``store`` under ``name`` (default: the source's own name).

    Unchanged sources are recognised by a fingerprint of their raw bytes and parameters and not converted again.
    """
    start = time.perf_counter()
    name = check_dataset_name(name or source.default_name)
    store.workspace.ensure(store.root)
    source.prepare(log)
    key = _source_key(source, name, shard_bytes=store.shard_bytes)
    existing = store.lookup(key)
    if existing is not None:
        try:
            dataset = open_path(existing)
            skipped = [(str(rel), "skipped when first ingested") for rel in dataset.manifest.source.get("skipped", [])]
            return IngestResult(dataset, reused=True, seconds=time.perf_counter() - start, skipped=skipped)
        except CorruptDatasetError as exc:
            log(f"  the stored copy is damaged ({exc.message}); ingesting again")
            shutil.rmtree(existing, ignore_errors=True)
    data = source.load(log)
    log(f"  writing shards to {store.root}")
    with store.begin() as writer:
        for split, (images, labels) in data.splits.items():
            writer.add_split(split, images, labels)
        manifest = writer.commit(name=name, class_names=data.class_names, source=data.provenance)
    store.remember(key, manifest)
    dataset = open_path(store.root / manifest.digest)
    return IngestResult(dataset, reused=False, seconds=time.perf_counter() - start, skipped=data.skipped)


def _source_key(source: Source, name: str, *, shard_bytes: int) -> str:
    doc = {
        "shard_bytes": shard_bytes,  # the shard layout is part of the content (and the digest)
        "schema": SCHEMA_VERSION,
        "converter": CONVERTER_VERSION,
        "kind": source.kind,
        "name": name,
        "source": source.fingerprint(),
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()
