"""The pipeline's DAG for a config, as the local runner's steps: ingest -> train[candidate] x N -> select -> register.

With ``search``: ingest -> search -> select [-> refit] -> register (:mod:`distml.pipeline.search_step`).

The shape (which steps, what each needs) is :func:`distml.pipeline.shape.pipeline_shape`'s, the same one
``distml k8s render`` turns into an Argo Workflow. This module only gives each node its work from
:mod:`distml.pipeline.steps`: its parameters (what its key hashes), how its input digests come from the steps
before it, how it runs and how a hit is checked.
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path
from typing import Any, assert_never

from distml.config import ClusterConfig, DistmlConfig, TrainConfig
from distml.errors import ConfigError, TrainingError
from distml.pipeline import search_step
from distml.pipeline import steps as S  # noqa: N812 (the steps, read as S.ingest_step, S.TRAIN_CODE)
from distml.pipeline.cache import Entry, verify_files
from distml.pipeline.record import trial_of
from distml.pipeline.runner import Log, Step, StepContext
from distml.pipeline.shape import Node, candidate_configs, pipeline_shape, search_shape
from distml.train.candidates import last_error, plan, start_job
from distml.workspace import Workspace

_TRACKING_SETUP = threading.Lock()


def build(
    workspace: Workspace,
    config: DistmlConfig,
    *,
    models: list[str] | None = None,
    train_overrides: dict[str, Any] | None = None,
    cores: int = 1,
    gpus: int = 0,
    node_cores: int | None = None,
    search: bool = False,
    refit: bool = False,
    log: Log = print,
) -> list[Step]:
    """The runner's steps: the nodes of the pipeline's shape (:func:`pipeline_shape`), each given its work.

    ``search`` replaces the candidates with one search step (the ``[search]`` study over ``[train]`` with the
    overrides); ``refit`` retrains the chosen trial on all of train before it is registered. ``cores`` and
    ``gpus`` are what the training jobs share: this host's, or a Ray cluster's (``node_cores``: its largest
    node's CPUs), where ``[cluster]`` sends every job's workers. The engine is in no step's key.
    """
    overrides = {**(train_overrides or {}), "dataset": "pending"}
    cluster = config.cluster if config.cluster.engine == "ray" else None  # where every job's workers run
    if search:
        base = TrainConfig.model_validate({**config.train.model_dump(), **overrides})
        if base.val_fraction <= 0:  # said before the ingest, not after it by the tuner
            raise ConfigError(
                "[train] val_fraction is 0: a search chooses on the validation split",
                hint="set val_fraction > 0 (e.g. 0.1); --refit then retrains the chosen trial on all of train",
            )
        shape, jobs = search_shape(refit=refit), {}
    else:
        configs = candidate_configs(config, models, overrides)
        shape = pipeline_shape(configs)
        where = "on the Ray cluster" if cluster is not None else "here"
        planned = plan(configs, cores, gpus, "pl", workspace.home, node_cores=node_cores, where=where)
        jobs = {job.label: job for job in planned}  # threads, cores each
    steps = []
    for node in shape.nodes:
        match node.kind:
            case "ingest":
                steps.append(ingest(workspace, config, log))
            case "train":
                job = jobs[node.label]
                steps.append(_train_step(workspace, node, job.config, job.threads, job.slots, bool(gpus), cluster))
            case "search":
                steps.append(_search_step(workspace, config, node, base, cores))
            case "select" if search:
                steps.append(_search_select_step(workspace, config, node))
            case "select":
                steps.append(_select_step(workspace, config, node))
            case "refit":
                steps.append(_refit_step(workspace, node, base, cores, node_cores, cluster))
            case "register":
                steps.append(_register_step(workspace, node))
            case _:  # a kind added to the shape without saying how it runs here
                assert_never(node.kind)
    return steps


def ingest(workspace: Workspace, config: DistmlConfig, log: Log = print) -> Step:
    """The ingest step of the config's ``[pipeline]`` dataset (its key needs only the source)."""
    source = S.make_source(workspace, config)
    p = config.pipeline
    params: dict[str, Any] = {"dataset": p.dataset, "name": p.name, "shard_bytes": config.data.shard_bytes}
    if p.dataset == "folder":
        params.update(
            image_size=list(p.image_size),
            mode=p.mode,
            test_fraction=p.test_fraction,
            on_bad_file=config.data.on_bad_file,
        )
    return Step(
        "ingest",
        (),
        S.ingest_code(source),
        S.INGEST_LIBS,
        params,
        inputs=lambda outputs, files: {"source": S.source_digest(source, log)},
        run=lambda ctx: S.ingest_step(workspace, config, source, ctx.log),
        verify=S.verify_dataset,
    )


def _select_step(workspace: Workspace, config: DistmlConfig, node: Node) -> Step:
    """Export and evaluate every candidate's run, choose one; its key covers the checkpoints it read."""
    trains = node.needs
    return Step(
        node.name,
        trains,
        S.SELECT_CODE,
        S.SELECT_LIBS,
        _select_params(config),
        inputs=lambda outputs, files: {n: files[n]["checkpoint"]["sha256"] for n in trains},
        run=lambda ctx: S.select_step(workspace, config, [ctx.upstream[n]["run_dir"] for n in trains], ctx.log),
    )


def _select_params(config: DistmlConfig) -> dict[str, Any]:
    """What a select step's choice depends on: the ``[pipeline]`` metric, its direction and the limits."""
    return config.pipeline.model_dump(mode="json", include={"metric", "direction", "max_latency_ms", "max_params"})


def _register_step(workspace: Workspace, node: Node) -> Step:
    """Register the selected model and make it champion; its key covers the ONNX file it registers."""
    (select,) = node.needs
    return Step(
        node.name,
        node.needs,
        S.REGISTER_CODE,
        S.REGISTER_LIBS,
        {},
        inputs=lambda outputs, files: {"model.onnx": files[select]["model.onnx"]["sha256"]},
        run=lambda ctx: S.register_step(workspace, Path(ctx.upstream[select]["artifact"])),
        verify=lambda outputs: S.verify_registered(workspace, outputs),
    )


def _train_step(
    workspace: Workspace,
    node: Node,
    cfg: TrainConfig,
    threads: int,
    cores: int,
    on_gpu: bool,
    cluster: ClusterConfig | None,
) -> Step:
    label = node.label
    (ingested,) = node.needs  # the ingest step: its dataset is what this candidate trains on

    def run_dir(key: str) -> Path:
        return workspace.home / "runs" / f"pl-{label}-{key[:10]}"

    def run(ctx: StepContext) -> S.StepResult:
        job_cfg = cfg.model_copy(update={"dataset": ctx.upstream[ingested]["digest"][:16]})
        folder = run_dir(ctx.key)
        note = ""
        if ctx.forced and folder.exists():
            shutil.rmtree(folder)  # forced: train from scratch, not on from this key's earlier checkpoints
            note = "trained from scratch"
        elif any((folder / "checkpoints").glob("*.pt")):
            note = "resumed the interrupted run from its last checkpoint"
        elif not ctx.forced:
            shorter = _shorter_run(ctx, cfg.epochs)
            if shorter is not None:
                S.extend_from(Path(shorter.outputs["run_dir"]), folder)
                note = f"resumed from the {shorter.parts['params']['epochs']}-epoch run {shorter.outputs['run']}"
                ctx.log(f"{note} instead of starting over")
        _train(ctx, workspace, job_cfg, folder, ctx.upstream[ingested]["dataset"], cluster)
        result = S.run_outputs(folder)
        result.note = note
        return result

    def progress(key: str) -> str:
        """The candidate's epoch and accuracies, from the files its job writes."""
        try:
            history = json.loads((run_dir(key) / "history.json").read_text())
        except (OSError, ValueError):
            return ""
        return progress_line(history, cfg.epochs)

    return Step(
        node.name,
        node.needs,
        S.TRAIN_CODE,
        S.TRAIN_LIBS,
        S.train_params(cfg),
        inputs=lambda outputs, files: {"dataset": outputs[ingested]["digest"]},
        run=run,
        cores=0 if on_gpu else cores,
        gpus=cfg.workers if on_gpu else 0,
        threads=threads,
        progress=progress,
        log_path=lambda key: run_dir(key) / "train.log",
    )


def progress_line(history: list[dict[str, Any]], epochs: int) -> str:
    """A training step's live line (``""`` before its first epoch).

    It shows the validation accuracy, what select chooses on, and the test accuracy marked as reported only.
    """
    if not history:
        return ""
    last = history[-1]
    val, test = last.get("val_accuracy"), last.get("test_accuracy")
    shown = [f"val accuracy {val:.2%}" if isinstance(val, int | float) else "no validation split"]
    if isinstance(test, int | float):
        shown.append(f"test accuracy {test:.2%} (reported only, not used to choose)")
    return f"epoch {len(history)}/{epochs}: " + ", ".join(shown)


def _train(
    ctx: StepContext,
    workspace: Workspace,
    cfg: TrainConfig,
    folder: Path,
    dataset: str,
    cluster: ClusterConfig | None = None,
) -> None:
    """Train ``cfg`` into ``folder`` (resuming its checkpoints); raise :class:`TrainingError` with the job's reason.

    With ``cluster`` (a Ray cluster) the job's process starts here and its workers run where Ray places them.
    """
    with _TRACKING_SETUP:  # concurrent jobs must not race to create the MLflow store and experiment
        from distml import tracking

        tracking.ensure_experiment(workspace.home, f"distml-{dataset}")
    proc = start_job(cfg, workspace, folder, ctx.threads, ctx.gpus, cluster=cluster)
    ctx.started(proc)
    code = proc.wait()
    if code != 0 or not (folder / "result.json").is_file():
        raise TrainingError(last_error(folder / "train.log") or f"the training process exited with {code}")


def _search_step(workspace: Workspace, config: DistmlConfig, node: Node, base: TrainConfig, cores: int) -> Step:
    """One study in place of the candidates; it holds every core (the tuner runs its trials within them)."""
    (ingested,) = node.needs
    return Step(
        node.name,
        node.needs,
        search_step.SEARCH_CODE,
        search_step.SEARCH_LIBS,
        search_step.search_params(config, base),
        inputs=lambda outputs, files: {"dataset": outputs[ingested]["digest"]},
        run=lambda ctx: search_step.run_search(
            workspace, config, base, ctx.upstream[ingested]["digest"], ctx.parts, ctx.log, forced=ctx.forced
        ),
        cores=cores,
        explain=search_step.explain_trials,
        explain_hit=search_step.explain_hit,
    )


def _search_select_step(workspace: Workspace, config: DistmlConfig, node: Node) -> Step:
    """Choose among the finished trials on the study's validation metric (the rule of ``distml select``)."""
    (searched,) = node.needs
    choosing = search_step.choosing(config)

    def run(ctx: StepContext) -> S.StepResult:
        study = ctx.upstream[searched]
        result = S.select_step(workspace, choosing, list(study["complete"]), ctx.log)
        chosen = trial_of(study, result.outputs["winner"])  # which trial won: what a refit says it retrained
        result.outputs["trial"] = chosen["number"] if chosen else None
        return result

    return Step(
        node.name,
        node.needs,
        S.SELECT_CODE,
        S.SELECT_LIBS,
        _select_params(choosing),
        inputs=lambda outputs, files: {
            "study": outputs[searched]["study"],  # the same weights in another study's runs: still run, to name them
            **{label: f["sha256"] for label, f in files[searched].items() if label.endswith(".checkpoint")},
        },
        run=run,
    )


def _refit_step(
    workspace: Workspace,
    node: Node,
    base: TrainConfig,
    cores: int,
    node_cores: int | None = None,
    cluster: ClusterConfig | None = None,
) -> Step:
    """Retrain the chosen trial's settings on all of train (no validation split), export and test it."""
    ingested, selected = node.needs

    def settings(outputs: dict[str, dict[str, Any]]) -> TrainConfig:
        return search_step.refit_config(workspace, outputs[selected]["winner"], outputs[ingested]["digest"])

    def run(ctx: StepContext) -> S.StepResult:
        folder = workspace.home / "runs" / f"pl-refit-{ctx.key[:10]}"
        if ctx.forced and folder.exists():
            shutil.rmtree(folder)  # forced: train from scratch, not on from this key's earlier checkpoints
        resumed = any((folder / "checkpoints").glob("*.pt"))
        _train(ctx, workspace, settings(ctx.upstream), folder, ctx.upstream[ingested]["dataset"], cluster)
        result = search_step.refit_outputs(workspace, folder, ctx.upstream[selected], ctx.log)
        result.note = "resumed the interrupted run from its last checkpoint" if resumed else ""
        return result

    return Step(
        node.name,
        node.needs,
        search_step.REFIT_CODE,
        search_step.REFIT_LIBS,
        {"val_fraction": 0.0},
        inputs=lambda outputs, files: {
            "dataset": outputs[ingested]["digest"],
            "settings": search_step.settings_digest(settings(outputs)),
        },
        run=run,
        cores=cores,
        # The trial's workers share the cores, as a candidate's do (on Ray: no more threads than a node has CPUs).
        threads=max(1, min(cores // base.workers, node_cores or cores)),
        log_path=lambda key: workspace.home / "runs" / f"pl-refit-{key[:10]}" / "train.log",
    )


def _shorter_run(ctx: StepContext, epochs: int) -> Entry | None:
    """The longest verified cache entry of this step that differs from this one only by fewer epochs."""
    want = ctx.parts.to_json()
    best: Entry | None = None
    for entry in ctx.runner.cache.entries(ctx.name):
        old = entry.parts
        params = dict(old.get("params", {}))
        shorter = params.pop("epochs", None)
        same = {k: v for k, v in want["params"].items() if k != "epochs"} == params
        same = same and all(old.get(k) == want[k] for k in ("code", "inputs", "libs"))
        longer_than_best = best is None or (isinstance(shorter, int) and shorter > best.parts["params"]["epochs"])
        usable = same and isinstance(shorter, int) and shorter < epochs and longer_than_best
        if usable and verify_files(entry.files) is None:
            best = entry
    return best
