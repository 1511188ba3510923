"""What the ``distml models``, ``predict``, ``evaluate`` and ``select`` commands print, as text lines.

The commands only wire arguments; the wording of what they report lives here, next to the registry it describes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # types only: printing a listing loads no ONNX Runtime or plotting
    from pathlib import Path

    from distml.card import Parity
    from distml.registry.evaluate import Evaluation
    from distml.registry.predict import PredictResult
    from distml.registry.registry import Registry, Version
    from distml.registry.selection import Choice


def models_table(registry: Registry) -> list[str]:
    """One row per registered model (versions, champion, its test accuracy) under a header; [] when none."""
    rows = registry.models()
    if not rows:
        return []
    lines = [f"{'NAME':<32} {'VERSIONS':>8}  {'CHAMPION':>8}  TEST ACC"]
    for row in rows:
        acc = _fmt(row["champion_test_accuracy"], ".2%")
        lines.append(f"{row['name']:<32} {row['versions']:>8}  {row['champion'] or '-':>8}  {acc}")
    return lines


def show(registry: Registry, ref: str) -> list[str]:
    """A model's versions (``ref`` = NAME), or one version (NAME@ALIAS, NAME/VERSION, models:/...) in detail."""
    if not ref.startswith("models:/") and "@" not in ref and "/" not in ref:
        return versions_table(registry.versions(ref))
    return describe(registry, registry.lookup(ref if ref.startswith("models:/") else f"models:/{ref}"))


def versions_table(versions: list[Version]) -> list[str]:
    """One row per version of a model: its aliases, test accuracy and the training run it came from."""
    lines = [f"{'VERSION':>7}  {'ALIASES':<20} {'TEST ACC':>8}  TRAINING RUN"]
    for v in versions:
        aliases, acc = ",".join(v.aliases) or "-", _fmt(v.test_accuracy, ".2%")
        lines.append(f"{v.version:>7}  {aliases:<20} {acc:>8}  {v.tags.get('distml.training_run')}")
    return lines


def describe(registry: Registry, version: Version) -> list[str]:
    """One version in detail: where its artifact is, its input, classes, metrics, parity and lineage."""
    artifact = registry.fetch(version)
    card, m = artifact.card, artifact.card.metrics
    lineage = card.lineage
    return [
        f"model      {version.label} ({', '.join(version.aliases) or 'no alias'})",
        f"artifact   {artifact.path}",
        f"input      {card.input.dtype} {card.input.shape} ({card.input.layout})",
        f"classes    {', '.join(card.class_names)}",
        f"metrics    val accuracy {_fmt(m.val_accuracy, '.2%')} (what selection uses), test accuracy "
        f"{_fmt(m.test_accuracy, '.2%')}, test loss {_fmt(m.test_loss, '.4f')}, {m.epochs} epochs",
        f"parity     {card.parity.describe()}",
        f"lineage    run {lineage.training_run} (MLflow {lineage.mlflow_run_id}), dataset "
        f"{lineage.dataset}@{lineage.dataset_digest[:12]}, {lineage.config['model']}",
        f"validation {_split(lineage.validation.model_dump() if lineage.validation else None)}",
    ]


def parity_line(parity: Parity) -> str:
    """The line an export prints once its ONNX graph matched PyTorch."""
    return f"parity ok: {parity.describe()}"


def registered_line(version: Version, run: str | None = None) -> str:
    """``registered NAME version N (champion)``, and the training run it came from when given."""
    aliases = f" ({', '.join(version.aliases)})" if version.aliases else ""
    return f"registered {version.label}{aliases}" + (f" from run {run}" if run else "")


def predicted_line(result: PredictResult) -> str:
    """How many images a batch prediction did, how fast, its accuracy (labelled inputs) and where it wrote."""
    acc = f", accuracy {result.accuracy:.2%}" if result.accuracy is not None else ""
    rate = f"{result.seconds:.2f} s ({result.images_per_s:,.0f} img/s)"
    return f"predicted {result.images:,} images in {rate}{acc} -> {result.out}"


def evaluation_lines(ev: Evaluation) -> list[str]:
    """An evaluation's headline metrics (the split asked for, then validation) and where its report went."""
    m = ev.metrics
    val = (
        f"validation accuracy {m['val_accuracy']:.2%}, loss {m['val_loss']:.4f} on {_split(ev.validation)}"
        if "val_accuracy" in m
        else "validation: none (the run held no train images out, or this is not its dataset)"
    )
    return [
        f"accuracy {m['test_accuracy']:.2%}, loss {m['test_loss']:.4f}, macro F1 {m['macro_f1']:.4f}, "
        f"latency b1 {m['latency_b1_ms']:.3f} ms / b64 {m['latency_b64_ms']:.3f} ms",
        val,
        f"report: {ev.folder / 'evaluation.md'} (confusion matrix: {ev.folder / 'confusion_matrix.png'})",
    ]


def selected_line(choice: Choice, report: Path) -> str:
    """Which run a selection chose, on what, and the winner's test accuracy (reported, not used for the choice)."""
    test = choice.winner.get("test_accuracy")
    shown = f"; its test accuracy {test:.2%} is reported, not used for the choice" if isinstance(test, float) else ""
    return f"selected {choice.winner['run']} by {choice.metric} ({choice.direction}){shown}; report {report}"


def _split(record: Mapping[str, object] | None) -> str:
    """A validation split in words: how many train images, which fraction and seed, and its digest."""
    if not record:
        return "none recorded"
    return (
        f"{record['images']} held-out train images (fraction {record['fraction']}, seed {record['seed']}, "
        f"split {str(record['indices_sha256'])[:12]})"
    )


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)
