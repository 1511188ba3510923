"""Reading a stored dataset: ``open_dataset(ref).split("train").shard(rank, world_size)``.

Opening checks the manifest's digest and every file's presence and size (cheap: no file is read);
:meth:`Dataset.verify` re-hashes every file. Shards are ``.npy`` files loaded memory-mapped with
``allow_pickle=False``; a rank's slice touches only the shard files it overlaps.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from distml.data.manifest import MANIFEST_NAME, Manifest, ShardInfo, SplitInfo, parse_manifest
from distml.data.store import DatasetStore
from distml.errors import CorruptDatasetError, NotFoundError
from distml.files import sha256_file
from distml.workspace import Workspace

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Arrays:
    """Images (N x H x W x C ``uint8``) and labels (N ``int64``) of a split or of a rank's part of one."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


class Split:
    """One split (``train`` or ``test``) of a dataset version."""

    def __init__(self, dataset: Dataset, name: str, info: SplitInfo) -> None:
        self.dataset = dataset
        self.name = name
        self.info = info
        starts = np.cumsum([0] + [s.num_samples for s in info.shards])
        self._starts = starts  # shard i holds samples [starts[i], starts[i+1])

    def __len__(self) -> int:
        return self.info.num_samples

    def __repr__(self) -> str:
        return f"Split({self.dataset.name}@{self.dataset.manifest.short_digest}:{self.name}, n={len(self)})"

    def shard(self, rank: int, world_size: int) -> Arrays:
        """The contiguous part of this split that belongs to ``rank`` of ``world_size``.

        Parts differ in size by at most one sample. Only the shard files that overlap the part are opened; when
        the part lies inside one file the result is a memory-mapped view (nothing read until touched).
        """
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        n = len(self)
        return self._range(rank * n // world_size, (rank + 1) * n // world_size)

    def arrays(self) -> Arrays:
        """The whole split (memory-mapped when it is a single shard)."""
        return self._range(0, len(self))

    def to_torch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole split as one ``uint8`` image tensor and one ``int64`` label tensor.

        With a single shard the tensors share the memory map (copy-on-write: no copy, no disk writes); with several,
        each shard is copied once, straight into the tensor's own storage (no intermediate arrays).
        """
        import torch

        if len(self.info.shards) == 1:
            shard = self.info.shards[0]
            images = self.dataset._load(shard.images, self._image_spec(shard), mode="c")
            labels = self.dataset._load(shard.labels, self._label_spec(shard), mode="c")
            return torch.from_numpy(images), torch.from_numpy(labels)
        h, w, c = self.dataset.image_shape
        images_t = torch.empty((len(self), h, w, c), dtype=torch.uint8)
        labels_t = torch.empty((len(self),), dtype=torch.int64)
        self._copy_into(0, len(self), images_t.numpy(), labels_t.numpy())
        return images_t, labels_t

    def _image_spec(self, shard: ShardInfo) -> tuple[tuple[int, ...], np.dtype[np.uint8]]:
        return (shard.num_samples, *self.dataset.image_shape), np.dtype(np.uint8)

    def _label_spec(self, shard: ShardInfo) -> tuple[tuple[int, ...], np.dtype[np.int64]]:
        return (shard.num_samples,), np.dtype(np.int64)

    def _overlapping(self, lo: int, hi: int) -> list[tuple[ShardInfo, int, int, int]]:
        """(shard, start inside shard, stop inside shard, offset in the output) for shards overlapping [lo, hi)."""
        parts = []
        out = 0
        for i, shard in enumerate(self.info.shards):
            s0, s1 = int(self._starts[i]), int(self._starts[i + 1])
            a, b = max(lo, s0), min(hi, s1)
            if a < b:
                parts.append((shard, a - s0, b - s0, out))
                out += b - a
        return parts

    def _range(self, lo: int, hi: int) -> Arrays:
        parts = self._overlapping(lo, hi)
        if len(parts) == 1:
            shard, a, b, _ = parts[0]
            images = self.dataset._load(shard.images, self._image_spec(shard))
            labels = self.dataset._load(shard.labels, self._label_spec(shard))
            return Arrays(images[a:b], labels[a:b])
        h, w, c = self.dataset.image_shape
        images_out = np.empty((hi - lo, h, w, c), dtype=np.uint8)
        labels_out = np.empty((hi - lo,), dtype=np.int64)
        self._copy_into(lo, hi, images_out, labels_out)
        return Arrays(images_out, labels_out)

    def _copy_into(self, lo: int, hi: int, images_out: np.ndarray, labels_out: np.ndarray) -> None:
        for shard, a, b, out in self._overlapping(lo, hi):
            images = self.dataset._load(shard.images, self._image_spec(shard))
            labels = self.dataset._load(shard.labels, self._label_spec(shard))
            images_out[out : out + b - a] = images[a:b]
            labels_out[out : out + b - a] = labels[a:b]


class Dataset:
    """An opened, cheaply verified dataset version."""

    def __init__(self, path: Path, manifest: Manifest) -> None:
        self.path = path
        self.manifest = manifest

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def digest(self) -> str:
        return self.manifest.digest

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.manifest.class_names

    @property
    def num_classes(self) -> int:
        return len(self.manifest.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.manifest.image_shape

    @cached_property
    def splits(self) -> dict[str, Split]:
        return {name: Split(self, name, info) for name, info in self.manifest.splits.items()}

    def split(self, name: str) -> Split:
        try:
            return self.splits[name]
        except KeyError:
            raise NotFoundError(
                f"dataset {self.name} has no split {name!r}", hint=f"splits: {', '.join(self.splits)}"
            ) from None

    def __repr__(self) -> str:
        return f"Dataset({self.name}@{self.manifest.short_digest})"

    def verify(self, progress: Callable[[str, bool], None] | None = None) -> list[str]:
        """Re-hash every file against the manifest. Returns the names of files that do not match."""
        bad = []
        for fname, info in sorted(self.manifest.files.items()):
            path = self.path / fname
            ok = path.is_file() and path.stat().st_size == info["bytes"] and sha256_file(path) == info["sha256"]
            if not ok:
                bad.append(fname)
            if progress:
                progress(fname, ok)
        return bad

    def _load(
        self, fname: str, spec: tuple[tuple[int, ...], np.dtype[np.generic]], mode: Literal["r", "c"] = "r"
    ) -> np.ndarray:
        shape, dtype = spec
        path = self.path / fname
        try:
            array: np.ndarray = np.load(path, mmap_mode=mode, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise CorruptDatasetError(
                f"dataset {self.name}: shard {fname} cannot be read ({exc})", hint="re-ingest the dataset"
            ) from None
        if array.shape != shape or array.dtype != dtype:
            raise CorruptDatasetError(
                f"dataset {self.name}: shard {fname} is {array.dtype}{list(array.shape)}, "
                f"the manifest says {dtype}{list(shape)}",
                hint="re-ingest the dataset",
            )
        return array


def open_path(path: Path) -> Dataset:
    """Open a dataset folder: check the manifest digest and each file's presence and size."""
    try:
        doc = json.loads((path / MANIFEST_NAME).read_text())
    except FileNotFoundError:
        raise CorruptDatasetError(f"{path} has no {MANIFEST_NAME}", hint="re-ingest the dataset") from None
    except (OSError, ValueError) as exc:
        raise CorruptDatasetError(f"{path / MANIFEST_NAME} is not readable JSON: {exc}") from None
    manifest = parse_manifest(doc, where=str(path / MANIFEST_NAME))
    if path.name != manifest.digest:
        raise CorruptDatasetError(
            f"{path}: folder name does not match the manifest digest {manifest.short_digest}",
            hint="dataset folders must not be renamed; re-ingest the dataset",
        )
    for fname, info in manifest.files.items():
        file = path / fname
        if file.is_symlink():
            raise CorruptDatasetError(
                f"dataset {manifest.name}@{manifest.short_digest}: {fname} is a symbolic link",
                hint="the store holds only regular files; re-ingest the dataset",
            )
        size = file.stat().st_size if file.is_file() else None
        if size != info["bytes"]:
            what = "is missing" if size is None else f"has {size} bytes, the manifest says {info['bytes']}"
            raise CorruptDatasetError(
                f"dataset {manifest.name}@{manifest.short_digest}: {fname} {what}",
                hint="the store was changed on disk; re-ingest the dataset",
            )
    return Dataset(path, manifest)


def open_dataset(ref: str, *, home: Path | str | None = None) -> Dataset:
    """Open a dataset by name (its newest version) or digest prefix.

    ``home`` defaults to the workspace of the environment (``DISTML_HOME`` or ``./.distml``).
    """
    if home is None:
        from distml.config import load_config

        home = load_config().workspace.home
    return open_path(DatasetStore(Workspace(Path(home))).resolve(ref))
