"""Fashion-MNIST (Zalando Research): four IDX gz files, 60,000 train and 10,000 test 28 x 28 grey images.

Each file is verified by the sha256 of its *uncompressed* content, because mirrors re-compress (the copy in
``../shared/datasets/fashion-mnist`` does); the published ``.gz`` MD5 is accepted as well.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from distml.data.sources.base import Log, SourceData
from distml.data.sources.fetch import download, find_local, is_url
from distml.data.sources.idx import IdxFile, parse_idx, read_idx_file
from distml.errors import ChecksumError, FormatError

CLASS_NAMES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip

MIRRORS = (
    "https://fashion-mnist.s3-website.eu-central-1.amazonaws.com",
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion",
)


@dataclass(frozen=True)
class IdxSpec:
    """One source file: its canonical name, the sha256 of its uncompressed content, the published .gz MD5."""

    name: str
    sha256: str
    md5: str
    split: str
    ndim: int  # 3 for images, 1 for labels


@dataclass(frozen=True)
class MnistLikeSpec:
    """Everything that identifies an MNIST-format dataset; tests build one for generated files."""

    files: tuple[IdxSpec, ...]
    class_names: tuple[str, ...]
    max_file_bytes: int = 64 * 1024 * 1024


FASHION_MNIST = MnistLikeSpec(
    files=(
        IdxSpec("train-images-idx3-ubyte.gz",
                "a8adc57f677927963cb0586145c4a453f381f1ef90c933cb3043e3196ba65bcc",
                "8d4fb7e6c68d591d4c3dfef9ec88bf0d", "train", 3),
        IdxSpec("train-labels-idx1-ubyte.gz",
                "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
                "25c81989df183df01b3e8a0aad5dffbe", "train", 1),
        IdxSpec("t10k-images-idx3-ubyte.gz",
                "4be2ed5e8b4d8ec15414037406eaff205ff050ccabefbf78cca097a19238fda9",
                "bef4ecab320f06d8554ea6380940ec79", "test", 3),
        IdxSpec("t10k-labels-idx1-ubyte.gz",
                "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
                "bb300cfdad3c16e7a12a480ee83cd310", "test", 1),
    ),
    class_names=tuple(CLASS_NAMES),
)  # fmt: skip


@dataclass
class FashionMnistSource:
    """Fashion-MNIST from a local folder, a mirror URL, the download cache, or the default mirrors."""

    downloads: Path  # the workspace's download cache for this dataset
    location: str | None = None  # --source: a folder or a mirror base URL
    mirrors: tuple[str, ...] = MIRRORS
    spec: MnistLikeSpec = FASHION_MNIST
    timeout_s: float = 60.0
    kind: str = "fashion-mnist"
    default_name: str = "fashion-mnist"
    _paths: dict[str, Path] = field(default_factory=dict, init=False, repr=False)

    def prepare(self, log: Log) -> None:
        names = [f.name for f in self.spec.files]
        if self.location and not is_url(self.location):
            self._paths = find_local(Path(self.location), names, dataset=self.kind)
            return
        mirrors = (self.location,) if self.location else self.mirrors
        self._paths = download(
            names,
            mirrors=mirrors,
            dest=self.downloads,
            verify=self._verify_download,
            log=log,
            timeout_s=self.timeout_s,
            dataset=self.kind,
            max_bytes=self.spec.max_file_bytes,
        )

    def fingerprint(self) -> dict[str, Any]:
        digests = {}
        for name, path in sorted(self._paths.items()):
            h = hashlib.sha256()
            with path.open("rb") as fh:
                while chunk := fh.read(1 << 22):
                    h.update(chunk)
            digests[name] = h.hexdigest()
        return {"raw_sha256": digests, "spec": [f.sha256 for f in self.spec.files]}

    def load(self, log: Log) -> SourceData:
        arrays: dict[str, dict[int, np.ndarray]] = {}
        checksums = {}
        for spec in self.spec.files:
            log(f"  verifying {spec.name}")
            idx = self._read_verified(self._paths[spec.name], spec)
            arrays.setdefault(spec.split, {})[spec.ndim] = parse_idx(idx.content, name=spec.name, ndim=spec.ndim)
            checksums[spec.name] = {"sha256_uncompressed": idx.sha256}
        splits = {}
        for split, parts in arrays.items():
            images, labels = parts[3], parts[1]
            if len(images) != len(labels):
                raise FormatError(
                    f"{self.kind} {split}: {len(images)} images but {len(labels)} labels",
                    hint="the files of one split must come from the same release",
                )
            if labels.size and int(labels.max()) >= len(self.spec.class_names):
                raise FormatError(f"{self.kind} {split}: label {int(labels.max())} is not a class index")
            splits[split] = (images[..., None], labels.astype(np.int64))
        return SourceData(
            class_names=list(self.spec.class_names),
            splits=splits,
            provenance={"kind": self.kind, "files": checksums},
        )

    def _spec(self, name: str) -> IdxSpec:
        return next(f for f in self.spec.files if f.name == name)

    def _verify_download(self, path: Path, name: str) -> None:
        self._read_verified(path, self._spec(name), shown=name)

    def _read_verified(self, path: Path, spec: IdxSpec, shown: str | None = None) -> IdxFile:
        shown = shown or str(path)
        idx = read_idx_file(path, max_bytes=self.spec.max_file_bytes, shown=shown)
        if idx.sha256 != spec.sha256 and idx.md5_file != spec.md5:
            raise ChecksumError(
                f"{shown}: checksum mismatch for {spec.name} (content sha256 {idx.sha256[:16]}..., "
                f"expected {spec.sha256[:16]}...)",
                hint="the file is damaged or from another release; delete it and fetch it again",
            )
        return idx
