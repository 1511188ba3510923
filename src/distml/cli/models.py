"""``distml models``: export trained runs to ONNX, register them, and manage the ``champion`` alias."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import click

from distml.cli.options import AppContext, config_options, pass_app, ray_option
from distml.registry import report
from distml.registry.predict import DEFAULT_BATCH


@click.group("models")
def models() -> None:
    """Model artifacts and the model registry (MLflow, in the workspace's store).

    A model artifact is a folder with model.onnx (raw uint8 images in, normalised inside the graph; logits and
    probabilities out) and model.json (classes, input spec, metrics, parity, lineage). Every export is
    checked against PyTorch on 1,000 test images before it is written or registered.
    """


@models.command("export")
@click.argument("run")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="New folder for the artifact.")
@pass_app
def export_cmd(app: AppContext, run: str, out: Path) -> None:
    """Export the finished training RUN (a run name or folder) to an ONNX artifact folder."""
    from distml.registry.export import export_run, find_run

    artifact, parity = export_run(find_run(run, app.workspace), out)
    click.echo(report.parity_line(parity))
    click.echo(f"exported {artifact.name} from run {artifact.card.lineage.training_run} -> {artifact.path}")


@models.command("register")
@click.argument("run")
@click.option("--name", help="Registered model name. [default: <dataset>-classifier]")
@click.option("--no-promote", is_flag=True, help="Register without moving the champion alias.")
@pass_app
def register_cmd(app: AppContext, run: str, name: str | None, no_promote: bool) -> None:
    """Export RUN, check parity, add it as a new version and (by default) make it the champion."""
    import tempfile

    from distml.registry.export import export_run, find_run
    from distml.registry.registry import Registry

    run_dir = find_run(run, app.workspace)
    with tempfile.TemporaryDirectory(prefix="distml-export-") as tmp:
        artifact, parity = export_run(run_dir, Path(tmp) / "model", name=name)
        click.echo(report.parity_line(parity))
        version = Registry(app.workspace).register(artifact, promote=not no_promote)
    click.echo(report.registered_line(version, run_dir.name))


@models.command("list")
@pass_app
def list_cmd(app: AppContext) -> None:
    """Registered models with their version count and champion."""
    from distml.registry.registry import Registry

    lines = report.models_table(Registry(app.workspace))
    click.echo("\n".join(lines) if lines else "no registered models yet (distml models register RUN)")


@models.command("show")
@click.argument("ref")
@pass_app
def show_cmd(app: AppContext, ref: str) -> None:
    """A model's versions (REF = NAME), or one version (NAME@ALIAS, NAME/VERSION, models:/...) in detail."""
    from distml.registry.registry import Registry

    click.echo("\n".join(report.show(Registry(app.workspace), ref)))


@models.command("promote")
@click.argument("name")
@click.argument("version")
@pass_app
def promote_cmd(app: AppContext, name: str, version: str) -> None:
    """Make VERSION of NAME the champion (the old champion becomes 'previous')."""
    from distml.registry.registry import Registry

    v = Registry(app.workspace).promote(name, version)
    click.echo(f"{name}: champion is now version {v.version}")


@models.command("rollback")
@click.argument("name")
@pass_app
def rollback_cmd(app: AppContext, name: str) -> None:
    """Move NAME's champion back to the version that held it before."""
    from distml.registry.registry import Registry

    v = Registry(app.workspace).rollback(name)
    click.echo(f"{name}: champion rolled back to version {v.version}")


@click.command("predict")
@click.argument("model")
@click.option("--dataset", help="Predict a split of this dataset (name or digest prefix).")
@click.option("--split", default="test", show_default=True, help="Which split of --dataset.")
@click.option("--images", type=click.Path(path_type=Path), help="Predict every PNG/JPEG under this folder.")
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    required=True,
    help="Output: .parquet, .jsonl or .csv; with --ray, a folder of Parquet files.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(1, 65536),
    default=DEFAULT_BATCH,
    show_default=True,
    help="ONNX Runtime's batch (small batches stay in cache).",
)
@click.option(
    "--threads",
    type=click.IntRange(0, 1024),
    default=0,
    help="ONNX Runtime threads. [default: all cores; with --ray, 1 per actor and an actor per CPU]",
)
@click.option(
    "--on-bad-file",
    type=click.Choice(["fail", "skip"]),
    default="fail",
    show_default=True,
    help="With --images: stop at a file that is not a readable image, or skip and list it.",
)
@ray_option()
@pass_app
def predict_cmd(
    app: AppContext,
    model: str,
    dataset: str | None,
    split: str,
    images: Path | None,
    out: Path,
    batch_size: int,
    threads: int,
    on_bad_file: Literal["fail", "skip"],
) -> None:
    """Batch prediction with MODEL (a folder, models:/NAME@ALIAS or models:/NAME/VERSION) through ONNX Runtime.

    \b
    Examples:
      distml predict models:/fashion-mnist-classifier@champion --dataset fashion-mnist --out preds.parquet
      distml predict ./exported-model --images ./photos --out preds.csv
      distml predict models:/fashion-mnist-classifier@champion --dataset fashion-mnist --ray auto --out preds/

    With --ray, the split is read, predicted (ONNX Runtime in Ray Data actors) and written on the Ray cluster:
    --out is one Parquet dataset, a folder of part-<first id>.parquet files that, read in name order, hold the
    local command's rows in its order. The dataset store and --out must be on storage every node sees.
    """
    from distml.registry.predict import predict_source

    result = predict_source(
        app.workspace,
        model,
        out,
        dataset=dataset,
        split=split,
        images=images,
        batch=batch_size,
        threads=threads,
        on_bad_file=on_bad_file,
        cluster=app.config.cluster,
        log=lambda line: click.echo(line, err=True),
    )
    click.echo(report.predicted_line(result))
    for line in result.skipped:
        click.echo(f"skipped: {line}", err=True)


@click.command("evaluate")
@click.argument("target")
@click.option("--dataset", help="Dataset to evaluate on. [default: the one the model was trained on]")
@click.option("--split", default="test", show_default=True)
@pass_app
def evaluate_cmd(app: AppContext, target: str, dataset: str | None, split: str) -> None:
    """Evaluate TARGET (a training run, a model folder, or models:/NAME@ALIAS) with its exported ONNX graph.

    Writes evaluation.md, evaluation.json, confusion_matrix.png and per_class.png (into <run>/evaluation for
    a run) and logs the metrics and files to the run's MLflow run.
    """
    from distml.registry.evaluate import evaluate_target

    _, ev = evaluate_target(app.workspace, target, dataset, split, log=click.echo)
    click.echo("\n".join(report.evaluation_lines(ev)))


@click.command("select")
@click.argument("runs", nargs=-1, required=True)
@config_options("pipeline", "metric", "direction", "max_latency_ms", "max_params")
@click.option("--register", "register_", is_flag=True, help="Register the winner and make it the champion.")
@pass_app
def select_cmd(app: AppContext, runs: tuple[str, ...], register_: bool) -> None:
    """Pick the best of the training RUNS (names, folders or globs like 'cand-*') by a declared metric.

    The metric is measured on each run's validation split (the train images it held out: [train] val_fraction,
    val_seed), val_accuracy by default; test metrics are shown but never choose. Each run is exported and
    evaluated first if it has not been. Ties go to fewer parameters, then lower latency, then the run name. The
    table and the decision go to <home>/selections/ and to MLflow tags.
    """
    from distml.registry.evaluate import select_runs
    from distml.registry.registry import Registry

    p = app.config.pipeline
    selection = select_runs(
        app.workspace,
        list(runs),
        metric=p.metric,
        direction=p.direction,
        max_latency_ms=p.max_latency_ms,
        max_params=p.max_params,
        log=click.echo,
    )
    click.echo("\n".join(selection.table))
    click.echo(report.selected_line(selection.choice, selection.report))
    if register_:
        version = Registry(app.workspace).register(selection.winner)
        click.echo(report.registered_line(version))
