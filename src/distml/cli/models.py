"""``distml models``: export trained runs to ONNX, register them, and manage the ``champion`` alias."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import click

from distml.card import Parity
from distml.cli.options import AppContext, config_options, pass_app
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
    click.echo(_parity_line(parity))
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
        click.echo(_parity_line(parity))
        version = Registry(app.workspace).register(artifact, promote=not no_promote)
    aliases = f" ({', '.join(version.aliases)})" if version.aliases else ""
    click.echo(f"registered {version.name} version {version.version}{aliases} from run {run_dir.name}")


@models.command("list")
@pass_app
def list_cmd(app: AppContext) -> None:
    """Registered models with their version count and champion."""
    from distml.registry.registry import Registry

    rows = Registry(app.workspace).models()
    if not rows:
        click.echo("no registered models yet (distml models register RUN)")
        return
    click.echo(f"{'NAME':<32} {'VERSIONS':>8}  {'CHAMPION':>8}  TEST ACC")
    for row in rows:
        acc = row["champion_test_accuracy"]
        acc_text = f"{acc:.2%}" if isinstance(acc, float) else "-"
        click.echo(f"{row['name']:<32} {row['versions']:>8}  {row['champion'] or '-':>8}  {acc_text}")


@models.command("show")
@click.argument("ref")
@pass_app
def show_cmd(app: AppContext, ref: str) -> None:
    """A model's versions (REF = NAME), or one version (NAME@ALIAS, NAME/VERSION, models:/...) in detail."""
    from distml.registry.registry import Registry

    registry = Registry(app.workspace)
    uri = ref if ref.startswith("models:/") else f"models:/{ref}"
    if not ref.startswith("models:/") and "@" not in ref and "/" not in ref:
        versions = registry.versions(ref)
        click.echo(f"{'VERSION':>7}  {'ALIASES':<20} {'TEST ACC':>8}  TRAINING RUN")
        for v in versions:
            acc = f"{v.test_accuracy:.2%}" if v.test_accuracy is not None else "-"
            click.echo(
                f"{v.version:>7}  {','.join(v.aliases) or '-':<20} {acc:>8}  {v.tags.get('distml.training_run')}"
            )
        return
    version = registry.lookup(uri)
    artifact = registry.fetch(version)
    card = artifact.card
    click.echo(f"model      {version.name} version {version.version} ({', '.join(version.aliases) or 'no alias'})")
    click.echo(f"artifact   {artifact.path}")
    click.echo(f"input      {card.input.dtype} {card.input.shape} ({card.input.layout})")
    click.echo(f"classes    {', '.join(card.class_names)}")
    m = card.metrics
    click.echo(f"metrics    test accuracy {_fmt(m.test_accuracy, '.2%')}, test loss {_fmt(m.test_loss, '.4f')}, "
               f"{m.epochs} epochs")  # fmt: skip
    click.echo(f"parity     {card.parity.describe()}")
    lineage = card.lineage
    click.echo(f"lineage    run {lineage.training_run} (MLflow {lineage.mlflow_run_id}), dataset "
               f"{lineage.dataset}@{lineage.dataset_digest[:12]}, {lineage.config['model']}")  # fmt: skip


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


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


def _parity_line(parity: Parity) -> str:
    return f"parity ok: {parity.describe()}"


@click.command("predict")
@click.argument("model")
@click.option("--dataset", help="Predict a split of this dataset (name or digest prefix).")
@click.option("--split", default="test", show_default=True, help="Which split of --dataset.")
@click.option("--images", type=click.Path(path_type=Path), help="Predict every PNG/JPEG under this folder.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output: .parquet, .jsonl or .csv.")
@click.option("--batch-size", type=click.IntRange(1, 65536), default=DEFAULT_BATCH, show_default=True,
              help="ONNX Runtime's batch (small batches stay in cache).")  # fmt: skip
@click.option("--threads", type=click.IntRange(0, 1024), default=0, help="ONNX Runtime threads. [default: all cores]")
@click.option("--on-bad-file", type=click.Choice(["fail", "skip"]), default="fail", show_default=True,
              help="With --images: stop at a file that is not a readable image, or skip and list it.")  # fmt: skip
@pass_app
def predict_cmd(
    app: AppContext, model: str, dataset: str | None, split: str, images: Path | None, out: Path,
    batch_size: int, threads: int, on_bad_file: Literal["fail", "skip"],
) -> None:  # fmt: skip
    """Batch prediction with MODEL (a folder, models:/NAME@ALIAS or models:/NAME/VERSION) through ONNX Runtime.

    \b
    Examples:
      distml predict models:/fashion-mnist-classifier@champion --dataset fashion-mnist --out preds.parquet
      distml predict ./exported-model --images ./photos --out preds.csv
    """
    from distml.registry.predict import predict_source

    result = predict_source(app.workspace, model, out, dataset=dataset, split=split, images=images,
                            batch=batch_size, threads=threads, on_bad_file=on_bad_file)  # fmt: skip
    acc = f", accuracy {result.accuracy:.2%}" if result.accuracy is not None else ""
    click.echo(f"predicted {result.images:,} images in {result.seconds:.2f} s ({result.images_per_s:,.0f} img/s)"
               f"{acc} -> {result.out}")  # fmt: skip
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
    m = ev.metrics
    click.echo(f"accuracy {m['test_accuracy']:.2%}, loss {m['test_loss']:.4f}, macro F1 {m['macro_f1']:.4f}, "
               f"latency b1 {m['latency_b1_ms']:.3f} ms / b64 {m['latency_b64_ms']:.3f} ms")  # fmt: skip
    click.echo(f"report: {ev.folder / 'evaluation.md'} (confusion matrix: {ev.folder / 'confusion_matrix.png'})")


@click.command("select")
@click.argument("runs", nargs=-1, required=True)
@config_options("pipeline", "metric", "direction", "max_latency_ms", "max_params")
@click.option("--register", "register_", is_flag=True, help="Register the winner and make it the champion.")
@pass_app
def select_cmd(app: AppContext, runs: tuple[str, ...], register_: bool) -> None:
    """Pick the best of the training RUNS (names, folders or globs like 'cand-*') by a declared metric.

    Each run is exported and evaluated first if it has not been. Ties go to fewer parameters, then lower
    latency, then the run name. The table and the decision go to <home>/selections/ and to MLflow tags.
    """
    from distml.registry.evaluate import select_runs
    from distml.registry.registry import Registry

    p = app.config.pipeline
    selection = select_runs(app.workspace, list(runs), metric=p.metric, direction=p.direction,
                            max_latency_ms=p.max_latency_ms, max_params=p.max_params, log=click.echo)  # fmt: skip
    click.echo("\n".join(selection.table))
    click.echo(f"selected {selection.choice.winner['run']} by {p.metric} ({p.direction}); report {selection.report}")
    if register_:
        version = Registry(app.workspace).register(selection.winner)
        click.echo(f"registered {version.name} version {version.version} ({', '.join(version.aliases)})")
