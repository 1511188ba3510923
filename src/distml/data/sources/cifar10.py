"""CIFAR-10, binary distribution (``cifar-10-binary.tar.gz``): fixed-size records, no pickle anywhere.

Each ``.bin`` file holds 10,000 records of 1 label byte + 3,072 pixel bytes (1,024 red, then green, then blue,
each 32 x 32 row-major). The archive is verified by its published MD5 and read member by member, never extracted.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from distml.data.sources.base import Log, SourceData
from distml.data.sources.fetch import download, find_local, is_url
from distml.data.sources.safetar import TarLimits, iter_regular_files
from distml.errors import ChecksumError, FormatError

ARCHIVE = "cifar-10-binary.tar.gz"
MIRRORS = ("https://www.cs.toronto.edu/~kriz",)
_SIDE = 32
_RECORD = 1 + 3 * _SIDE * _SIDE


@dataclass(frozen=True)
class Cifar10Spec:
    archive: str = ARCHIVE
    md5: str = "c32a1d4ab5d03f1284b67883e8d87530"  # published on the CIFAR-10 page
    train_files: tuple[str, ...] = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
    test_files: tuple[str, ...] = ("test_batch.bin",)
    meta_file: str = "batches.meta.txt"
    max_archive_bytes: int = 256 * 1024 * 1024  # the real archive is 162 MiB
    limits: TarLimits = field(default_factory=lambda: TarLimits(max_members=64, max_member_bytes=64 * 1024 * 1024))


CIFAR10 = Cifar10Spec()


@dataclass
class Cifar10Source:
    downloads: Path
    location: str | None = None
    mirrors: tuple[str, ...] = MIRRORS
    spec: Cifar10Spec = CIFAR10
    timeout_s: float = 120.0
    kind: str = "cifar10"
    default_name: str = "cifar10"
    _archive: Path | None = field(default=None, init=False, repr=False)
    _checksums: dict[str, str] = field(default_factory=dict, init=False, repr=False)

    def prepare(self, log: Log) -> None:
        if self.location and not is_url(self.location):
            self._archive = find_local(Path(self.location), [self.spec.archive], dataset=self.kind)[self.spec.archive]
        else:
            mirrors = (self.location,) if self.location else self.mirrors
            self._archive = download(
                [self.spec.archive],
                mirrors=mirrors,
                dest=self.downloads,
                verify=self._verify_download,
                log=log,
                timeout_s=self.timeout_s,
                dataset=self.kind,
                max_bytes=self.spec.max_archive_bytes,
            )[self.spec.archive]
        self._checksums = self._verify(self._archive)

    def fingerprint(self) -> dict[str, Any]:
        return {"archive": self._checksums}

    def load(self, log: Log) -> SourceData:
        assert self._archive is not None, "prepare() first"
        wanted = {*self.spec.train_files, *self.spec.test_files, self.spec.meta_file}
        contents: dict[str, bytes] = {}
        log(f"  reading {self._archive.name}")
        for name, data in iter_regular_files(self._archive, limits=self.spec.limits):
            base = Path(name).name
            if base in wanted:
                contents[base] = data
        missing = sorted(wanted - contents.keys())
        if missing:
            raise FormatError(f"{self._archive.name}: archive lacks {', '.join(missing)}")
        class_names = [line.strip() for line in contents[self.spec.meta_file].decode().splitlines() if line.strip()]
        splits = {
            "train": self._records([contents[f] for f in self.spec.train_files], len(class_names)),
            "test": self._records([contents[f] for f in self.spec.test_files], len(class_names)),
        }
        return SourceData(
            class_names=class_names,
            splits=splits,
            provenance={"kind": self.kind, "files": {self.spec.archive: self._checksums}},
        )

    def _records(self, blobs: list[bytes], num_classes: int) -> tuple[np.ndarray, np.ndarray]:
        arrays = []
        for blob in blobs:
            if len(blob) % _RECORD:
                raise FormatError(
                    f"CIFAR-10 batch of {len(blob)} bytes is not a whole number of {_RECORD}-byte records"
                )
            arrays.append(np.frombuffer(blob, dtype=np.uint8).reshape(-1, _RECORD))
        records = np.concatenate(arrays)
        labels = records[:, 0].astype(np.int64)
        if labels.size and int(labels.max()) >= num_classes:
            raise FormatError(f"CIFAR-10 label {int(labels.max())} is not one of {num_classes} classes")
        # Stored channel-planar (C x H x W); the store is N x H x W x C.
        images = np.ascontiguousarray(records[:, 1:].reshape(-1, 3, _SIDE, _SIDE).transpose(0, 2, 3, 1))
        return images, labels

    def _verify_download(self, path: Path, name: str) -> None:
        self._verify(path, shown=name)

    def _verify(self, path: Path, shown: str | None = None) -> dict[str, str]:
        md5, sha = hashlib.md5(usedforsecurity=False), hashlib.sha256()
        with path.open("rb") as fh:
            while chunk := fh.read(1 << 22):
                md5.update(chunk)
                sha.update(chunk)
        if md5.hexdigest() != self.spec.md5:
            raise ChecksumError(
                f"{shown or path}: MD5 {md5.hexdigest()} does not match the published {self.spec.md5}",
                hint="the archive is damaged or not the binary CIFAR-10 release; delete it and fetch it again",
            )
        return {"md5": md5.hexdigest(), "sha256": sha.hexdigest()}
