"""Evaluate a model artifact on a dataset split, and select the best of several candidates.

Evaluation runs the exported ONNX graph (what will be served, not the PyTorch weights) over the whole split and
reports accuracy, loss, per-class precision / recall / F1, the confusion matrix (PNG), a per-class bar chart
(PNG) and the graph's latency at batch 1 and batch 64. It also measures the model's validation split (the train
images its run held out, recomputed from the run's ``val_fraction`` / ``val_seed``: :mod:`distml.data.split`) as
``val_*``. A run's test-time augmentation (``[train] tta``) is inside the graph, so it is measured as served.
The report (``evaluation.md`` + ``evaluation.json`` and the two PNGs) lands in a folder, and
everything is logged to the training run's MLflow run.

:func:`select_runs` evaluates runs and chooses one on validation (:mod:`distml.registry.selection`); the
decision and the whole table are written as a report and as MLflow tags on every candidate.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypedDict

import numpy as np

from distml.card import CARD_FILE, INPUT_NAME, PROBABILITIES
from distml.data.split import ValidationRecord, validation_indices, validation_record
from distml.errors import UsageError
from distml.files import write_atomic
from distml.registry.artifact import ModelArtifact, probabilities
from distml.registry.selection import Choice, check_selection_metric, select, selection_table
from distml.workspace import Workspace

if TYPE_CHECKING:
    from onnxruntime import InferenceSession

    from distml.data.reader import Dataset
    from distml.data.sources.base import Log

EVAL_BATCH = 128
LATENCY_REPEATS = 50


ClassScores = TypedDict("ClassScores", {"class": str, "precision": float, "recall": float, "f1": float, "support": int})


@dataclass(frozen=True)
class Validation:
    """A model's validation split: the held-out train images and labels, and the split's record."""

    images: np.ndarray
    labels: np.ndarray
    record: ValidationRecord


@dataclass(frozen=True)
class Evaluation:
    metrics: dict[str, float]  # test_* and macro_f1 on the split evaluated; val_* when there was a validation split
    per_class: list[ClassScores]
    confusion: np.ndarray
    folder: Path
    validation: ValidationRecord | None = None

    def to_json(self) -> dict[str, object]:
        return {
            "metrics": self.metrics,
            "per_class": self.per_class,
            "confusion": self.confusion.tolist(),
            "validation": self.validation,
        }


def evaluate(
    artifact: ModelArtifact, images: np.ndarray, labels: np.ndarray, out: Path, validation: Validation | None = None
) -> Evaluation:
    """Run the graph over ``images`` (and ``validation``'s) and write the report into ``out`` (created if missing)."""
    if images.shape[1:] != artifact.image_shape:
        raise UsageError(f"the images are {images.shape[1:]}, the model takes {artifact.image_shape}")
    session = artifact.session()
    k = len(artifact.class_names)
    labels = np.asarray(labels, dtype=np.int64)
    accuracy, loss, confusion = _scores(session, images, labels, k)
    per_class = _per_class(confusion, artifact.class_names)
    metrics = {
        "test_accuracy": accuracy,
        "test_loss": loss,
        "macro_f1": float(np.mean([r["f1"] for r in per_class])),
        "latency_b1_ms": _latency_ms(session, images, 1),
        "latency_b64_ms": _latency_ms(session, images, 64),
        "parameters": float(artifact.card.metrics.parameters or 0),
        "images": float(len(labels)),
    }
    if validation is not None and len(validation.labels):
        val_accuracy, val_loss, val_confusion = _scores(session, validation.images, validation.labels, k)
        metrics |= {
            "val_accuracy": val_accuracy,
            "val_loss": val_loss,
            "val_macro_f1": float(np.mean([r["f1"] for r in _per_class(val_confusion, artifact.class_names)])),
            "val_images": float(len(validation.labels)),
        }
    out.mkdir(parents=True, exist_ok=True)
    evaluation = Evaluation(metrics, per_class, confusion, out, validation.record if validation else None)
    _plots(evaluation, artifact.class_names)
    write_atomic(out / "evaluation.json", (json.dumps(evaluation.to_json(), indent=2) + "\n").encode())
    write_atomic(out / "evaluation.md", _markdown(artifact, evaluation).encode())
    return evaluation


def _scores(
    session: InferenceSession, images: np.ndarray, labels: np.ndarray, k: int
) -> tuple[float, float, np.ndarray]:
    """Accuracy, mean cross-entropy and the k x k confusion matrix (rows: true, columns: predicted) of the graph."""
    probs = probabilities(session, images, EVAL_BATCH)
    labels = np.asarray(labels, dtype=np.int64)
    pred = probs.argmax(1)
    confusion = np.bincount(labels * k + pred, minlength=k * k).reshape(k, k)
    loss = float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)).mean())
    return float((pred == labels).mean()), loss, confusion


def _per_class(confusion: np.ndarray, class_names: list[str]) -> list[ClassScores]:
    """Precision, recall, F1 and support of each class, from the confusion matrix."""
    per_class: list[ClassScores] = []
    for c, name in enumerate(class_names):
        tp = int(confusion[c, c])
        precision = tp / max(1, int(confusion[:, c].sum()))
        recall = tp / max(1, int(confusion[c, :].sum()))
        f1 = 2 * precision * recall / max(1e-12, precision + recall)
        per_class.append(
            {"class": name, "precision": precision, "recall": recall, "f1": f1, "support": int(confusion[c, :].sum())}
        )
    return per_class


def validation_split(artifact: ModelArtifact, dataset: Dataset) -> Validation | None:
    """The validation images of ``artifact``'s training run, if it held any out and ``dataset`` is the one it used.

    They are recomputed from the run's own ``val_fraction`` and ``val_seed`` (the split is a pure function of them
    and the size of train), and checked against the split the card records when it records one.
    """
    lineage = artifact.card.lineage
    fraction, seed = lineage.config.get("val_fraction"), lineage.config.get("val_seed")
    fraction = float(fraction) if isinstance(fraction, int | float) else 0.0  # a card from before the split: none
    seed = seed if isinstance(seed, int) else 0
    if fraction <= 0 or dataset.digest != lineage.dataset_digest or "train" not in dataset.splits:
        return None
    split = dataset.split("train")
    record = validation_record(len(split), fraction, seed)
    if lineage.validation is not None and lineage.validation.indices_sha256 != record["indices_sha256"]:
        raise UsageError(
            f"model {artifact.name} records a validation split {lineage.validation.indices_sha256[:12]}, but its "
            f"val_fraction {fraction} and val_seed {seed} give {record['indices_sha256'][:12]} on {dataset.name}"
        )
    _, val_idx = validation_indices(len(split), fraction, seed)
    arrays = split.arrays()
    return Validation(arrays.images[val_idx], arrays.labels[val_idx], record)


def _latency_ms(session: InferenceSession, images: np.ndarray, batch: int) -> float:
    """Median wall time of one ``session.run`` at ``batch`` images, after a warm-up."""
    x = np.ascontiguousarray(images[:batch])
    for _ in range(5):
        session.run([PROBABILITIES], {INPUT_NAME: x})
    times = []
    for _ in range(LATENCY_REPEATS):
        start = time.perf_counter()
        session.run([PROBABILITIES], {INPUT_NAME: x})
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1000)


def _plots(ev: Evaluation, classes: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    k = len(classes)
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * k, 1.0 + 0.6 * k))
    ax.imshow(ev.confusion, cmap="Blues")
    ax.set_xticks(range(k), classes, rotation=45, ha="right")
    ax.set_yticks(range(k), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    peak = max(1, int(ev.confusion.max()))
    for i in range(k):
        for j in range(k):
            value = int(ev.confusion[i, j])
            ax.text(
                j, i, str(value), ha="center", va="center", fontsize=7, color="white" if value > peak / 2 else "black"
            )
    ax.set_title(f"confusion matrix, accuracy {ev.metrics['test_accuracy']:.2%}")
    fig.tight_layout()
    fig.savefig(ev.folder / "confusion_matrix.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(max(6.0, 0.8 * k), 4))
    x = np.arange(k)
    scores: tuple[Literal["precision", "recall", "f1"], ...] = ("precision", "recall", "f1")
    for offset, key in zip((-0.27, 0.0, 0.27), scores, strict=True):
        ax.bar(x + offset, [r[key] for r in ev.per_class], width=0.27, label=key)
    ax.set_xticks(x, classes, rotation=45, ha="right")
    ax.set_ylim(0, 1)
    ax.legend(loc="lower right")
    ax.set_title("per-class precision, recall and F1")
    fig.tight_layout()
    fig.savefig(ev.folder / "per_class.png", dpi=100)
    plt.close(fig)


def _markdown(artifact: ModelArtifact, ev: Evaluation) -> str:
    m, lineage = ev.metrics, artifact.card.lineage
    lines = [
        f"# Evaluation: {artifact.name} (run {lineage.training_run})",
        "",
        f"- images: {int(m['images'])}, accuracy **{m['test_accuracy']:.2%}**, loss {m['test_loss']:.4f}, "
        f"macro F1 {m['macro_f1']:.4f}",
        _validation_text(ev),
        f"- ONNX Runtime latency (median of {LATENCY_REPEATS}): batch 1 {m['latency_b1_ms']:.3f} ms, "
        f"batch 64 {m['latency_b64_ms']:.3f} ms",
        f"- dataset {lineage.dataset}@{lineage.dataset_digest[:12]}, model {lineage.config['model']}"
        f"{_tta_text(lineage.config.get('tta'))}",
        "",
        "| class | precision | recall | F1 | support |",
        "| --- | ---: | ---: | ---: | ---: |",
        *(
            f"| {r['class']} | {r['precision']:.4f} | {r['recall']:.4f} | {r['f1']:.4f} | {r['support']} |"
            for r in ev.per_class
        ),
        "",
        "![confusion matrix](confusion_matrix.png)",
        "",
        "![per class](per_class.png)",
        "",
    ]
    return "\n".join(lines)


def _tta_text(tta: object) -> str:
    """The report's note on test-time augmentation: it is inside the graph, so the figures above include it."""
    if tta != "flip":
        return ""
    return ", flip test-time augmentation (in the graph: the mean of each image's and its mirror's softmax)"


def _validation_text(ev: Evaluation) -> str:
    """The report's line on the validation split (the numbers a selection chooses on)."""
    m, v = ev.metrics, ev.validation
    if v is None or "val_accuracy" not in m:
        return "- validation: none (the run held no train images out, or this is not its dataset)"
    return (
        f"- validation (what selection chooses on): {v['images']} train images held out (fraction {v['fraction']}, "
        f"seed {v['seed']}, split {v['indices_sha256'][:12]}), accuracy {m['val_accuracy']:.2%}, "
        f"loss {m['val_loss']:.4f}, macro F1 {m['val_macro_f1']:.4f}"
    )


def log_to_mlflow(home: Path, artifact: ModelArtifact, ev: Evaluation) -> str | None:
    """Metrics (``eval.*``) and the report files to the training run's MLflow run, when it has one."""
    run_id = artifact.card.lineage.mlflow_run_id
    if not run_id:
        return None
    from mlflow.entities import Metric

    from distml import tracking

    client = tracking.mlflow_client(tracking.tracking_uri(home))
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(f"eval.{k}", float(v), now, 0) for k, v in ev.metrics.items()])
    for name in ("evaluation.md", "evaluation.json", "confusion_matrix.png", "per_class.png"):
        client.log_artifact(run_id, str(ev.folder / name), artifact_path="evaluation")
    return str(run_id)


# -- orchestration: what `distml evaluate`, `distml select` and the pipeline call ---------------------------------


def run_artifact(run_dir: Path, log: Log = print) -> ModelArtifact:
    """The run's exported artifact in ``<run>/model``, exported (with the parity check) on first use."""
    from distml.registry.artifact import open_artifact
    from distml.registry.export import export_run

    folder = run_dir / "model"
    if (folder / CARD_FILE).is_file():
        return open_artifact(folder)
    artifact, parity = export_run(run_dir, folder)
    log(f"exported {run_dir.name}: parity ok: {parity.describe()}")
    return artifact


def evaluate_target(
    workspace: Workspace, target: str, dataset: str | None = None, split: str = "test", log: Log = print
) -> tuple[ModelArtifact, Evaluation]:
    """Evaluate a training run (its exported graph) or a model (folder or ``models:/``), and log to MLflow.

    Besides ``split``, the graph is measured on the model's validation split when it has one and ``dataset`` is
    the one it was trained on (``val_*`` metrics): the same images its training run held out.
    """
    from distml.data.reader import open_path
    from distml.data.store import DatasetStore
    from distml.errors import NotFoundError
    from distml.registry.export import find_run
    from distml.registry.registry import resolve_model

    try:
        run_dir: Path | None = find_run(target, workspace)
    except NotFoundError:
        run_dir = None
    if run_dir is not None:
        artifact = run_artifact(run_dir, log)
        out = run_dir / "evaluation"
    else:
        artifact = resolve_model(target, workspace)
        out = workspace.home / "evaluations" / f"{artifact.name}-{artifact.card.version or 'local'}"
    ds = open_path(DatasetStore(workspace).resolve(dataset or artifact.card.lineage.dataset_digest[:16]))
    if split not in ds.splits:
        raise UsageError(f"dataset {ds.name} has no split {split!r}", hint=f"splits: {', '.join(ds.splits)}")
    arrays = ds.split(split).arrays()
    ev = evaluate(artifact, arrays.images, arrays.labels, out, validation_split(artifact, ds))
    log_to_mlflow(workspace.home, artifact, ev)
    return artifact, ev


@dataclass(frozen=True)
class Selection:
    choice: Choice
    artifacts: dict[str, ModelArtifact]  # by run name
    table: list[str]  # the printed table, one line each
    report: Path

    @property
    def winner(self) -> ModelArtifact:
        return self.artifacts[self.choice.winner["run"]]


def select_runs(
    workspace: Workspace,
    patterns: list[str],
    *,
    metric: str = "val_accuracy",
    direction: str = "max",
    max_latency_ms: float | None = None,
    max_params: int | None = None,
    log: Log = print,
) -> Selection:
    """Evaluate the finished runs named by ``patterns`` (names, folders or globs), choose, and record the choice.

    The choice is made on ``metric`` over each run's validation split; test accuracy is measured and shown beside
    it, marked as not used for the choice.
    """
    from distml import tracking
    from distml.errors import NotFoundError
    from distml.registry.export import find_run

    run_dirs: list[Path] = []
    for pattern in patterns:
        if any(ch in pattern for ch in "*?["):
            found = sorted(p for p in (workspace.home / "runs").glob(pattern) if (p / "job.json").is_file())
            if not found:
                raise NotFoundError(f"no training run matches {pattern!r}")
        else:
            found = [find_run(pattern, workspace)]
        run_dirs += [d for d in found if d not in run_dirs]
    check_selection_metric(metric)  # before any export or evaluation
    candidates, artifacts = [], {}
    for run_dir in run_dirs:
        if not (run_dir / "result.json").is_file():
            log(f"skipping {run_dir.name}: not finished")
            continue
        artifact, ev = evaluate_target(workspace, str(run_dir), log=log)
        recorded = json.loads((run_dir / "result.json").read_text()).get("validation")
        if recorded and ev.validation and recorded["indices_sha256"] != ev.validation["indices_sha256"]:
            raise UsageError(f"run {run_dir.name} trained with another validation split than its config gives now")
        artifacts[run_dir.name] = artifact
        settings = json.loads((run_dir / "job.json").read_text()).get("config")  # breaks a tie before the name
        candidates.append({"run": run_dir.name, **ev.metrics, "validation": ev.validation, "settings": settings})
    choice = select(
        candidates, metric=metric, direction=direction, max_latency_ms=max_latency_ms, max_params=max_params
    )
    table = selection_table(choice)
    folder = workspace.home / "selections"
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    doc = {
        "metric": metric,
        "direction": direction,
        "validation": choice.winner["validation"],  # the one split every candidate was measured on
        "test_metrics": "measured and shown, not used for the choice",
        "max_latency_ms": max_latency_ms,
        "max_params": max_params,
        "winner": choice.winner["run"],
        "rows": choice.rows,
    }
    write_atomic(folder / f"selection-{stamp}.json", (json.dumps(doc, indent=2) + "\n").encode())
    report = folder / f"selection-{stamp}.md"
    write_atomic(report, ("```\n" + "\n".join(table) + "\n```\n").encode())
    client = tracking.mlflow_client(tracking.tracking_uri(workspace.home))
    for r in choice.rows:
        run_id = artifacts[r["run"]].card.lineage.mlflow_run_id
        if run_id:
            verdict = "winner" if r is choice.winner else ("runner-up" if r["eligible"] else "excluded")
            client.set_tag(run_id, "distml.selection", f"{verdict} ({metric} {direction}, {stamp})")
    return Selection(choice, artifacts, table, report)
