"""What ``distml data list``, ``show`` and ``verify`` print: the store's versions and one dataset, as text lines."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from distml.data.reader import Dataset, open_path
from distml.data.store import DatasetStore
from distml.errors import CorruptDatasetError


def listing(store: DatasetStore) -> list[str]:
    """One row per dataset version in the store, newest first, under a header; damaged versions say so."""
    rows = [("NAME", "DIGEST", "SHAPE", "CLASSES", "SPLITS", "SIZE", "CREATED", "STATUS")]
    for v in store.versions():
        try:
            ds = open_path(v.path)
        except CorruptDatasetError as exc:
            rows.append((v.name or "?", v.digest[:12], "", "", "", "", v.created_at, f"damaged: {exc.message}"))
            continue
        m = ds.manifest
        splits = " ".join(f"{k}={s.num_samples}" for k, s in m.splits.items())
        rows.append((m.name, m.short_digest, shape(ds), str(ds.num_classes), splits, size(ds), m.created_at, "ok"))
    return table(rows) if len(rows) > 1 else []


def describe(ds: Dataset) -> list[str]:
    """A dataset's identity, source, image format, pixel statistics, splits and per-class counts."""
    m = ds.manifest
    lines = [
        f"dataset   {m.name}",
        f"digest    {m.digest}",
        f"path      {ds.path}",
        f"created   {m.created_at}",
        f"source    {m.source.get('kind')}",
        f"images    {shape(ds)} uint8, {size(ds)} on disk",
        f"pixels    mean {_floats(m.stats.get('mean'))}, std {_floats(m.stats.get('std'))} (train, [0, 1])",
    ]
    lines += [f"{name:<9} {len(s)} samples in {len(s.info.shards)} shard(s)" for name, s in ds.splits.items()]
    counts = {name: _class_counts(ds, name) for name in ds.splits}
    rows: list[tuple[str, ...]] = [("", "CLASS", *(s.upper() for s in counts))]
    rows += [(str(i), cls, *(str(c[i]) for c in counts.values())) for i, cls in enumerate(ds.class_names)]
    return lines + table(rows, indent="  ")


def verify(ds: Dataset, log: Callable[[str], None]) -> str:
    """Re-hash every file of ``ds`` against its manifest, logging each; the line that says all match.

    Raises :class:`CorruptDatasetError` naming the files that do not.
    """
    bad = ds.verify(progress=lambda fname, ok: log(f"  {'ok ' if ok else 'BAD'} {fname}"))
    label = f"{ds.name}@{ds.manifest.short_digest}"
    if bad:
        problem = f"{label}: {len(bad)} file(s) do not match the manifest: {', '.join(bad)}"
        raise CorruptDatasetError(problem, hint="re-ingest the dataset")
    return f"{label}: all {len(ds.manifest.files)} files match the manifest"


def brief(ds: Dataset) -> str:
    """``60000 train / 10000 test, 28x28x1, 10 classes``."""
    splits = " / ".join(f"{s.num_samples} {k}" for k, s in ds.manifest.splits.items())
    return f"{splits}, {shape(ds)}, {ds.num_classes} classes"


def shape(ds: Dataset) -> str:
    return "x".join(str(v) for v in ds.image_shape)


def size(ds: Dataset) -> str:
    total = sum(int(f["bytes"]) for f in ds.manifest.files.values())
    return f"{total / 1e6:.1f} MB"


def table(rows: Sequence[Sequence[str]], indent: str = "") -> list[str]:
    """Rows as left-aligned columns two spaces apart."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]


def _floats(values: Sequence[float] | None) -> str:
    return "[" + ", ".join(f"{v:.4f}" for v in values or []) + "]"


def _class_counts(ds: Dataset, split: str) -> list[int]:
    labels = ds.split(split).arrays().labels
    return [int(n) for n in np.bincount(np.asarray(labels), minlength=ds.num_classes)]
