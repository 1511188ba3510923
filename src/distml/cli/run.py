"""``distml run`` (the whole pipeline, cached) and ``distml runs`` (its records)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from distml.cli.options import (
    AppContext,
    config_option,
    config_options,
    config_path_option,
    pass_app,
    placement_option,
    ray_option,
)
from distml.config import DEFAULT_HOME
from distml.errors import UsageError


@click.command("run")
@config_path_option("A distml.toml ([pipeline], [train], [[candidates]], [serve]).")
@config_options("pipeline", "dataset", "source")
@config_option("pipeline", "candidates", metavar="MODELS", record=False)
@config_options("train", "epochs", "workers")
@click.option("--search", "search", is_flag=True, help="Search the [search] space (Optuna) in place of the candidates.")
@click.option("--refit", is_flag=True, help="With --search: retrain the chosen trial on all of train, register that.")
@config_options("search", "trials max_concurrent budget_minutes sampler pruner seed")
@click.option("--serve", "serve_", is_flag=True, help="Serve the champion at the end (Ctrl-C stops it).")
@config_option("serve", "port")
@click.option(
    "--force",
    multiple=True,
    metavar="STEP",
    help="Run STEP even on a hit (ingest, train, train[cnn], select, register); repeatable.",
)
@click.option("--no-cache", is_flag=True, help="Run every step (the results are still cached).")
@ray_option()
@placement_option()
@pass_app
def run_cmd(
    app: AppContext,
    candidates: str | None,
    search: bool,
    refit: bool,
    serve_: bool,
    force: tuple[str, ...],
    no_cache: bool,
) -> None:
    """Run the pipeline: ingest -> train the candidates (in parallel) -> select -> register (champion).

    Every step is cached by content (its code, parameters, inputs and library versions): a step whose key is
    unchanged is a verified hit, and each step says whether it hit or ran, and why. A run interrupted by
    Ctrl-C or a kill resumes where it stopped (training from its checkpoint); when only --epochs grows,
    training continues from the shorter run. Records: 'distml runs list', 'distml runs show ID'.

    With --search, one search step (the [search] study, its trials ordinary training runs chosen on the
    validation split) replaces the candidates: a rerun with more --trials continues the study, so only the new
    trials run. --refit retrains the chosen trial's settings on all of train and registers that model.

    With --ray ADDRESS the training jobs (candidates, trials, the refit) run on that Ray cluster: ingest, select
    and register stay on this host, the jobs are sized by the cluster's CPUs/GPUs, and the end lists which node
    ran each rank. The workspace must be on storage every node sees. The cache, the runs and the registry are
    the same as without --ray: switching engines alone reruns nothing.

    \b
    Examples:
      distml run --source ../shared/datasets/fashion-mnist
      distml run --epochs 8 --serve
      distml run --config distml.toml --candidates cnn,resnet-small --force train
      distml run --search --trials 12 --refit
      distml run --ray 10.0.0.1:6379 --home /shared/distml
    """
    from distml.pipeline.run import run_pipeline

    port = app.given_in("serve").get("port")
    if port is not None and not serve_:  # checked before anything runs: a bad --port must not cost a pipeline
        raise UsageError(f"--port {port} needs --serve", hint="add --serve, or leave out --port")
    _check_search_options(app, search, refit, candidates)
    models = [m.strip() for m in candidates.split(",") if m.strip()] if candidates is not None else None
    if models is not None and not models:
        raise UsageError("--candidates needs at least one model", hint="e.g. --candidates cnn,cnn-dropout")
    # --epochs and --workers apply to every candidate, over its [[candidates]] table too.
    given = app.given_in("train")
    done = run_pipeline(
        app.workspace,
        app.config,
        models=models,
        train_overrides=given,
        force=force,
        no_cache=no_cache,
        search=search,
        refit=refit,
        log=click.echo,
    )
    reg = done.champion
    if app.config.cluster.engine == "ray":
        _show_placement(app, done.id)
    click.echo(
        f"\npipeline run {done.id} done in {done.seconds:.1f} s: {reg['name']} version {reg['version']} is champion"
    )
    if not serve_:
        home = f" --home {app.config.workspace.home}" if app.config.workspace.home != DEFAULT_HOME else ""
        click.echo(f"serve it:  distml serve {reg['ref']}{home}")
        return
    _serve(app, reg["ref"])


def _show_placement(app: AppContext, run_id: str) -> None:
    """Which node ran which rank of each of the run's training jobs (their ``placement.json``, Ray's record)."""
    from distml.pipeline import record
    from distml.train.candidates import placement_lines

    steps = record.load(app.workspace.home, run_id)["steps"]
    lines = placement_lines(_job_dirs(steps))
    if lines:
        click.echo("\nwhere the jobs ran (node = the first 8 hex digits of its Ray node id):")
        click.echo("\n".join(f"  {line}" for line in lines))


def _job_dirs(steps: dict[str, dict[str, Any]]) -> list[Path]:
    """The run folders of a pipeline run's training jobs, in step order: candidates, the search's trials, refit."""
    dirs = []
    for step in steps.values():
        outputs = step.get("outputs") or {}
        if isinstance(outputs.get("run_dir"), str):
            dirs.append(Path(outputs["run_dir"]))
        table = outputs.get("table") if "study" in outputs else None  # the search step's trials (select's is text)
        dirs += [Path(t["run_dir"]) for t in table or [] if isinstance(t, dict) and isinstance(t.get("run_dir"), str)]
    return dirs


def _check_search_options(app: AppContext, search: bool, refit: bool, candidates: str | None) -> None:
    """The search's options mean something only with --search; --candidates nothing with it."""
    if search and candidates is not None:
        raise UsageError(
            "--candidates and --search exclude each other", hint="the search's models are [search.space] model"
        )
    given = [f"--{k.replace('_', '-')}" for k in app.given_in("search")] + (["--refit"] if refit else [])
    if given and not search:
        raise UsageError(f"{given[0]} needs --search", hint="add --search, or leave out " + ", ".join(given))


def _serve(app: AppContext, ref: str) -> None:
    """Serve the champion, and smoke-test it with one real request once it listens."""
    from distml.registry.registry import resolve_model
    from distml.serve.server import serve
    from distml.serve.smoke import announce_and_smoke
    from distml.serve.source import ModelSource

    artifact = resolve_model(ref, app.workspace)
    source = ModelSource(artifact.path, ref, app.workspace.home)
    serve(app.config.serve, source, announce=announce_and_smoke(app.workspace, artifact, click.echo, _warn))
    click.echo("stopped")


def _warn(line: str) -> None:
    click.echo(line, err=True)


@click.group("runs")
def runs() -> None:
    """Records of 'distml run': steps, cache decisions, timings, lineage."""


@runs.command("list")
@pass_app
def runs_list(app: AppContext) -> None:
    """Every pipeline run of the workspace, oldest first."""
    from distml.pipeline.run import listing

    lines = listing(app.workspace.home)
    click.echo("\n".join(lines) if lines else "no pipeline runs yet (distml run)")


@runs.command("show")
@click.argument("run_id", metavar="ID")
@pass_app
def runs_show(app: AppContext, run_id: str) -> None:
    """One run (an id, a unique prefix, or 'latest'): its steps, why each hit or ran, and the lineage."""
    from distml.pipeline import record

    click.echo("\n".join(record.describe(record.load(app.workspace.home, run_id))))
