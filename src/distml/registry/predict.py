"""Batch prediction: ONNX Runtime over a dataset split or a folder of images, written to Parquet, JSONL or CSV.

Images go to the graph as they are stored (``uint8`` N x H x W x C, no Python per image), in cache-sized batches,
on all cores. Rows are read and written in chunks of ``CHUNK`` images, so memory stays flat for any input size;
the file appears under its name only when complete. Each row: ``id`` (sample index or relative path),
``prediction`` (class index), ``class_name``, ``probability`` (of that class) and, when known, ``label``.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from distml.errors import BadImageError, UsageError
from distml.registry.artifact import ModelArtifact, probabilities
from distml.workspace import Workspace

if TYPE_CHECKING:
    import pyarrow as pa

    from distml.config import ClusterConfig
    from distml.data.reader import Split

FORMATS = {".parquet": "parquet", ".jsonl": "jsonl", ".csv": "csv"}
# ONNX Runtime's batch. Small batches keep activations in cache: for the seed cnn on 2 cores, batch 128 ran at
# 272k images/s against 118k at batch 1024 (bench/predict.py, docs). Rows are read and written in larger chunks.
DEFAULT_BATCH = 128
CHUNK = 8192


@dataclass
class Batch:
    ids: list[str] | np.ndarray
    images: np.ndarray
    labels: np.ndarray | None


@dataclass
class PredictResult:
    out: Path
    images: int
    seconds: float
    accuracy: float | None
    skipped: list[str] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return self.images / max(self.seconds, 1e-9)


def dataset_batches(images: np.ndarray, labels: np.ndarray | None, batch: int) -> Iterator[Batch]:
    for start in range(0, len(images), batch):
        stop = min(len(images), start + batch)
        yield Batch(
            np.arange(start, stop),
            np.ascontiguousarray(images[start:stop]),
            None if labels is None else np.asarray(labels[start:stop]),
        )


def folder_batches(
    root: Path, shape: tuple[int, int, int], batch: int, on_bad_file: Literal["fail", "skip"], skipped: list[str]
) -> Iterator[Batch]:
    """Every PNG/JPEG under ``root`` (sorted), decoded to the model's input size, in batches."""
    from distml.data.sources.folder import IMAGE_SUFFIXES, FolderOptions, decode_image

    if not root.is_dir():
        raise UsageError(f"{root} is not a folder of images")
    h, w, c = shape
    options = FolderOptions(image_size=(h, w), mode="L" if c == 1 else "RGB")
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise UsageError(f"{root} holds no files")

    def decode(path: Path) -> np.ndarray | None:
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            error = f"{path}: not a PNG or JPEG file"
        else:
            try:
                return decode_image(path, options)
            except BadImageError as exc:
                error = exc.message
        if on_bad_file == "fail":
            raise BadImageError(error, hint="remove it, or pass --on-bad-file skip")
        skipped.append(error)
        return None

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # Pillow releases the GIL while decoding
        for start in range(0, len(files), batch):
            chunk = files[start : start + batch]
            decoded = list(pool.map(decode, chunk))
            kept = [(p, a) for p, a in zip(chunk, decoded, strict=True) if a is not None]
            if kept:
                ids = [p.relative_to(root).as_posix() for p, _ in kept]
                yield Batch(ids, np.stack([a for _, a in kept]), None)


def predict_source(
    workspace: Workspace,
    model: str,
    out: Path,
    *,
    dataset: str | None = None,
    split: str = "test",
    images: Path | None = None,
    batch: int = DEFAULT_BATCH,
    threads: int = 0,
    on_bad_file: Literal["fail", "skip"] = "fail",
    cluster: ClusterConfig | None = None,
    log: Callable[[str], None] | None = None,
) -> PredictResult:
    """``distml predict``: MODEL (a folder or ``models:/...``) over one split of ``dataset`` or the ``images`` folder.

    Exactly one of ``dataset`` and ``images``; the dataset's images must have the shape the model takes. With
    ``cluster.engine == "ray"`` the split is predicted on the Ray cluster (:mod:`distml.registry.ray_predict`)
    and ``out`` is a Parquet dataset (a folder); ``log`` hears where it ran.
    """
    from distml.registry.registry import resolve_model  # MLflow: only here, not when the server imports this module

    if (dataset is None) == (images is None):
        raise UsageError("give exactly one of --dataset and --images")
    on_ray = cluster is not None and cluster.engine == "ray"
    if on_ray:
        from distml.registry import ray_predict

        if images is not None:
            raise UsageError(
                "--ray predicts a stored dataset (--dataset), not a folder of images",
                hint="ingest it first (distml data ingest folder DIR) and pass --dataset, or leave out --ray",
            )
        ray_predict.check_out(out)
    artifact = resolve_model(model, workspace)
    skipped: list[str] = []
    if images is not None:
        batches = folder_batches(images, artifact.image_shape, CHUNK, on_bad_file, skipped)
        return predict(artifact, batches, out, batch=batch, threads=threads, skipped=skipped)
    assert dataset is not None
    part = open_split(workspace, dataset, split, artifact.image_shape)
    if on_ray:
        assert cluster is not None
        address = cluster.address or "auto"
        return ray_predict.predict_on_ray(artifact, part, out, address=address, batch=batch, threads=threads, log=log)
    arrays = part.arrays()
    batches = dataset_batches(arrays.images, arrays.labels, CHUNK)
    return predict(artifact, batches, out, total=len(arrays), batch=batch, threads=threads)


def open_split(workspace: Workspace, dataset: str, split: str, image_shape: tuple[int, int, int]) -> Split:
    """One split of a stored dataset, checked against the shape of the images a model takes."""
    from distml.data.reader import open_path
    from distml.data.store import DatasetStore

    ds = open_path(DatasetStore(workspace).resolve(dataset))
    if split not in ds.splits:
        raise UsageError(f"dataset {ds.name} has no split {split!r}", hint=f"splits: {', '.join(ds.splits)}")
    if tuple(ds.image_shape) != image_shape:
        raise UsageError(f"dataset {ds.name} has {ds.image_shape} images, the model takes {image_shape}")
    return ds.split(split)


def predict(
    model: ModelArtifact,
    batches: Iterator[Batch],
    out: Path,
    *,
    total: int | None = None,
    batch: int = DEFAULT_BATCH,
    threads: int = 0,
    progress: bool = True,
    skipped: list[str] | None = None,
) -> PredictResult:
    fmt = FORMATS.get(out.suffix.lower())
    if fmt is None:
        raise UsageError(f"cannot write {out.name}", hint=f"use one of {', '.join(FORMATS)}")
    session = model.session(threads=threads or len(os.sched_getaffinity(0)))
    names = np.array(model.class_names, dtype=object)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    writer = _Writer.open(fmt, tmp, model.class_names)
    done = correct = labelled = 0
    start = last = time.perf_counter()
    try:
        for b in batches:
            probs = probabilities(session, b.images, batch)
            pred = probs.argmax(1)
            writer.write(b.ids, pred, names[pred], probs[np.arange(len(pred)), pred], b.labels)
            done += len(pred)
            if b.labels is not None:
                correct += int((pred == b.labels).sum())
                labelled += len(pred)
            now = time.perf_counter()
            if progress and now - last > 1.0:
                of = f"/{total:,}" if total else ""
                print(f"  predicted {done:,}{of} images, {done / (now - start):,.0f} img/s", file=sys.stderr)
                last = now
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    seconds = time.perf_counter() - start
    return PredictResult(out, done, seconds, correct / labelled if labelled else None, list(skipped or []))


class _Writer:
    """Row batches to one file; a subclass per format."""

    @staticmethod
    def open(fmt: str, path: Path, class_names: list[str]) -> _Writer:
        if fmt == "parquet":
            return _ParquetWriter(path, class_names)
        return _JsonlWriter(path) if fmt == "jsonl" else _CsvWriter(path)

    def write(self, ids: Any, pred: np.ndarray, names: np.ndarray, prob: np.ndarray, labels: Any) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class _ParquetWriter(_Writer):
    def __init__(self, path: Path, class_names: list[str]) -> None:
        import pyarrow as pa

        self.path = path
        self.writer: Any = None
        self.class_names = pa.array(class_names, type=pa.string())

    def write(self, ids: Any, pred: np.ndarray, names: np.ndarray, prob: np.ndarray, labels: Any) -> None:
        import pyarrow.parquet as pq

        table = parquet_rows(ids, pred, prob, labels, self.class_names)
        if self.writer is None:
            self.writer = pq.ParquetWriter(str(self.path), table.schema)
        self.writer.write_table(table)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def parquet_rows(ids: Any, pred: np.ndarray, prob: np.ndarray, labels: Any, class_names: pa.Array) -> pa.Table:
    """Prediction rows as an Arrow table: the one schema of every Parquet output (local file or Ray dataset)."""
    import pyarrow as pa

    columns = {
        "id": pa.array(ids if isinstance(ids, list) else np.asarray(ids, dtype=np.int64)),
        "prediction": pa.array(pred.astype(np.int32)),
        # Dictionary-encoded: the class names once, then an index per row (no Python string per row).
        "class_name": pa.DictionaryArray.from_arrays(pa.array(pred.astype(np.int32)), class_names),
        "probability": pa.array(prob.astype(np.float32)),
    }
    if labels is not None:
        columns["label"] = pa.array(np.asarray(labels, dtype=np.int32))
    return pa.table(columns)


class _JsonlWriter(_Writer):
    def __init__(self, path: Path) -> None:
        self.f = path.open("w", encoding="utf-8")

    def write(self, ids: Any, pred: np.ndarray, names: np.ndarray, prob: np.ndarray, labels: Any) -> None:
        ids_list = ids if isinstance(ids, list) else np.asarray(ids).tolist()
        label_list = None if labels is None else np.asarray(labels).tolist()
        lines = []
        for i, (id_, p, n, q) in enumerate(zip(ids_list, pred.tolist(), names.tolist(), prob.tolist(), strict=True)):
            row: dict[str, Any] = {"id": id_, "prediction": p, "class_name": n, "probability": round(q, 6)}
            if label_list is not None:
                row["label"] = label_list[i]
            lines.append(json.dumps(row))
        self.f.write("\n".join(lines) + "\n")

    def close(self) -> None:
        if not self.f.closed:
            self.f.close()


class _CsvWriter(_Writer):
    def __init__(self, path: Path) -> None:
        self.f = path.open("w", encoding="utf-8", newline="")
        self.csv = csv.writer(self.f)
        self.header_written = False

    def write(self, ids: Any, pred: np.ndarray, names: np.ndarray, prob: np.ndarray, labels: Any) -> None:
        if not self.header_written:
            self.csv.writerow(
                ["id", "prediction", "class_name", "probability", *(["label"] if labels is not None else [])]
            )
            self.header_written = True
        ids_list = ids if isinstance(ids, list) else np.asarray(ids).tolist()
        cols = [ids_list, pred.tolist(), names.tolist(), [f"{q:.6f}" for q in prob.tolist()]]
        if labels is not None:
            cols.append(np.asarray(labels).tolist())
        self.csv.writerows(zip(*cols, strict=True))

    def close(self) -> None:
        if not self.f.closed:
            self.f.close()
