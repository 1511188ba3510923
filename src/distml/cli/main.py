"""Entry point of the ``distml`` command: the root group, shared options and the one error handler."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from distml import __version__
from distml.config import DistmlConfig, WorkspaceConfig, load_config
from distml.errors import DistmlError
from distml.workspace import Workspace


@dataclass(frozen=True)
class AppContext:
    """What every subcommand receives: the resolved config and the workspace built from it."""

    config: DistmlConfig

    @property
    def workspace(self) -> Workspace:
        return Workspace(self.config.workspace.home)


def pass_app(fn: Callable[..., None]) -> Callable[..., None]:
    """Give a leaf command the AppContext, and let it take ``--home`` too (``distml data list --home X``)."""

    @click.option("--home", "leaf_home", type=click.Path(path_type=Path, file_okay=False), hidden=True)
    @click.pass_context
    @functools.wraps(fn)
    def wrapper(ctx: click.Context, /, *args: Any, leaf_home: Path | None, **kwargs: Any) -> None:
        app = ctx.find_object(AppContext)
        assert app is not None, "the root group sets the AppContext"
        if leaf_home is not None:
            home = WorkspaceConfig(home=leaf_home)
            app = AppContext(app.config.model_copy(update={"workspace": home}))
        fn(app, *args, **kwargs)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="distml")
@click.option(
    "--home",
    type=click.Path(path_type=Path, file_okay=False),
    help="Workspace folder for datasets, runs and models. [env: DISTML_HOME; default: ./.distml]",
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="A distml.toml with settings (command-line options win).",
)
@click.pass_context
def cli(ctx: click.Context, home: Path | None, config_path: Path | None) -> None:
    """distml: end-to-end distributed image classification.

    \b
    All of it in one cached command:
      distml run [--serve]     # ingest -> train candidates -> select -> register the champion
    \b
    Or step by step:
      distml data ingest fashion-mnist
      distml train --candidates cnn,cnn-dropout,cnn-batchnorm --workers 1 --run-name cand
      distml select 'cand-*' --register
      distml predict models:/fashion-mnist-classifier@champion --dataset fashion-mnist --out preds.parquet
      distml serve    # KServe V1 + V2 on http://127.0.0.1:8080
    """
    ctx.obj = AppContext(load_config(config_path, overrides={"workspace.home": home}))


def _register_commands() -> None:
    from distml.cli.data import data
    from distml.cli.k8s import k8s
    from distml.cli.models import evaluate_cmd, models, predict_cmd, select_cmd
    from distml.cli.run import run_cmd, runs
    from distml.cli.serve import serve_cmd
    from distml.cli.step import step
    from distml.cli.train import train_cmd

    cli.add_command(data)
    cli.add_command(train_cmd)
    cli.add_command(models)
    cli.add_command(predict_cmd)
    cli.add_command(evaluate_cmd)
    cli.add_command(select_cmd)
    cli.add_command(serve_cmd)
    cli.add_command(run_cmd)
    cli.add_command(runs)
    cli.add_command(step)
    cli.add_command(k8s)


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; user errors become one line on stderr and an exit code (2 usage, 1 failure)."""
    _register_commands()
    debug = bool(os.environ.get("DISTML_DEBUG"))
    try:
        code = cli.main(args=argv, prog_name="distml", standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except click.exceptions.NoArgsIsHelpError as exc:
        click.echo(exc.format_message())
        sys.exit(0)
    except click.UsageError as exc:
        where = f" (see '{exc.ctx.command_path} --help')" if exc.ctx else ""
        _fail(f"{exc.format_message()}{where}", 2)
    except click.ClickException as exc:
        _fail(exc.format_message(), exc.exit_code)
    except click.Abort:  # click's form of Ctrl-C
        _fail("interrupted", 130)
    except DistmlError as exc:
        if debug:
            raise
        message = f"{exc.message}; {exc.hint}" if exc.hint else exc.message
        _fail(message, exc.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except OSError as exc:
        # An environment problem (disk full, permissions) rather than a bug: say what and where.
        if debug:
            raise
        target = f": {exc.filename}" if exc.filename else ""
        _fail(f"{exc.strerror or exc}{target}", 1)


def _fail(message: str, code: int) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)
