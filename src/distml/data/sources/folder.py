"""A folder of images: ``ROOT/<class>/<image>``, or ``ROOT/train/<class>/...`` and ``ROOT/test/<class>/...``.

Images (PNG or JPEG) are decoded with Pillow, converted to a declared mode and resized to a declared size. The
pixel count is checked from the header before anything is decoded (decompression bombs). Without ``train/`` and
``test/`` folders, each file goes to the test split when a hash of its relative path falls under
``test_fraction``: deterministic, and stable when files are added. Within a split, samples are ordered by that
hash too, so classes are mixed across shards.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from distml.data.sources.base import Log, SourceData
from distml.errors import BadImageError, SourceNotFoundError, UsageError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
ACCEPTED_FORMATS = ("PNG", "JPEG")  # Pillow's names; whatever the suffix says, nothing else is parsed
Mode = Literal["L", "RGB"]


@dataclass(frozen=True)
class FolderOptions:
    image_size: tuple[int, int] = (32, 32)  # height, width
    mode: Mode = "RGB"
    test_fraction: float = 0.2
    on_bad_file: Literal["fail", "skip"] = "fail"
    max_pixels: int = 40_000_000
    max_file_bytes: int = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        h, w = self.image_size
        if not (1 <= h <= 4096 and 1 <= w <= 4096):
            raise UsageError(f"image size {h}x{w} is out of range", hint="use 1..4096 for height and width")
        if not 0.0 < self.test_fraction < 1.0:
            raise UsageError(f"test fraction {self.test_fraction} is not in (0, 1)", hint="e.g. --test-fraction 0.2")


@dataclass(frozen=True)
class _Item:
    rel: str  # path relative to ROOT, with '/' separators
    path: Path
    label: int
    split: str
    order: int  # hash of ``rel``: split assignment and order within the split


@dataclass
class FolderSource:
    root: Path
    options: FolderOptions = FolderOptions()
    kind: str = "folder"
    default_name: str = ""
    _items: list[_Item] = field(default_factory=list, init=False, repr=False)
    _classes: list[str] = field(default_factory=list, init=False, repr=False)
    _digest: str = field(default="", init=False, repr=False)
    _real_root: Path = field(default=Path("/nonexistent"), init=False, repr=False)

    def __post_init__(self) -> None:
        self.default_name = self.default_name or self.root.resolve().name

    def prepare(self, log: Log) -> None:
        if not self.root.is_dir():
            raise SourceNotFoundError(f"image folder {self.root} does not exist", hint="pass ROOT/<class>/<image>")
        self._real_root = self.root.resolve()
        train, test = self.root / "train", self.root / "test"
        if train.is_dir() and test.is_dir():
            self._classes = _class_dirs(train)
            test_classes = _class_dirs(test)
            extra = sorted(set(test_classes) - set(self._classes))
            if extra:
                raise UsageError(f"{test} has classes not in {train}: {', '.join(extra)}")
            items = self._scan(train, "train") + self._scan(test, "test")
        else:
            self._classes = _class_dirs(self.root)
            items = self._scan(self.root, None)
        if not self._classes:
            raise SourceNotFoundError(
                f"{self.root} has no class folders", hint="lay images out as ROOT/<class>/<image>.png"
            )
        if not any(i.split == "train" for i in items):
            raise SourceNotFoundError(f"{self.root} has no PNG or JPEG images for the train split")
        self._items = sorted(items, key=lambda i: (i.split, i.order, i.rel))
        log(f"  found {len(self._items)} images in {len(self._classes)} classes under {self.root}")

    def _scan(self, base: Path, split: str | None) -> list[_Item]:
        items = []
        for label, cls in enumerate(self._classes):
            folder = base / cls
            if not folder.is_dir():
                continue
            for path in sorted(folder.rglob("*")):
                if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file() or path.is_symlink():
                    continue
                if not path.resolve().is_relative_to(self._real_root):
                    continue  # reached through a symlinked folder: never read outside ROOT
                rel = path.relative_to(self.root).as_posix()
                order = int.from_bytes(hashlib.sha256(rel.encode()).digest()[:8], "big")
                chosen = split or ("test" if order / 2**64 < self.options.test_fraction else "train")
                items.append(_Item(rel, path, label, chosen, order))
        return items

    def fingerprint(self) -> dict[str, Any]:
        return {"files": self._files_digest(), "classes": self._classes, "options": self._options_doc()}

    def _files_digest(self) -> str:
        """One sha256 over every image's relative path, label, split and content (computed once)."""
        if not self._digest:
            h = hashlib.sha256()
            for item in self._items:
                h.update(f"{item.rel}\0{item.label}\0{item.split}\0".encode())
                h.update(hashlib.sha256(item.path.read_bytes()).digest())
            self._digest = h.hexdigest()
        return self._digest

    def load(self, log: Log) -> SourceData:
        h, w = self.options.image_size
        channels = 1 if self.options.mode == "L" else 3
        decoded: list[np.ndarray | None] = [None] * len(self._items)
        skipped: list[tuple[str, str]] = []
        done = 0

        def decode(i: int) -> None:
            decoded[i] = decode_image(self._items[i].path, self.options)

        with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
            futures = [pool.submit(decode, i) for i in range(len(self._items))]
            for i, fut in enumerate(futures):
                try:
                    fut.result()
                except BadImageError as exc:
                    if self.options.on_bad_file == "fail":
                        for f in futures:
                            f.cancel()
                        raise BadImageError(
                            f"{exc.message}", hint="fix or remove it, or pass --on-bad-file skip"
                        ) from None
                    skipped.append((self._items[i].rel, exc.message))
                done += 1
                if done % 5000 == 0:
                    log(f"  decoded {done}/{len(self._items)} images")
        splits: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for split in ("train", "test"):
            keep = [i for i, item in enumerate(self._items) if item.split == split and decoded[i] is not None]
            images = np.empty((len(keep), h, w, channels), dtype=np.uint8)
            for row, i in enumerate(keep):
                images[row] = decoded[i]  # type: ignore[assignment]  # not None: ``keep`` filtered
            labels = np.array([self._items[i].label for i in keep], dtype=np.int64)
            if len(keep) or split == "train":
                splits[split] = (images, labels)
        if not len(splits["train"][1]):
            raise BadImageError(f"{self.root}: no image of the train split could be decoded")
        for rel, reason in skipped:
            log(f"  skipped {rel}: {reason}")
        if "test" not in splits:
            log(f"  warning: no image fell in the test split (--test-fraction {self.options.test_fraction})")
        return SourceData(
            class_names=list(self._classes),
            splits=splits,
            provenance={
                "kind": self.kind,
                "files_sha256": self._files_digest(),
                "num_files": len(self._items),
                "skipped": [rel for rel, _ in skipped],
                "options": self._options_doc(),
            },
            skipped=skipped,
        )

    def _options_doc(self) -> dict[str, Any]:
        o = self.options
        return {
            "image_size": list(o.image_size),
            "mode": o.mode,
            "test_fraction": o.test_fraction,
            "on_bad_file": o.on_bad_file,
            # The limits decide which files are refused, so they shape the content too.
            "max_pixels": o.max_pixels,
            "max_file_bytes": o.max_file_bytes,
        }


def decode_image(path: Path, options: FolderOptions) -> np.ndarray:
    """Decode one image to ``H x W x C`` uint8 in the declared mode and size, or raise BadImageError."""
    from PIL import Image, UnidentifiedImageError

    try:
        size = path.stat().st_size
        if size > options.max_file_bytes:
            raise BadImageError(f"{path}: {size} bytes is over the {options.max_file_bytes}-byte limit")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            # Only the PNG and JPEG parsers ever see the bytes: without ``formats`` Pillow tries every plugin it
            # has (GIF, TIFF, PSD, ...) on an untrusted file, each a parser with its own history of bugs.
            with Image.open(path, formats=ACCEPTED_FORMATS) as img:
                w, h = img.size
                if w * h > options.max_pixels:
                    raise BadImageError(
                        f"{path}: {w}x{h} = {w * h} pixels is over the {options.max_pixels}-pixel limit "
                        "(decompression bomb?)"
                    )
                img.draft(options.mode, (options.image_size[1], options.image_size[0]))  # cheap JPEG downscale
                out = img.convert(options.mode)
                if out.size != (options.image_size[1], options.image_size[0]):
                    out = out.resize((options.image_size[1], options.image_size[0]), Image.Resampling.BILINEAR)
                array = np.asarray(out, dtype=np.uint8)
    except BadImageError:
        raise
    except UnidentifiedImageError:
        raise BadImageError(f"{path}: not a readable PNG or JPEG image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImageError(f"{path}: over the pixel limit (decompression bomb?): {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadImageError(f"{path}: cannot decode image ({exc})") from None
    return array.reshape(options.image_size[0], options.image_size[1], -1)


def _class_dirs(base: Path) -> list[str]:
    return sorted(p.name for p in base.iterdir() if p.is_dir() and not p.is_symlink() and not p.name.startswith("."))
