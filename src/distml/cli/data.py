"""``distml data``: ingest, list, show and verify datasets."""

from __future__ import annotations

import re
from pathlib import Path

import click

from distml.cli.options import AppContext, config_option, config_options, pass_app
from distml.data import report
from distml.data.reader import open_path
from distml.data.store import DatasetStore
from distml.errors import UsageError


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
@config_option("pipeline", "name", record=False)
@click.option("--image-size", default="32x32", show_default=True, callback=_parse_size, help="folder: resize to HxW.")
@config_options("pipeline", "mode", "test_fraction", record=False)
@config_option("data", "on_bad_file")
@pass_app
def ingest_cmd(
    app: AppContext,
    kind: str,
    path: Path | None,
    source: str | None,
    name: str | None,
    image_size: tuple[int, int],
    mode: str | None,
    test_fraction: float | None,
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
    from distml.config import PipelineConfig
    from distml.data.ingest import ingest
    from distml.pipeline.steps import make_source

    if kind == "folder" and path is None:
        raise UsageError("'distml data ingest folder' needs the image folder", hint="pass PATH (ROOT/<class>/<image>)")
    if kind != "folder" and path is not None:
        raise UsageError(f"{kind} takes no PATH (got {path})", hint=f"use --source {path} for a local copy")
    # The source the pipeline's ingest step would build from the same settings.
    where = str(path) if path else source
    given = dict(dataset=kind, source=where, name=name, image_size=image_size, mode=mode, test_fraction=test_fraction)
    settings = PipelineConfig.model_validate({k: v for k, v in given.items() if v is not None})  # None: the default
    src = make_source(app.workspace, app.config.model_copy(update={"pipeline": settings}))
    _progress(f"ingesting {kind}" + (f" from {where}" if where else ""))
    result = ingest(src, store=_store(app), name=name, log=_progress)
    ds = result.dataset
    verb = "already ingested, reused" if result.reused else "ingested"
    click.echo(f"{ds.name}@{ds.manifest.short_digest} {verb} in {result.seconds:.2f} s: {report.brief(ds)}")
    if result.skipped:
        click.echo(f"skipped {len(result.skipped)} bad file(s):")
        for rel, reason in result.skipped:
            click.echo(f"  {rel}: {reason}")


@data.command("list")
@pass_app
def list_cmd(app: AppContext) -> None:
    """List the dataset versions in the store, newest first."""
    store = _store(app)
    lines = report.listing(store)
    click.echo(
        "\n".join(lines) if lines else f"no datasets in {store.root}; add one with 'distml data ingest fashion-mnist'"
    )


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
    click.echo("\n".join(report.describe(ds)))


@data.command("verify")
@click.argument("ref")
@pass_app
def verify_cmd(app: AppContext, ref: str) -> None:
    """Re-hash every file of a dataset against its manifest (the cheap checks run on every open)."""
    ds = open_path(_store(app).resolve(ref))
    click.echo(report.verify(ds, _progress))
