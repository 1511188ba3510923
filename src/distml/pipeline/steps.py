"""The pipeline's steps: plain functions over the workspace, the same work as the ``distml`` subcommands.

=================  ===========================================  =========================================
step               what it does                                 the subcommand that does the same
=================  ===========================================  =========================================
``ingest``         verify the source files, write the store     ``distml data ingest KIND [--source]``
``train[LABEL]``   one candidate: W workers under torchrun      ``distml train --model M --run-name N``
``select``         export + evaluate every run, choose one      ``distml select RUN... --metric M``
``register``       register the winner, make it champion        ``distml models register`` / ``promote``
=================  ===========================================  =========================================

Each step also says what goes into its cache key: the root modules of its code, the libraries that change its
output, and (computed by :mod:`distml.pipeline.dag`) its parameters and input digests. A step returns a
:class:`StepResult`: the JSON outputs later steps read, and the files whose sha256 the cache records and checks
before trusting a hit.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distml.card import CARD_FILE, ONNX_FILE
from distml.config import DistmlConfig, TrainConfig
from distml.data.ingest import ingest
from distml.data.reader import open_path
from distml.data.sources.base import Log, Source
from distml.data.sources.cifar10 import Cifar10Source
from distml.data.sources.fashion_mnist import FashionMnistSource
from distml.data.sources.folder import FolderOptions, FolderSource
from distml.data.store import DatasetStore
from distml.errors import DistmlError
from distml.registry.artifact import open_artifact
from distml.registry.evaluate import select_runs
from distml.registry.registry import Registry
from distml.train.job import RESUMABLE_CHANGES
from distml.workspace import Workspace

# Each step's root modules: its code version covers them and what they import (:mod:`distml.pipeline.codever`).
INGEST_MODULE = "distml.data.ingest"  # and the module of the source it reads: see ingest_code
INGEST_LIBS = ("numpy", "pillow")
TRAIN_CODE = ("distml.train.launch", "distml.train.worker", "distml.train.candidates")
TRAIN_LIBS = ("torch", "numpy")
SELECT_CODE = ("distml.registry.evaluate",)
SELECT_LIBS = ("torch", "onnx", "onnxruntime", "numpy")
REGISTER_CODE = ("distml.registry.registry",)
REGISTER_LIBS = ("mlflow", "onnx")


@dataclass
class StepResult:
    outputs: dict[str, Any]
    files: dict[str, Path] = field(default_factory=dict)
    metric: str = ""  # the key figure for the summary table
    note: str = ""  # said after "ran:" (e.g. "resumed from a checkpoint")


# -- ingest -------------------------------------------------------------------------------------------------
def make_source(workspace: Workspace, config: DistmlConfig) -> Source:
    """The data source the ``[pipeline]`` section names (nothing read yet)."""
    p, d = config.pipeline, config.data
    if p.dataset == "folder":
        assert p.source is not None  # the config refuses a folder dataset without one
        options = FolderOptions(
            image_size=p.image_size,
            mode=p.mode,
            test_fraction=p.test_fraction,
            on_bad_file=d.on_bad_file,
            max_pixels=d.max_image_pixels,
            max_file_bytes=d.max_image_file_bytes,
        )
        return FolderSource(Path(p.source), options)
    downloads = workspace.downloads / p.dataset
    kind = FashionMnistSource if p.dataset == "fashion-mnist" else Cifar10Source
    return kind(downloads, location=p.source, timeout_s=d.download_timeout_s)


def ingest_code(source: Source) -> tuple[str, ...]:
    """The ingest step's root modules: the ingest itself and the module of the one source it reads."""
    return (INGEST_MODULE, type(source).__module__)


def source_digest(source: Source, log: Log) -> str:
    """Fetch/locate and verify the source's files, then digest their raw bytes (the ingest step's input)."""
    source.prepare(log)
    doc = {"kind": source.kind, "fingerprint": source.fingerprint()}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def ingest_step(workspace: Workspace, config: DistmlConfig, source: Source, log: Log = print) -> StepResult:
    """Ingest ``source`` into the workspace's dataset store (a version the store already holds is reused)."""
    store = DatasetStore(workspace, shard_bytes=config.data.shard_bytes)
    result = ingest(source, store=store, name=config.pipeline.name, log=log)
    ds = result.dataset
    splits = ", ".join(f"{name} {len(s):,}" for name, s in ds.splits.items())
    return StepResult(
        outputs={"dataset": ds.name, "digest": ds.digest, "path": str(ds.path)},
        files={"manifest": ds.path / "manifest.json"},
        metric=f"{ds.name}@{ds.digest[:8]}: {splits}",
        note="the store already held this version" if result.reused else "",
    )


def verify_dataset(outputs: dict[str, Any]) -> str | None:
    """A cached ingest is good only while every shard still matches the manifest."""
    try:
        ds = open_path(Path(outputs["path"]))
    except DistmlError as exc:
        return exc.message
    if ds.digest != outputs["digest"]:
        return f"{outputs['path']} now holds {ds.digest[:12]}"
    bad = ds.verify()
    return f"dataset files changed: {', '.join(bad[:3])}" if bad else None


# -- train --------------------------------------------------------------------------------------------------
def train_params(cfg: TrainConfig) -> dict[str, Any]:
    """The settings that change a training run's weights (the dataset is an input, not a parameter)."""
    ignored = (RESUMABLE_CHANGES - {"epochs"}) | {"dataset"}
    return {k: v for k, v in cfg.model_dump(mode="json").items() if k not in ignored}


def extend_from(earlier_run: Path, run_dir: Path) -> None:
    """Seed ``run_dir`` with the newest checkpoint (and history) of a shorter run of the same candidate.

    Training then resumes there (the epoch count may grow on resume) instead of starting over. A new MLflow run
    is opened for the longer job: the shorter run's stays as it was.
    """
    from distml.train.checkpoint import list_checkpoints  # here, not above: it imports torch

    newest = list_checkpoints(earlier_run / "checkpoints")[-1:]
    tmp = run_dir.with_name(f".{run_dir.name}.seeding")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "checkpoints").mkdir(parents=True)
    for path in newest:
        shutil.copy2(path, tmp / "checkpoints" / path.name)
    if (earlier_run / "history.json").is_file():
        shutil.copy2(earlier_run / "history.json", tmp / "history.json")
    shutil.rmtree(run_dir, ignore_errors=True)
    tmp.rename(run_dir)


def run_outputs(run_dir: Path) -> StepResult:
    """A finished training run as a step result: its metrics, and its final checkpoint as the output file."""
    from distml.train.checkpoint import list_checkpoints  # here, not above: it imports torch

    result = json.loads((run_dir / "result.json").read_text())
    final = list_checkpoints(run_dir / "checkpoints")[-1]
    acc, val = result.get("test_accuracy"), result.get("val_accuracy")
    shown = [f"{name} acc {v:.2%}" for name, v in (("val", val), ("test", acc)) if isinstance(v, float)]
    return StepResult(
        outputs={
            "run": run_dir.name,
            "run_dir": str(run_dir),
            "val_accuracy": val,  # what the select step chooses on
            "test_accuracy": acc,  # reported only
            "validation": result.get("validation"),
            "epochs": result.get("epochs"),
            "mlflow_run_id": result.get("mlflow_run_id"),
        },
        files={"checkpoint": final, "result": run_dir / "result.json"},
        metric=", ".join(shown),
    )


# -- select and register ------------------------------------------------------------------------------------
def select_step(workspace: Workspace, config: DistmlConfig, runs: list[str], log: Log = print) -> StepResult:
    """Export and evaluate every run, and choose the best by the ``[pipeline]`` metric (on validation) and limits.

    The winner's test accuracy is in the outputs and the summary: reported, not used for the choice.
    """
    p = config.pipeline
    selection = select_runs(
        workspace,
        runs,
        metric=p.metric,
        direction=p.direction,
        max_latency_ms=p.max_latency_ms,
        max_params=p.max_params,
        log=log,
    )
    winner, row = selection.winner, selection.choice.winner
    value, test = row[p.metric], row.get("test_accuracy")
    chosen = f"val acc {value:.2%}" if p.metric == "val_accuracy" else f"{p.metric} {value:.4f}"
    return StepResult(
        outputs={
            "winner": row["run"],
            "artifact": str(winner.path),
            "metric": p.metric,
            "value": value,
            "test_accuracy": test,  # the champion's test accuracy: reported, not used for the choice
            "validation": row.get("validation"),
            "table": selection.table,
            "report": str(selection.report),
        },
        files={ONNX_FILE: winner.onnx_path, CARD_FILE: winner.path / CARD_FILE},
        metric=f"{row['run']}: {chosen}" + (f", test acc {test:.2%}" if isinstance(test, float) else ""),
    )


def register_step(workspace: Workspace, artifact_dir: Path) -> StepResult:
    """Make the artifact the champion: promote the version that already holds it, else register a new one."""
    artifact = open_artifact(artifact_dir)
    registry = Registry(workspace)
    sha = artifact.card.onnx_sha256
    existing = None
    if any(m["name"] == artifact.name for m in registry.models()):
        existing = next((v for v in registry.versions(artifact.name) if v.tags.get("distml.onnx_sha256") == sha), None)
    if existing is not None:
        version = registry.promote(existing.name, existing.version)
        note = f"version {version.version} already held this model; made it champion"
    else:
        version = registry.register(artifact)
        note = ""
    return StepResult(
        outputs={
            "name": version.name,
            "version": version.version,
            "onnx_sha256": sha,
            "ref": f"models:/{version.name}@champion",
        },
        metric=f"{version.name} v{version.version} @champion",
        note=note,
    )


def verify_registered(workspace: Workspace, outputs: dict[str, Any]) -> str | None:
    """A cached registration is good only while the champion is still that version.

    The store is read directly first (:mod:`distml.pipeline.champion`: no MLflow import on a warm rerun); only
    when that cannot confirm it does the registry answer, and say what changed.
    """
    from distml.pipeline.champion import champion_is

    if champion_is(workspace.home, outputs["name"], str(outputs["version"])):
        return None
    try:
        current = Registry(workspace).lookup(outputs["ref"])
    except DistmlError as exc:
        return exc.message
    if current.version != outputs["version"]:
        return f"the champion of {outputs['name']} is now version {current.version}, not {outputs['version']}"
    return None
