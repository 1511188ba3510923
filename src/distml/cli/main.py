"""Entry point of the ``distml`` command: the root group and the one error handler."""

from __future__ import annotations

import os
import sys

import click
from pydantic import ValidationError

from distml import __version__
from distml._proc import skip_final_collection
from distml.cli.data import data
from distml.cli.k8s import k8s
from distml.cli.models import evaluate_cmd, models, predict_cmd, select_cmd
from distml.cli.options import config_option, config_path_option
from distml.cli.run import run_cmd, runs
from distml.cli.serve import serve_cmd
from distml.cli.step import step
from distml.cli.train import train_cmd
from distml.cli.tune import tune_cmd
from distml.config import config_error
from distml.errors import DistmlError


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="distml")
@config_option("workspace", "home")
@config_path_option("A distml.toml with settings (command-line options win).")
def cli() -> None:
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


for _command in (data, train_cmd, models, predict_cmd, evaluate_cmd, select_cmd, serve_cmd, run_cmd, runs, step, k8s):
    cli.add_command(_command)
cli.add_command(tune_cmd)


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; user errors become one line on stderr and an exit code (2 usage, 1 failure).

    As the program (no ``argv``), the process then ends without Python's last garbage collection
    (:func:`distml._proc.skip_final_collection`); called with ``argv`` (tests), it leaves the caller's as it is.
    """
    try:
        _main(argv)
    finally:
        if argv is None:
            skip_final_collection()


def _main(argv: list[str] | None) -> None:
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
    except ValidationError as exc:  # settings checked past load_config (a stage's own model): the same one line
        if debug:
            raise
        _fail(config_error(exc).message, 2)
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
