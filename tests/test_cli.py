"""The ``distml`` command: help everywhere, one-line errors with exit codes, and the data subcommands."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest

from conftest import SHARED_FASHION, make_image_folder, requires_fashion, run_cli
from distml import __version__


def _assert_one_line_error(err: str, *needles: str) -> None:
    """The error is one line, the last on stderr (progress lines may come before it), with no traceback."""
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors == [lines[-1]], err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in errors[0]


@pytest.mark.parametrize(
    "args", [[], ["data"], ["data", "ingest"], ["data", "list"], ["data", "show"], ["data", "verify"], ["train"]]
)
def test_help_at_every_level(args: list[str]) -> None:
    result = run_cli(*args, "--help")
    assert result.code == 0
    assert result.out.startswith("Usage: distml")


def test_version() -> None:
    result = run_cli("--version")
    assert (result.code, result.out.strip()) == (0, f"distml, version {__version__}")


def test_the_program_ends_without_pythons_last_collection_and_a_library_call_keeps_it() -> None:
    """As a process's entry point, main() freezes the heap (skip_final_collection: ~2-5 s of a heavy process's
    exit); called with argv, as tests do, it leaves the caller's collector alone."""
    code = (
        "import atexit, gc, sys; from distml.cli.main import main\n"
        "atexit.register(lambda: print('frozen', gc.get_freeze_count() > 0, flush=True))\n"
        "try:\n    main(['--version'])\nexcept SystemExit:\n    print('library', gc.get_freeze_count() > 0)\n"
        "main()\n"
    )
    done = subprocess.run([sys.executable, "-c", code, "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "library False" in done.stdout and done.stdout.rstrip().endswith("frozen True")


def test_unknown_dataset_name_is_a_usage_error(home: Path) -> None:
    result = run_cli("--home", home, "data", "ingest", "mnist")
    assert result.code == 2
    _assert_one_line_error(result.err, "'mnist' is not one of 'fashion-mnist', 'cifar10', 'folder'", "--help")


def test_unknown_ref_is_a_usage_error_naming_the_fix(home: Path) -> None:
    result = run_cli("data", "show", "nope", "--home", home)
    assert result.code == 2
    _assert_one_line_error(result.err, "no dataset 'nope'", "distml data list")


def test_unwritable_workspace(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    images = make_image_folder(tmp_path / "pets", per_class=2)
    result = run_cli("--home", blocker / "ws", "data", "ingest", "folder", images)
    assert result.code == 1
    _assert_one_line_error(result.err, f"workspace folder {blocker / 'ws'}", "--home DIR or set DISTML_HOME")


def test_folder_needs_a_path_and_others_refuse_one(home: Path) -> None:
    result = run_cli("--home", home, "data", "ingest", "folder")
    assert result.code == 2
    _assert_one_line_error(result.err, "needs the image folder")
    result = run_cli("--home", home, "data", "ingest", "cifar10", "/some/dir")
    assert result.code == 2
    _assert_one_line_error(result.err, "takes no PATH", "--source /some/dir")


def test_bad_option_value_is_a_usage_error(home: Path, tmp_path: Path) -> None:
    result = run_cli("--home", home, "data", "ingest", "folder", tmp_path, "--image-size", "big")
    assert result.code == 2
    _assert_one_line_error(result.err, "'big' is not HxW")


def test_missing_local_source_says_where_to_put_files(home: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = run_cli("--home", home, "data", "ingest", "cifar10", "--source", tmp_path / "empty")
    assert result.code == 1
    _assert_one_line_error(result.err, "lacks cifar-10-binary.tar.gz", "put the files")


def test_folder_ingest_list_show_verify(home: Path, tmp_path: Path) -> None:
    images = make_image_folder(tmp_path / "pets")
    result = run_cli("data", "ingest", "folder", images, "--image-size", "16x16", "--mode", "L", "--home", home)
    assert result.code == 0, result.err
    assert result.out.startswith("pets@") and "ingested in" in result.out and "16x16x1, 3 classes" in result.out
    again = run_cli("data", "ingest", "folder", images, "--image-size", "16x16", "--mode", "L", "--home", home)
    assert "already ingested, reused" in again.out

    listing = run_cli("data", "list", "--home", home)
    assert listing.code == 0
    header, row = listing.out.strip().splitlines()
    assert header.split()[:3] == ["NAME", "DIGEST", "SHAPE"] and row.split()[:3][0] == "pets"

    show = run_cli("data", "show", "pets", "--home", home)
    assert show.code == 0 and "dataset   pets" in show.out and "cat" in show.out
    digest = json.loads(run_cli("data", "show", "pets", "--json", "--home", home).out)["digest"]
    assert run_cli("data", "show", digest[:6], "--home", home).code == 0

    verify = run_cli("data", "verify", "pets", "--home", home)
    assert verify.code == 0 and "all 4 files match" in verify.out

    shard = next((home / "datasets" / digest).glob("train-*-images.npy"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    verify = run_cli("data", "verify", "pets", "--home", home)
    assert verify.code == 1
    assert f"BAD {shard.name}" in verify.err
    assert verify.err.strip().splitlines()[-1].startswith("error: pets@")


def test_edited_manifest_fails_show_with_one_line(home: Path, tmp_path: Path) -> None:
    images = make_image_folder(tmp_path / "pets", per_class=3)
    assert run_cli("data", "ingest", "folder", images, "--home", home).code == 0
    manifest = next((home / "datasets").glob("*/manifest.json"))
    manifest.write_text(manifest.read_text().replace('"cat"', '"lion"'))
    result = run_cli("data", "show", "pets", "--home", home)
    assert result.code == 1
    _assert_one_line_error(result.err, "edited by hand", "re-ingest")
    listing = run_cli("data", "list", "--home", home)
    assert "damaged" in listing.out


def test_env_and_config_file_set_the_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images = make_image_folder(tmp_path / "pets", per_class=2)
    monkeypatch.setenv("DISTML_HOME", str(tmp_path / "from-env"))
    assert run_cli("data", "ingest", "folder", images).code == 0
    assert (tmp_path / "from-env" / "datasets").is_dir()
    config = tmp_path / "distml.toml"
    config.write_text('[data]\non_bad_file = "sometimes"\n')
    result = run_cli("--config", config, "data", "list")
    assert result.code == 2
    _assert_one_line_error(result.err, "data.on_bad_file='sometimes'", "'fail' or 'skip'")


@requires_fashion
def test_real_fashion_mnist_ingest(home: Path) -> None:
    result = run_cli("--home", home, "data", "ingest", "fashion-mnist", "--source", SHARED_FASHION)
    assert result.code == 0, result.err
    assert "60000 train / 10000 test, 28x28x1, 10 classes" in result.out
    from distml.data import open_dataset

    ds = open_dataset("fashion-mnist", home=home)
    assert ds.manifest.stats["mean"][0] == pytest.approx(0.2860, abs=5e-5)
    assert ds.manifest.stats["std"][0] == pytest.approx(0.3530, abs=5e-4)
    assert ds.class_names[0] == "T-shirt/top" and ds.class_names[-1] == "Ankle boot"
    assert ds.verify() == []
    again = run_cli("--home", home, "data", "ingest", "fashion-mnist", "--source", SHARED_FASHION)
    assert "already ingested, reused" in again.out


@requires_fashion
def test_sigkill_midway_leaves_nothing_visible_and_the_next_ingest_succeeds(home: Path) -> None:
    datasets = home / "datasets"
    cmd = [sys.executable, "-m", "distml", "--home", str(home), "data", "ingest", "fashion-mnist"]
    proc = subprocess.Popen([*cmd, "--source", str(SHARED_FASHION)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        # Kill once shard writing has begun: the temp folder holds a file but nothing is published yet.
        while time.monotonic() < deadline and proc.poll() is None:
            temps = list(datasets.glob(".tmp-*/*.npy")) if datasets.is_dir() else []
            if temps:
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.002)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the ingest finished before it could be killed midway"
    assert list(datasets.glob(".tmp-*")), "the kill should have left a temp folder behind"
    assert [p for p in datasets.iterdir() if not p.name.startswith(".")] == []
    assert "no datasets" in run_cli("--home", home, "data", "list").out

    result = run_cli("--home", home, "data", "ingest", "fashion-mnist", "--source", SHARED_FASHION)
    assert result.code == 0, result.err
    assert list(datasets.glob(".tmp-*")) == []
    assert run_cli("--home", home, "data", "verify", "fashion-mnist").code == 0


def test_cli_subprocess_prints_no_traceback(tmp_path: Path) -> None:
    exe = shutil.which("distml") or ""
    cmd = [exe] if exe else [sys.executable, "-m", "distml"]
    proc = subprocess.run(
        [*cmd, "--home", str(tmp_path), "data", "show", "x"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 2
    _assert_one_line_error(proc.stderr, "no dataset 'x'")


def test_non_ascii_dataset_name_is_refused(home: Path, tmp_path: Path) -> None:
    images = make_image_folder(tmp_path / "pets", per_class=2)
    result = run_cli("--home", home, "data", "ingest", "folder", images, "--name", "\uff44\uff41\uff54\uff41")
    assert result.code == 2
    _assert_one_line_error(result.err, "is not allowed", "letters, digits")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--serve", "--port", "99999"], "invalid config value port=99999 in command line"),
        (["--serve", "--port", "-1"], "invalid config value port=-1 in command line"),
        (["--port", "9000"], "--port 9000 needs --serve"),
    ],
)
def test_run_refuses_bad_serve_options_before_the_pipeline_starts(
    home: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    """A port the server could never bind must not cost a whole pipeline first (and a traceback after it)."""
    images = make_image_folder(tmp_path / "pets", per_class=4)
    fast = ["--dataset", "folder", "--source", str(images), "--candidates", "cnn", "--epochs", "1", "--workers", "1"]
    result = run_cli("--home", home, "run", *fast, *args)
    assert result.code == 2, result.out + result.err
    _assert_one_line_error(result.err, message)
    assert "pipeline run" not in result.out
    assert not (home / "pipeline").exists() and not (home / "datasets").exists()  # nothing ran, nothing written


def _leaf_commands() -> list[tuple[list[str], click.Command]]:
    """Every command that runs something, with its path under ``distml``."""
    from distml.cli.main import cli

    found: list[tuple[list[str], click.Command]] = []

    def walk(path: list[str], command: click.Command) -> None:
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                walk([*path, name], sub)
        else:
            found.append((path, command))

    walk([], cli)
    return found


@pytest.mark.parametrize(
    ("path", "command"), _leaf_commands(), ids=lambda p: " ".join(p) if isinstance(p, list) else "-"
)
def test_help_shows_every_default_and_config_options_take_theirs_from_the_config(
    path: list[str], command: click.Command
) -> None:
    """An option's default in --help is the config field's own, so the two cannot drift apart."""
    from distml.cli.options import ConfigOption, default_text

    result = run_cli(*path, "--help")
    assert result.code == 0, result.err
    shown = "".join(result.out.split())  # click wraps long help lines, at spaces and after hyphens
    for param in command.params:
        if not isinstance(param, click.Option) or param.hidden or param.is_flag:
            continue
        if isinstance(param, ConfigOption):
            name = param.key.split(".")[-1]
            expected = None if param.field.default is None else f"[default: {default_text(name, param.field.default)}]"
            assert param.default is None  # unset options leave the config file's value alone
        else:
            # a real value (click marks "no default" with None or a sentinel of its own)
            expected = "[default: " if isinstance(param.default, (str, int, float, tuple)) else None
        if expected is None:
            continue
        record = param.get_help_record(click.Context(command))
        assert record is not None and expected in record[1], (path, param.name, record)
        assert "".join(record[1].split()) in shown, (path, param.name)


def test_config_options_cover_the_fields_they_name() -> None:
    """Each config option sets the field it is named after (``--max-batch-size`` is ``serve.max_batch_size``)."""
    from distml.cli.options import ConfigOption
    from distml.config import DistmlConfig

    options = [p for _, c in _leaf_commands() for p in c.params if isinstance(p, ConfigOption)]
    assert len(options) > 40
    for option in options:
        section, name = option.key.split(".")
        assert name in type(getattr(DistmlConfig(), section)).model_fields
        assert option.opts[0] == f"--{name.replace('_', '-')}"
