"""``distml data``: ingest, list, show and verify datasets."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
import numpy as np

from distml.cli.options import AppContext, config_option, pass_app
from distml.data.ingest import ingest
from distml.data.reader import Dataset, open_path
from distml.data.sources.base import Source
from distml.data.sources.cifar10 import Cifar10Source
from distml.data.sources.fashion_mnist import FashionMnistSource
from distml.data.sources.folder import FolderOptions, FolderSource
from distml.data.store import DatasetStore
from distml.errors import CorruptDatasetError, UsageError


def _progress(message: str) -> None:
    click.echo(message, err=True)


def _store(app: AppContext) -> DatasetStore:
    return DatasetStore(app.workspace, shard_bytes=app.config.data.shard_bytes)


def _parse_size(_ctx: click.Context, _param: click.Parameter, value: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)(?:x(\d+))?", value.strip().lower())
    if not match:
        raise click.BadParameter(f"{value!r} is not HxW or N (e.g. 32x32 or 64)")
    h = int(match.group(1))
    return h, int(match.group(2) or h)


@click.group()
def data() -> None:
    """Ingest datasets into the verified, sharded store and inspect them."""


@data.command("ingest")
@click.argument("kind", type=click.Choice(["fashion-mnist", "cifar10", "folder"]), metavar="DATASET")
@click.argument("path", required=False, type=click.Path(path_type=Path, file_okay=False))
@click.option(
    "--source",
    metavar="DIR|URL",
    help="Folder holding the source files, or a mirror base URL. Default: the download cache, then the mirrors.",
)
@click.option("--name", help="Dataset name in the store. Default: the dataset's name, or the folder's name.")
@click.option(
    "--image-size",
    default="32x32",
    show_default=True,
    callback=_parse_size,
    help="folder: resize images to HxW.",
)
@click.option("--mode", type=click.Choice(["L", "RGB"]), default="RGB", show_default=True, help="folder: L or RGB.")
@click.option(
    "--test-fraction",
    type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True),
    default=0.2,
    show_default=True,
    help="folder: share of images (by hash of their path) put in the test split when there is no train/ and test/.",
)
@config_option("data", "on_bad_file")
@pass_app
def ingest_cmd(
    app: AppContext,
    kind: str,
    path: Path | None,
    source: str | None,
    name: str | None,
    image_size: tuple[int, int],
    mode: str,
    test_fraction: float,
) -> None:
    """Ingest DATASET (fashion-mnist, cifar10, or folder PATH) into the store.

    Source files are verified by checksum; the result is a dataset version named by its content digest.
    Ingesting the same sources again reuses the stored version.

    \b
    Examples:
      distml data ingest fashion-mnist --source ../shared/datasets/fashion-mnist
      distml data ingest cifar10
      distml data ingest folder ./flowers --image-size 64x64 --on-bad-file skip
    """
    cfg = app.config.data
    src: Source
    if kind == "folder":
        if path is None:
            raise UsageError(
                "'distml data ingest folder' needs the image folder", hint="pass PATH (ROOT/<class>/<image>)"
            )
        options = FolderOptions(
            image_size=image_size,
            mode="L" if mode == "L" else "RGB",
            test_fraction=test_fraction,
            on_bad_file=cfg.on_bad_file,
            max_pixels=cfg.max_image_pixels,
            max_file_bytes=cfg.max_image_file_bytes,
        )
        src = FolderSource(path, options)
    else:
        if path is not None:
            raise UsageError(f"{kind} takes no PATH (got {path})", hint=f"use --source {path} for a local copy")
        downloads = app.workspace.downloads / kind
        if kind == "fashion-mnist":
            src = FashionMnistSource(downloads, location=source, timeout_s=cfg.download_timeout_s)
        else:
            src = Cifar10Source(downloads, location=source, timeout_s=cfg.download_timeout_s)
    _progress(f"ingesting {kind}" + (f" from {source or path}" if (source or path) else ""))
    result = ingest(src, store=_store(app), name=name, log=_progress)
    ds = result.dataset
    verb = "already ingested, reused" if result.reused else "ingested"
    click.echo(f"{ds.name}@{ds.manifest.short_digest} {verb} in {result.seconds:.2f} s: {_brief(ds)}")
    if result.skipped:
        click.echo(f"skipped {len(result.skipped)} bad file(s):")
        for rel, reason in result.skipped:
            click.echo(f"  {rel}: {reason}")


@data.command("list")
@pass_app
def list_cmd(app: AppContext) -> None:
    """List the dataset versions in the store, newest first."""
    store = _store(app)
    versions = store.versions()
    if not versions:
        click.echo(f"no datasets in {store.root}; add one with 'distml data ingest fashion-mnist'")
        return
    rows = [("NAME", "DIGEST", "SHAPE", "CLASSES", "SPLITS", "SIZE", "CREATED", "STATUS")]
    for v in versions:
        try:
            ds = open_path(v.path)
        except CorruptDatasetError as exc:
            rows.append((v.name or "?", v.digest[:12], "", "", "", "", v.created_at, f"damaged: {exc.message}"))
            continue
        m = ds.manifest
        splits = " ".join(f"{k}={s.num_samples}" for k, s in m.splits.items())
        rows.append((m.name, m.short_digest, _shape(ds), str(ds.num_classes), splits, _size(ds), m.created_at, "ok"))
    _table(rows)


@data.command("show")
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@pass_app
def show_cmd(app: AppContext, ref: str, as_json: bool) -> None:
    """Show a dataset: REF is a name (its newest version) or a digest prefix."""
    ds = open_path(_store(app).resolve(ref))
    if as_json:
        click.echo(ds.manifest.to_json(), nl=False)
        return
    m = ds.manifest
    click.echo(f"dataset   {m.name}")
    click.echo(f"digest    {m.digest}")
    click.echo(f"path      {ds.path}")
    click.echo(f"created   {m.created_at}")
    click.echo(f"source    {m.source.get('kind')}")
    click.echo(f"images    {_shape(ds)} uint8, {_size(ds)} on disk")
    click.echo(f"pixels    mean {_floats(m.stats.get('mean'))}, std {_floats(m.stats.get('std'))} (train, [0, 1])")
    for split_name, split in ds.splits.items():
        click.echo(f"{split_name:<9} {len(split)} samples in {len(split.info.shards)} shard(s)")
    counts = {name: _class_counts(ds, name) for name in ds.splits}
    rows: list[tuple[str, ...]] = [("", "CLASS", *(s.upper() for s in counts))]
    for i, cls in enumerate(ds.class_names):
        rows.append((str(i), cls, *(str(c[i]) for c in counts.values())))
    _table(rows, indent="  ")


@data.command("verify")
@click.argument("ref")
@pass_app
def verify_cmd(app: AppContext, ref: str) -> None:
    """Re-hash every file of a dataset against its manifest (the cheap checks run on every open)."""
    ds = open_path(_store(app).resolve(ref))
    bad = ds.verify(progress=lambda fname, ok: _progress(f"  {'ok ' if ok else 'BAD'} {fname}"))
    if bad:
        raise CorruptDatasetError(
            f"{ds.name}@{ds.manifest.short_digest}: {len(bad)} file(s) do not match the manifest: {', '.join(bad)}",
            hint="re-ingest the dataset",
        )
    click.echo(f"{ds.name}@{ds.manifest.short_digest}: all {len(ds.manifest.files)} files match the manifest")


def _brief(ds: Dataset) -> str:
    splits = " / ".join(f"{s.num_samples} {k}" for k, s in ds.manifest.splits.items())
    return f"{splits}, {_shape(ds)}, {ds.num_classes} classes"


def _shape(ds: Dataset) -> str:
    return "x".join(str(v) for v in ds.image_shape)


def _size(ds: Dataset) -> str:
    total = sum(int(f["bytes"]) for f in ds.manifest.files.values())
    return f"{total / 1e6:.1f} MB"


def _floats(values: Any) -> str:
    return "[" + ", ".join(f"{v:.4f}" for v in values or []) + "]"


def _class_counts(ds: Dataset, split: str) -> list[int]:
    labels = ds.split(split).arrays().labels
    return np.bincount(np.asarray(labels), minlength=ds.num_classes).tolist()  # type: ignore[no-any-return]


def _table(rows: Sequence[Sequence[str]], indent: str = "") -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo(indent + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
