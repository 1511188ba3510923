"""Evaluate a model artifact on a dataset split, and select the best of several candidates.

Evaluation runs the exported ONNX graph (what will be served, not the PyTorch weights) over the whole split and
reports accuracy, loss, per-class precision / recall / F1, the confusion matrix (PNG), a per-class bar chart
(PNG) and the graph's latency at batch 1 and batch 64. The report (``evaluation.md`` + ``evaluation.json`` and
the two PNGs) lands in a folder, and everything is logged to the training run's MLflow run.

Selection ranks candidates by a declared metric and direction, after optional constraints (latency, parameter
count). Ties go to fewer parameters, then lower batch-1 latency, then the run name, so the choice is
deterministic. The decision and the whole table are written as a report and as MLflow tags on every candidate.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypedDict

import numpy as np

from distml.card import CARD_FILE, INPUT_NAME, PROBABILITIES
from distml.errors import UsageError
from distml.files import write_atomic
from distml.registry.artifact import ModelArtifact, probabilities
from distml.workspace import Workspace

if TYPE_CHECKING:
    from onnxruntime import InferenceSession

    from distml.data.sources.base import Log

EVAL_BATCH = 128
LATENCY_REPEATS = 50


ClassScores = TypedDict("ClassScores", {"class": str, "precision": float, "recall": float, "f1": float, "support": int})


@dataclass(frozen=True)
class Evaluation:
    metrics: dict[str, float]
    per_class: list[ClassScores]
    confusion: np.ndarray
    folder: Path

    def to_json(self) -> dict[str, object]:
        return {"metrics": self.metrics, "per_class": self.per_class, "confusion": self.confusion.tolist()}


def evaluate(artifact: ModelArtifact, images: np.ndarray, labels: np.ndarray, out: Path) -> Evaluation:
    """Run the graph over ``images`` and write the report into ``out`` (created if missing)."""
    if images.shape[1:] != artifact.image_shape:
        raise UsageError(f"the images are {images.shape[1:]}, the model takes {artifact.image_shape}")
    session = artifact.session()
    k = len(artifact.class_names)
    probs = probabilities(session, images, EVAL_BATCH)
    labels = np.asarray(labels, dtype=np.int64)
    pred = probs.argmax(1)
    confusion = np.bincount(labels * k + pred, minlength=k * k).reshape(k, k)  # rows: true, columns: predicted
    per_class: list[ClassScores] = []
    for c, name in enumerate(artifact.class_names):
        tp = int(confusion[c, c])
        precision = tp / max(1, int(confusion[:, c].sum()))
        recall = tp / max(1, int(confusion[c, :].sum()))
        f1 = 2 * precision * recall / max(1e-12, precision + recall)
        per_class.append(
            {"class": name, "precision": precision, "recall": recall, "f1": f1, "support": int(confusion[c, :].sum())}
        )
    metrics = {
        "test_accuracy": float((pred == labels).mean()),
        "test_loss": float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)).mean()),
        "macro_f1": float(np.mean([r["f1"] for r in per_class])),
        "latency_b1_ms": _latency_ms(session, images, 1),
        "latency_b64_ms": _latency_ms(session, images, 64),
        "parameters": float(artifact.card.metrics.parameters or 0),
        "images": float(len(labels)),
    }
    out.mkdir(parents=True, exist_ok=True)
    evaluation = Evaluation(metrics, per_class, confusion, out)
    _plots(evaluation, artifact.class_names)
    write_atomic(out / "evaluation.json", (json.dumps(evaluation.to_json(), indent=2) + "\n").encode())
    write_atomic(out / "evaluation.md", _markdown(artifact, evaluation).encode())
    return evaluation


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
        f"- ONNX Runtime latency (median of {LATENCY_REPEATS}): batch 1 {m['latency_b1_ms']:.3f} ms, "
        f"batch 64 {m['latency_b64_ms']:.3f} ms",
        f"- dataset {lineage.dataset}@{lineage.dataset_digest[:12]}, model {lineage.config['model']}",
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


@dataclass(frozen=True)
class Choice:
    rows: list[dict[str, Any]]  # every candidate, ranked, with "eligible" and "reason"
    winner: dict[str, Any]
    metric: str
    direction: str


def select(
    candidates: list[dict[str, Any]],
    *,
    metric: str = "test_accuracy",
    direction: str = "max",
    max_latency_ms: float | None = None,
    max_params: int | None = None,
) -> Choice:
    """Rank ``candidates`` (dicts with ``run`` and the evaluation metrics) and pick the best eligible one."""
    if direction not in ("max", "min"):
        raise UsageError(f"direction {direction!r} is not max or min")
    if not candidates:
        raise UsageError("no candidates to select from")
    if metric not in candidates[0]:
        known = ", ".join(sorted(k for k, v in candidates[0].items() if isinstance(v, float)))
        raise UsageError(f"unknown metric {metric!r}", hint=f"one of {known}")
    rows = []
    for c in candidates:
        reasons = []
        if max_latency_ms is not None and c["latency_b1_ms"] > max_latency_ms:
            reasons.append(f"batch-1 latency {c['latency_b1_ms']:.3f} ms > {max_latency_ms} ms")
        if max_params is not None and c["parameters"] > max_params:
            reasons.append(f"{int(c['parameters']):,} parameters > {max_params:,}")
        rows.append({**c, "eligible": not reasons, "reason": "; ".join(reasons)})
    sign = -1.0 if direction == "max" else 1.0
    rows.sort(key=lambda r: (not r["eligible"], sign * r[metric], r["parameters"], r["latency_b1_ms"], r["run"]))
    if not rows[0]["eligible"]:
        raise UsageError("no candidate meets the constraints: " + "; ".join(f"{r['run']}: {r['reason']}" for r in rows))
    return Choice(rows, rows[0], metric, direction)


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
    """Evaluate a training run (its exported graph) or a model (folder or ``models:/``), and log to MLflow."""
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
    ev = evaluate(artifact, arrays.images, arrays.labels, out)
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
    metric: str = "test_accuracy",
    direction: str = "max",
    max_latency_ms: float | None = None,
    max_params: int | None = None,
    log: Log = print,
) -> Selection:
    """Evaluate the finished runs named by ``patterns`` (names, folders or globs), choose, and record the choice."""
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
    candidates, artifacts = [], {}
    for run_dir in run_dirs:
        if not (run_dir / "result.json").is_file():
            log(f"skipping {run_dir.name}: not finished")
            continue
        artifact, ev = evaluate_target(workspace, str(run_dir), log=log)
        artifacts[run_dir.name] = artifact
        candidates.append({"run": run_dir.name, **ev.metrics})
    choice = select(
        candidates, metric=metric, direction=direction, max_latency_ms=max_latency_ms, max_params=max_params
    )
    table = [f"{'RUN':<32} {metric:>14} {'PARAMS':>10} {'B1 MS':>7}  DECISION"]
    for r in choice.rows:
        decision = "winner" if r is choice.winner else ("eligible" if r["eligible"] else f"excluded: {r['reason']}")
        table.append(
            f"{r['run']:<32} {r[metric]:>14.4f} {int(r['parameters']):>10,} {r['latency_b1_ms']:>7.3f}  {decision}"
        )
    folder = workspace.home / "selections"
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    doc = {
        "metric": metric,
        "direction": direction,
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
