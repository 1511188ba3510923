"""``distml step``: one pipeline step by itself, as an Argo Workflow's container steps run it.

Each command calls the same step function as ``distml run`` (:mod:`distml.pipeline.steps`) with the settings of
the ``--config`` file, prints what it did and, with ``--outputs DIR``, writes each output to ``DIR/<name>`` (one
value a file: how Argo reads output parameters) and all of them to ``DIR/outputs.json``.
"""

from __future__ import annotations

from pathlib import Path

import click

from distml.cli.options import AppContext, pass_app

_outputs_option = click.option(
    "--outputs", type=click.Path(path_type=Path, file_okay=False), help="Write each output to DIR/<name>."
)


@click.group("step")
def step() -> None:
    """Run one step of the pipeline by itself (what the Kubernetes workflow's containers run).

    \b
    The steps of 'distml run', one at a time:
      distml step key ingest --outputs out/    # the ingest step's cache key (Argo memoizes on it)
      distml step ingest --outputs out/        # ingest the [pipeline] dataset
      distml step select RUN... --outputs out/ # export + evaluate the runs, pick the best by [pipeline] metric
      distml step register ARTIFACT            # register the winner and make it the champion
    Training is 'distml train' (a Kubeflow TrainJob or PyTorchJob in the cluster).
    """


@step.command("key")
@click.argument("name", type=click.Choice(["ingest"]))
@_outputs_option
@pass_app
def key_cmd(app: AppContext, name: str, outputs: Path | None) -> None:
    """The cache key of step NAME, as 'distml run' computes it (the source is fetched and verified first).

    Only ingest has a key before anything runs: the later steps' keys hash the outputs of earlier ones.
    """
    from distml.pipeline import dag
    from distml.pipeline.runner import key_parts

    app.workspace.ensure()
    parts = key_parts(dag.ingest(app.workspace, app.config, log=lambda m: click.echo(f"  {m.strip()}")), {}, {})
    click.echo(f"{name} key {parts.key}")
    _write(outputs, {"key": parts.key})


@step.command("ingest")
@_outputs_option
@pass_app
def ingest_cmd(app: AppContext, outputs: Path | None) -> None:
    """Ingest the dataset of the config's [pipeline] section (dataset, source, name, folder options)."""
    from distml.pipeline import steps as S  # noqa: N812

    app.workspace.ensure()
    source = S.make_source(app.workspace, app.config)
    result = S.ingest_step(app.workspace, app.config, source, log=click.echo)
    click.echo(f"ingested {result.metric}" + (f" ({result.note})" if result.note else ""))
    _write(outputs, {**result.outputs, "digest16": result.outputs["digest"][:16]})


@step.command("select")
@click.argument("runs", nargs=-1, required=True)
@_outputs_option
@pass_app
def select_cmd(app: AppContext, runs: tuple[str, ...], outputs: Path | None) -> None:
    """Export and evaluate RUNS, and pick the best by the config's [pipeline] metric and limits."""
    from distml.pipeline import steps as S  # noqa: N812

    result = S.select_step(app.workspace, app.config, list(runs), log=click.echo)
    click.echo("\n".join(result.outputs["table"]))
    click.echo(f"selected {result.metric}")
    _write(outputs, {k: v for k, v in result.outputs.items() if k != "table"})


@step.command("register")
@click.argument("artifact", type=click.Path(path_type=Path, file_okay=False))
@_outputs_option
@pass_app
def register_cmd(app: AppContext, artifact: Path, outputs: Path | None) -> None:
    """Make the model ARTIFACT folder the champion: a new version, or the version that already holds it."""
    from distml.pipeline import steps as S  # noqa: N812

    result = S.register_step(app.workspace, artifact)
    click.echo(f"champion: {result.metric}" + (f" ({result.note})" if result.note else ""))
    _write(outputs, result.outputs)


def _write(folder: Path | None, outputs: dict[str, object]) -> None:
    if folder is not None:
        from distml.pipeline.outputs import write_outputs

        write_outputs(folder, outputs)
