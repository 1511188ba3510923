"""``distml run`` (the whole pipeline, cached) and ``distml runs`` (its records)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import click
from pydantic import ValidationError

from distml.cli.main import AppContext, pass_app
from distml.config import DEFAULT_HOME, ServeConfig, TrainConfig, _config_error, load_config
from distml.errors import PipelineError, UsageError


@click.command("run")
@click.option("--config", "config_path", type=click.Path(path_type=Path, dir_okay=False),
              help="A distml.toml ([pipeline], [train], [[candidates]], [serve]).")  # fmt: skip
@click.option("--dataset", type=click.Choice(["fashion-mnist", "cifar10", "folder"]),
              help="What to ingest. [default: fashion-mnist]")  # fmt: skip
@click.option("--source", help="A local folder or mirror URL of the dataset's files (folder: the image folder).")
@click.option("--candidates", metavar="MODELS", help="Comma-separated models. [default: cnn,cnn-dropout,cnn-batchnorm]")
@click.option("--epochs", type=int, help="Epochs of every candidate. [default: 5]")
@click.option("--workers", type=int, help="DDP workers of every candidate. [default: 2]")
@click.option("--serve", "serve_", is_flag=True, help="Serve the champion at the end (Ctrl-C stops it).")
@click.option("--port", type=int, help="With --serve. [default: 8080]")
@click.option(
    "--force", multiple=True, metavar="STEP",
    help="Run STEP even on a hit (ingest, train, train[cnn], select, register); repeatable.",
)  # fmt: skip
@click.option("--no-cache", is_flag=True, help="Run every step (the results are still cached).")
@pass_app
def run_cmd(
    app: AppContext, config_path: Path | None, dataset: str | None, source: str | None, candidates: str | None,
    epochs: int | None, workers: int | None, serve_: bool, port: int | None, force: tuple[str, ...], no_cache: bool,
) -> None:  # fmt: skip
    """Run the pipeline: ingest -> train the candidates (in parallel) -> select -> register (champion).

    Every step is cached by content (its code, parameters, inputs and library versions): a step whose key is
    unchanged is a verified hit, and each step says whether it hit or ran, and why. A run interrupted by
    Ctrl-C or a kill resumes where it stopped (training from its checkpoint); when only --epochs grows,
    training continues from the shorter run. Records: 'distml runs list', 'distml runs show ID'.

    \b
    Examples:
      distml run --source ../shared/datasets/fashion-mnist
      distml run --epochs 8 --serve
      distml run --config distml.toml --candidates cnn,resnet-small --force train
    """
    from distml.pipeline import dag, record
    from distml.pipeline.runner import Runner, workspace_lock
    from distml.train.dist import gpu_count, usable_cores

    if config_path is not None:
        home = app.config.workspace.home
        app = AppContext(load_config(config_path, overrides={"workspace.home": None if home == DEFAULT_HOME else home}))
    pipeline_overrides = {k: v for k, v in {"dataset": dataset, "source": source}.items() if v is not None}
    if pipeline_overrides:
        raw = {**app.config.pipeline.model_dump(), **pipeline_overrides}
        try:
            pipeline = type(app.config.pipeline).model_validate(raw)
        except ValidationError as exc:
            raise _config_error(exc, source="command line") from None
        app = AppContext(app.config.model_copy(update={"pipeline": pipeline}))
    train_overrides = {k: v for k, v in {"epochs": epochs, "workers": workers}.items() if v is not None}
    try:
        TrainConfig.model_validate({**app.config.train.model_dump(), **train_overrides})
    except ValidationError as exc:
        raise _config_error(exc, source="command line") from None
    serve_config = _serve_config(app, serve_, port)  # before anything runs: a bad --port must not cost a pipeline
    models = [m.strip() for m in candidates.split(",") if m.strip()] if candidates is not None else None
    if models is not None and not models:
        raise UsageError("--candidates needs at least one model", hint="e.g. --candidates cnn,cnn-dropout")
    workspace = app.workspace
    workspace.ensure()
    cores, gpus = usable_cores(), gpu_count()

    with workspace_lock(workspace.home):
        steps = dag.build(workspace, app.config, models=models, train_overrides=train_overrides, cores=cores,
                          gpus=gpus, log=lambda m: click.echo(f"  ingest: {m.strip()}"))  # fmt: skip
        names = [s.name for s in steps]
        unknown = [f for f in force if f not in names and f not in {n.split("[")[0] for n in names}]
        if unknown:
            raise UsageError(f"--force {unknown[0]}: no such step", hint=f"steps: {', '.join(names)}")
        runner = Runner(steps, home=workspace.home, config=app.config.model_dump(mode="json"), force=set(force),
                        no_cache=no_cache, cores=cores, gpus=gpus)  # fmt: skip
        started = time.perf_counter()
        click.echo(f"pipeline run {runner.id}: {len(steps)} steps, workspace {workspace.home}, "
                   f"{gpus or cores} {'GPU(s)' if gpus else 'cores'}")  # fmt: skip
        try:
            outcomes = runner.execute()
        except KeyboardInterrupt:
            click.echo(f"\ninterrupted; run the same command again to resume (record: {runner.dir / 'run.json'})")
            raise
        took = time.perf_counter() - started
    click.echo("")
    click.echo("\n".join(record.summary_table(runner.record["steps"])))
    unfinished = [n for n, o in outcomes.items() if o.status != "done"]
    if unfinished:  # the champion exists only if every step finished: name the first that failed
        name = next((n for n in unfinished if outcomes[n].status == "failed"), unfinished[0])
        first = outcomes[name]
        raise PipelineError(
            f"step {name} {first.status} after {took:.1f} s: {first.error or first.why}",
            hint=(f"log: {first.log}; " if first.log else "") + f"record: {runner.dir / 'run.json'}",
        )
    reg = outcomes["register"].outputs
    click.echo(f"\npipeline run {runner.id} done in {took:.1f} s: {reg['name']} version {reg['version']} is champion")
    if serve_config is None:
        click.echo(f"serve it:  distml serve {reg['ref']}" + (f" --home {workspace.home}" if app.config.workspace.home
                                                              != DEFAULT_HOME else ""))  # fmt: skip
        return
    _serve(app, reg["ref"], serve_config)


def _serve_config(app: AppContext, serve_: bool, port: int | None) -> ServeConfig | None:
    """The server's config with the command line's --port, validated; None without --serve."""
    if not serve_:
        if port is not None:
            raise UsageError(f"--port {port} needs --serve", hint="add --serve, or leave out --port")
        return None
    try:
        return ServeConfig.model_validate({**app.config.serve.model_dump(), **({} if port is None else {"port": port})})
    except ValidationError as exc:
        raise _config_error(exc, source="command line") from None


def _serve(app: AppContext, ref: str, config: ServeConfig) -> None:
    from distml.registry.registry import resolve_model
    from distml.serve.server import serve

    artifact = resolve_model(ref, app.workspace)

    def announce(line: str) -> None:
        click.echo(line)
        if line.startswith("listening on "):
            base = line.split()[-1]
            threading.Thread(target=_smoke, args=(base, artifact), daemon=True).start()

    serve(config, artifact.path, announce=announce)
    click.echo("stopped")


def _smoke(base: str, artifact: Any) -> None:
    """One real V2 request against the server that just started: the first test image of its dataset."""
    import urllib.request

    import numpy as np

    from distml.data import DatasetStore, open_path
    from distml.workspace import Workspace

    try:
        home = Path(artifact.card["lineage"].get("dataset_path", "")).parents[1]
        ds = open_path(DatasetStore(Workspace(home)).resolve(artifact.card["lineage"]["dataset_digest"][:16]))
        split = ds.splits.get("test") or ds.splits["train"]
        arrays = split.arrays()
        image, label = np.asarray(arrays.images[0]), int(arrays.labels[0])
    except Exception:  # no dataset at hand: a blank image still proves the server answers
        image, label = np.zeros(artifact.image_shape, dtype=np.uint8), -1
    body = {"id": "smoke-1", "inputs": [{"name": "images", "shape": [1, *image.shape], "datatype": "UINT8",
                                          "data": image.reshape(-1).tolist()}]}  # fmt: skip
    request = urllib.request.Request(f"{base}/v2/models/{artifact.name}/infer", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    for _ in range(50):
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                doc = json.loads(response.read())
            break
        except OSError:
            time.sleep(0.2)
    else:
        click.echo("smoke prediction: no answer from the server", err=True)
        return
    outputs = {o["name"]: o["data"] for o in doc["outputs"]}
    probs = outputs.get("probabilities") or []
    top = int(np.argmax(probs)) if probs else -1
    names = artifact.class_names
    truth = f" (label: {names[label]})" if 0 <= label < len(names) else ""
    click.echo(f"smoke prediction: test image 0 -> {names[top] if 0 <= top < len(names) else top} "
               f"p={max(probs) if probs else 0:.3f}{truth}; Ctrl-C stops the server")  # fmt: skip


@click.group("runs")
def runs() -> None:
    """Records of 'distml run': steps, cache decisions, timings, lineage."""


@runs.command("list")
@pass_app
def runs_list(app: AppContext) -> None:
    """Every pipeline run of the workspace, oldest first."""
    from distml.pipeline import record

    docs = record.list_records(app.workspace.home)
    if not docs:
        click.echo("no pipeline runs yet (distml run)")
        return
    click.echo(f"{'RUN':<24} {'STATUS':<12} {'TOOK':>8}  {'RAN':>3} {'HIT':>3}  CHAMPION")
    for d in docs:
        steps = d.get("steps", {})
        ran = sum(s.get("cache") == "ran" and s.get("status") == "done" for s in steps.values())
        hit = sum(s.get("cache") == "hit" for s in steps.values())
        took = (d.get("ended") or time.time()) - d["started"]
        model = (d.get("lineage") or {}).get("model")
        champion = f"{model['name']} v{model['version']}" if model else "-"
        click.echo(f"{d['id']:<24} {d['status']:<12} {took:>7.1f}s  {ran:>3} {hit:>3}  {champion}")


@runs.command("show")
@click.argument("run_id", metavar="ID")
@pass_app
def runs_show(app: AppContext, run_id: str) -> None:
    """One run (an id, a unique prefix, or 'latest'): its steps, why each hit or ran, and the lineage."""
    from distml.pipeline import record

    click.echo("\n".join(record.describe(record.load(app.workspace.home, run_id))))
