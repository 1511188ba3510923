"""``distml run`` (the whole pipeline, cached) and ``distml runs`` (its records)."""

from __future__ import annotations

import threading
import time

import click

from distml.cli.options import AppContext, config_option, config_options, config_path_option, pass_app
from distml.config import DEFAULT_HOME
from distml.errors import PipelineError, UsageError


@click.command("run")
@config_path_option("A distml.toml ([pipeline], [train], [[candidates]], [serve]).")
@config_options("pipeline", "dataset", "source")
@config_option("pipeline", "candidates", metavar="MODELS", record=False)
@config_options("train", "epochs", "workers")
@click.option("--serve", "serve_", is_flag=True, help="Serve the champion at the end (Ctrl-C stops it).")
@config_option("serve", "port")
@click.option(
    "--force", multiple=True, metavar="STEP",
    help="Run STEP even on a hit (ingest, train, train[cnn], select, register); repeatable.",
)  # fmt: skip
@click.option("--no-cache", is_flag=True, help="Run every step (the results are still cached).")
@pass_app
def run_cmd(app: AppContext, candidates: str | None, serve_: bool, force: tuple[str, ...], no_cache: bool) -> None:
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

    port = app.given_in("serve").get("port")
    if port is not None and not serve_:  # checked before anything runs: a bad --port must not cost a pipeline
        raise UsageError(f"--port {port} needs --serve", hint="add --serve, or leave out --port")
    models = [m.strip() for m in candidates.split(",") if m.strip()] if candidates is not None else None
    if models is not None and not models:
        raise UsageError("--candidates needs at least one model", hint="e.g. --candidates cnn,cnn-dropout")
    # --epochs and --workers apply to every candidate, over its [[candidates]] table too.
    train_overrides = app.given_in("train")
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
    if not serve_:
        home = f" --home {workspace.home}" if app.config.workspace.home != DEFAULT_HOME else ""
        click.echo(f"serve it:  distml serve {reg['ref']}{home}")
        return
    _serve(app, reg["ref"])


def _serve(app: AppContext, ref: str) -> None:
    """Serve the champion, and smoke-test it with one real request once it listens."""
    from distml.registry.registry import resolve_model
    from distml.serve.server import serve
    from distml.serve.smoke import sample_image, smoke_request

    artifact = resolve_model(ref, app.workspace)

    def smoke(base_url: str) -> None:
        line = smoke_request(base_url, artifact, *sample_image(app.workspace, artifact))
        if line is None:
            click.echo("smoke prediction: no answer from the server", err=True)
        else:
            click.echo(f"{line}; Ctrl-C stops the server")

    def announce(line: str) -> None:
        click.echo(line)
        if line.startswith("listening on "):
            threading.Thread(target=smoke, args=(line.split()[-1],), daemon=True).start()

    serve(app.config.serve, artifact.path, announce=announce)
    click.echo("stopped")


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
