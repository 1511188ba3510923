"""``distml predict --ray``: batch prediction over a stored split on a Ray cluster, with Ray Data.

- **Read.** The split is a Ray dataset (a :class:`~ray.data.Datasource`) whose read tasks each open one contiguous
  part of it (:meth:`~distml.data.reader.Split.shard`: only the shard files that part overlaps, memory-mapped).
  The driver sends the tasks a path and bounds, never images.
- **Predict.** ONNX Runtime runs in ``map_batches`` actors (:class:`OnnxPredictor`), each building its session
  once. An actor takes ``threads`` CPUs (1 by default); there are as many as the cluster's nodes can hold. The
  read tasks ask for the same CPUs, so Ray Data fuses each into an actor: a part is read where it is predicted.
- **Write.** The actor writes each part's rows itself, to ``part-<first id>.parquet`` (12 digits) in the output
  folder, with the columns and types of the local command's Parquet file
  (:func:`~distml.registry.predict.parquet_rows`). ``out`` is one Parquet dataset: read in file-name order, it
  holds the local command's rows in the local command's order. The folder appears under its name only when
  complete; a previous prediction folder of that name is replaced.

The model is verified on the driver as locally (the sha256 its card records). The actors receive the verified
graph's bytes, not a path, so the nodes need not see the model folder; they check the hash again. The dataset's
shards and the output folder must be on storage every node sees, as the workspace is for training: a node that
cannot read a shard fails the command naming the node, and files written where the driver cannot see them are
caught by looking for each.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from distml.errors import ClusterError, DistmlError, ModelError, UsageError
from distml.registry.artifact import ModelArtifact, probabilities
from distml.registry.predict import CHUNK, PredictResult, parquet_rows

if TYPE_CHECKING:
    from ray.data import Datasource
    from ray.data.block import Block

    from distml.data.reader import Split

PART = "part-{:012d}.parquet"  # by the first row's id: name order is row order
_NOT_PARQUET = (".jsonl", ".csv")
PART_BYTES = 64 << 20  # half of Ray Data's largest block (DataContext.target_max_block_size)


@dataclass(frozen=True)
class Part:
    """What one read task reads: part ``index`` of ``parts`` of a split, samples ``start`` to ``stop``."""

    dataset: Path
    split: str
    index: int
    parts: int
    start: int
    stop: int


def split_parts(dataset: Path, split: str, samples: int, parts: int) -> list[Part]:
    """``parts`` contiguous parts of a split, with the bounds :meth:`Split.shard` gives ranks of a world that size."""
    return [
        Part(dataset, split, i, parts, i * samples // parts, (i + 1) * samples // parts)
        for i in range(parts)
        if (i + 1) * samples // parts > i * samples // parts
    ]


def read_part(part: Part) -> Iterator[dict[str, np.ndarray]]:
    """A part's rows in batches of at most ``CHUNK`` (``id``, ``image``, ``label``): runs on a node of the cluster.

    The node opens the dataset itself (the manifest's digest, every file's size), so a store it does not see, or
    sees changed, fails here with the node's address.
    """
    from distml.data.reader import open_path

    try:
        arrays = open_path(part.dataset).split(part.split).shard(part.index, part.parts)
    except (DistmlError, OSError) as exc:
        raise ClusterError(
            f"node {_node_ip()} cannot read the dataset at {part.dataset}: {exc}",
            hint="the workspace must be on storage every node of the cluster sees",
        ) from None
    if len(arrays) != part.stop - part.start:  # the driver's bounds and the reader's disagree: never expected
        raise ClusterError(
            f"node {_node_ip()} read {len(arrays)} samples of part {part.index}, not {part.stop - part.start}"
        )
    for a in range(0, len(arrays), CHUNK):
        b = min(len(arrays), a + CHUNK)
        yield {
            "id": np.arange(part.start + a, part.start + b, dtype=np.int64),
            "image": np.ascontiguousarray(arrays.images[a:b]),
            "label": np.asarray(arrays.labels[a:b]),
        }


def read_blocks(part: Part) -> Iterator[Block]:
    """:func:`read_part` as Ray Data blocks (Arrow tables; the images a tensor column)."""
    from ray.data.block import BlockAccessor

    for rows in read_part(part):
        yield BlockAccessor.batch_to_block(rows)


class OnnxPredictor:
    """A ``map_batches`` actor: one ONNX Runtime session for its lifetime; a part's rows in, its Parquet file out."""

    def __init__(
        self, graph: bytes, sha256: str, class_names: list[str], threads: int, batch: int, folder: str
    ) -> None:
        import onnxruntime as ort
        import pyarrow as pa

        if hashlib.sha256(graph).hexdigest() != sha256:  # what arrived is not what the driver verified
            raise ModelError(f"node {_node_ip()} received a model graph whose sha256 is not {sha256[:12]}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph types; any failure means unusable
            raise ModelError(f"node {_node_ip()}: ONNX Runtime cannot load the model: {exc}") from None
        self.class_names = pa.array(class_names, type=pa.string())
        self.batch = batch
        self.folder = Path(folder)

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Predict and write one block of rows (ids in order); what was written, for the driver to check."""
        import pyarrow.parquet as pq

        probs = probabilities(self.session, rows["image"], self.batch)
        pred = probs.argmax(1)
        table = parquet_rows(rows["id"], pred, probs[np.arange(len(pred)), pred], rows["label"], self.class_names)
        # Named by its first row, so the same block gives the same file: a retried task (after an actor was
        # lost) writes it again whole. Written beside, then renamed: no reader sees half a file.
        name = PART.format(int(rows["id"][0]))
        partial = self.folder / f".{name}.{os.getpid()}"
        pq.write_table(table, partial)
        partial.rename(self.folder / name)
        return {
            "file": np.array([name]),
            "rows": np.array([len(pred)]),
            "correct": np.array([int((pred == rows["label"]).sum())]),
        }


def check_out(out: Path) -> None:
    """Refuse an ``--out`` that cannot become the prediction folder, before anything runs."""
    if out.suffix.lower() in _NOT_PARQUET:
        raise UsageError(
            f"--ray writes a Parquet dataset (a folder), not {out.name}", hint="name a folder, e.g. preds.parquet"
        )
    if out.exists() and not _is_prediction_folder(out):
        raise UsageError(
            f"{out} exists and is not a prediction folder (part-*.parquet files) that could be replaced",
            hint="remove it or choose another --out",
        )


def predict_on_ray(
    artifact: ModelArtifact,
    split: Split,
    out: Path,
    *,
    address: str,
    batch: int,
    threads: int = 0,
    log: Callable[[str], None] | None = None,
) -> PredictResult:
    """Predict every sample of ``split`` on the Ray cluster at ``address``; the rows go to the folder ``out``.

    ``threads``: ONNX Runtime threads (and CPUs) per actor, 0 for 1. Returns what the local command returns:
    images, seconds (reading, predicting and writing, not connecting), accuracy.
    """
    from distml.cluster import connect, nodes, require_ray

    require_ray()  # without Ray: one line saying how to install it, not an ImportError
    import ray

    check_out(out)
    if len(split) == 0:
        raise UsageError(f"split {split.name!r} of dataset {split.dataset.name} holds no images")
    graph = artifact.onnx_path.read_bytes()
    digest = hashlib.sha256(graph).hexdigest()
    if digest != artifact.card.onnx_sha256:  # replaced since the driver opened it
        raise ModelError(f"{artifact.onnx_path} changed while it was being read", hint="run the command again")
    connect(address)
    per_actor = threads or 1
    cluster = nodes()
    actors = sum(int(n.cpus // per_actor) for n in cluster)
    if actors < 1:
        most = max((n.cpus for n in cluster), default=0.0)
        raise UsageError(
            f"--threads {per_actor}: no node of the cluster at {address} has that many CPUs (at most {most:g})"
        )
    # Enough parts to keep every actor busy, none larger than the local command's chunk or PART_BYTES, never
    # more than the images: Ray Data then reads each part as one block and fuses the read into the actors (a
    # block over its size limit would be split, and the split read would wait for CPUs the actors hold).
    n, row_bytes = len(split), int(np.prod(split.dataset.image_shape)) + 16
    count = min(n, max(2 * actors, -(-n // CHUNK), -(-n * row_bytes // PART_BYTES)))
    # The nodes run in other folders: every path they get is absolute.
    parts = split_parts(split.dataset.path.resolve(), split.name, n, count)
    if log:
        where = f"{actors} actors x {per_actor} thread(s) on {len(cluster)} node(s)"
        log(f"predicting on the Ray cluster at {address}: {where}, {len(parts)} read tasks")
    _quiet()
    tmp = out.resolve().with_name(f".{out.name}.tmp-{os.getpid()}")
    start = time.perf_counter()
    try:
        tmp.mkdir(parents=True)  # as locally, the folders above --out are made
        ds = ray.data.read_datasource(
            _datasource(parts, row_bytes),
            override_num_blocks=len(parts),
            num_cpus=per_actor,  # as the actors: Ray Data fuses the read into them (no task of its own waits)
        )
        written = ds.map_batches(
            OnnxPredictor,
            fn_constructor_args=(graph, digest, artifact.class_names, per_actor, batch, str(tmp)),
            batch_size=None,  # a part's block whole, ids in order (a batch size would also prevent the fusion)
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=per_actor,
        ).take_all()
        images, correct = _check(tmp, written, len(split))
        _replace(tmp, out)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _user_error(exc) from None
    seconds = time.perf_counter() - start
    return PredictResult(out, images, seconds, correct / images if images else None)


def _datasource(parts: list[Part], row_bytes: int) -> Datasource:
    """The parts as a Ray Data source, a read task each (Ray is imported here, not when this module is)."""
    from ray.data import DataContext, Datasource, ReadTask
    from ray.data.block import BlockMetadata

    samples = sum(p.stop - p.start for p in parts)

    def _metadata(rows: int) -> BlockMetadata:
        return BlockMetadata(num_rows=rows, size_bytes=rows * row_bytes, exec_stats=None, input_files=None)

    class StoreSplit(Datasource):
        def estimate_inmemory_data_size(self) -> int:
            return samples * row_bytes

        def get_read_tasks(
            self, parallelism: int, per_task_row_limit: int | None = None, data_context: DataContext | None = None
        ) -> list[ReadTask]:
            return [
                ReadTask(
                    functools.partial(read_blocks, p),
                    _metadata(p.stop - p.start),
                    per_task_row_limit=per_task_row_limit,
                )
                for p in parts
            ]

    return StoreSplit()  # type: ignore[no-untyped-call]  # Datasource.__init__ has no annotations


def _check(folder: Path, written: list[dict[str, Any]], expected: int) -> tuple[int, int]:
    """The images and correct predictions the actors report, once each file they wrote is seen here.

    A file the actors wrote but this machine does not see means the output folder is not on shared storage.
    """
    import pyarrow.parquet as pq

    rows = correct = 0
    for entry in written:
        path = folder / str(entry["file"])
        if not path.is_file() or pq.ParquetFile(path).metadata.num_rows != int(entry["rows"]):
            raise ClusterError(
                f"the cluster wrote {path.name} but this machine does not see it in {folder}",
                hint="--out must be on storage every node of the cluster sees",
            )
        rows += int(entry["rows"])
        correct += int(entry["correct"])
    if rows != expected:  # never expected: every part's rows are written once
        raise ClusterError(f"the cluster predicted {rows:,} images of {expected:,}")
    return rows, correct


def _replace(tmp: Path, out: Path) -> None:
    """Move the finished folder to ``out``; a previous prediction folder there goes only once the new one is in."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def _is_prediction_folder(path: Path) -> bool:
    if not path.is_dir() or path.is_symlink():
        return False
    names = [p.name for p in path.iterdir()]
    return all(n.startswith("part-") and n.endswith(".parquet") for n in names)


def _user_error(exc: BaseException) -> BaseException:
    """What to show for an error of the Ray job: the distml error a node raised, else Ray's, on one line."""
    from ray.exceptions import RayError

    cause = _distml_cause(exc)
    if cause is not None:
        return cause
    if isinstance(exc, RayError):  # the cluster failed (a node lost, an object lost): not a bug here
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return ClusterError(f"the Ray job failed: {first}", hint="the Ray logs of the cluster have the details")
    return exc


def _distml_cause(exc: BaseException) -> DistmlError | None:
    """The distml error a remote task or actor raised, from the wrappers Ray and Ray Data put around it."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, DistmlError):
            # A RayTaskError re-made as a subclass of the error carries Ray's traceback in its text; the original
            # is its ``cause``.
            original = getattr(e, "cause", None)
            return original if isinstance(original, DistmlError) else e
        cause = getattr(e, "cause", None)
        todo += [cause if isinstance(cause, BaseException) else None, e.__cause__, e.__context__]
    return None


def _quiet() -> None:
    """No progress bars or banners on the command's output (it prints its own lines); a task's own errors."""
    import logging

    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    # Ray Data re-raises a failed map's error as "UDF failed to process a data block" (the original only in the
    # text); this keeps the original, a distml error with its message, which the driver then shows.
    ctx.raise_original_map_exception = True
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # its warnings are about itself (progress bars off)


def _node_ip() -> str:
    import ray.util

    return str(ray.util.get_node_ip_address())  # type: ignore[no-untyped-call]
