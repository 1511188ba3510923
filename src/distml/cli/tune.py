"""``distml tune``: a hyperparameter search over ``[search] space``; ``distml tune show STUDY``: its trials."""

from __future__ import annotations

import signal
from types import FrameType
from typing import TYPE_CHECKING

import click

from distml.cli.options import AppContext, config_options, pass_app, placement_option, ray_option

if TYPE_CHECKING:
    from distml.search.result import StudyResult


@click.group("tune", invoke_without_command=True)
@config_options("search", "trials max_concurrent budget_minutes sampler pruner seed epochs")
@config_options("train", "dataset workers")
@click.option(
    "--study",
    metavar="NAME",
    help="The study (its storage: <home>/studies/NAME.db); the same name again continues it.  "
    "[default: <dataset>-search]",
)
@click.option(
    "--restart",
    is_flag=True,
    help="Delete the study first (its storage, trial runs, MLflow link and report), then run it anew.",
)
@ray_option()
@placement_option()
@pass_app
def tune_cmd(app: AppContext, study: str | None, restart: bool) -> None:
    """Search [train] settings with Optuna: each trial is a distml training run, pruned early when it lags.

    The space is [search] space in distml.toml: each [train] setting a list of choices or a range
    ({ low, high, log }). Every epoch a trial reports its validation metric; the pruner stops the bad ones
    (state PRUNED, the epochs used recorded). Trial N trains in <home>/runs/STUDY-tNNN. Trials listed in
    [[search.enqueue]] (a known good recipe, say) run first.

    --trials is the study's total: a larger number continues the study with only the new trials. After a
    kill, the same command resumes the interrupted trial from its checkpoint; so does it for trials that
    --budget-minutes stopped (state STOPPED). Open the study with
    optuna-dashboard sqlite:///<home>/studies/STUDY.db.

    With --ray ADDRESS the trials' workers run on that Ray cluster, as many trials at once as its CPUs (or GPUs)
    hold; the study is the same one as without --ray (its name, trials and runs), and the end lists which node
    ran each trial's ranks.

    \b
    Examples:
      distml tune --trials 16 --budget-minutes 30
      distml tune --study fm --sampler random --pruner median --max-concurrent 2
      distml tune --study fm --restart --epochs 4
      distml tune show fm
      distml tune --ray 10.0.0.1:6379 --max-concurrent 4
    """
    ctx = click.get_current_context()
    if ctx.invoked_subcommand is not None:
        return
    from distml.search.study import start_over
    from distml.search.tuner import tune

    name = study or _default_study(app)
    if restart:
        start_over(app.workspace.home, name, click.echo)
    # SIGTERM (a scheduler stopping the tuner) is an interrupt like Ctrl-C: the trials stop with their checkpoints,
    # and the study's MLflow run is ended, where the default action would just kill the tuner.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        result = tune(app.config, app.workspace, study=name)
    finally:
        signal.signal(signal.SIGTERM, previous)
    _show(result, report=True)
    if app.config.cluster.engine == "ray":
        _show_placement(result)
    if result.budget_stopped:
        ended = sum(t["state"] in ("COMPLETE", "PRUNED", "FAIL") for t in result.trials)
        click.echo(
            f"the {app.config.search.budget_minutes or 0:g}-minute budget ended the study early: {ended} of "
            f"{app.config.search.trials} trial(s) finished; run it again (a larger --budget-minutes) to continue"
        )


@tune_cmd.command("show")
@click.argument("study")
@click.option("--report/--no-report", default=True, show_default=True, help="Also write the plots and report.md.")
@pass_app
def show_cmd(app: AppContext, study: str, report: bool) -> None:
    """A table of STUDY's trials (state, params, validation metric, epochs used, time) and the best.

    With --report (the default) also the optimisation history and parameter importance plots and report.md, in
    <home>/studies/STUDY-report/ and on the study's MLflow run.
    """
    from distml.search.result import load_study_result

    _show(load_study_result(app.workspace, study), report=report)


def _show(result: StudyResult, *, report: bool) -> None:
    from distml.search.report import trial_table, write_report

    click.echo(trial_table(result))
    if report and result.trials:
        files = write_report(result)
        click.echo(f"report: {', '.join(str(f) for f in files)}")


def _show_placement(result: StudyResult) -> None:
    """Which node ran which rank of each trial (its run's ``placement.json``, written by a Ray job)."""
    from pathlib import Path

    from distml.train.candidates import placement_lines

    lines = placement_lines(Path(t["run_dir"]) for t in result.trials if t["run_dir"])
    if lines:
        click.echo("where the trials ran (node = the first 8 hex digits of its Ray node id):")
        click.echo("\n".join(f"  {line}" for line in lines))


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _default_study(app: AppContext) -> str:
    """``<dataset>-search``, by the dataset's name in the store (the config may give a digest prefix)."""
    from distml.data.reader import open_path
    from distml.data.store import DatasetStore
    from distml.search.study import default_study_name

    return default_study_name(open_path(DatasetStore(app.workspace).resolve(app.config.train.dataset)).name)
