"""``distml run``: the real pipeline (torchrun training, ONNX export, MLflow on SQLite) on a small image folder.

The cache must explain itself: cold every step ran, warm every step hit, a longer --epochs resumes training
from the shorter run, a changed candidate re-runs only itself and what follows, deleted outputs re-run with the
reason, a failure stops only the steps after it, a kill mid-training resumes from the checkpoint.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import make_image_folder, pipeline_config, run_cli, step_decisions
from distml.data.sources.folder import FolderOptions, FolderSource
from distml.pipeline import steps as S  # noqa: N812 (as pipeline/dag.py reads them)
from distml.pipeline.cache import Entry, KeyParts, StepCache, explain_miss, file_record, verify_files
from distml.pipeline.codever import ROOT, closure, code_version
from distml.pipeline.runner import workspace_lock

FAST = ["--epochs", "1", "--workers", "1"]


def _run(home: Path, config: Path, *args: str) -> tuple[int, str, str]:
    result = run_cli("--home", home, "run", "--config", config, *args)
    return result.code, result.out, result.err


def test_cold_warm_longer_and_changed_candidate(home: Path, tmp_path: Path, images: Path) -> None:
    config = pipeline_config(tmp_path, images)
    code, out, err = _run(home, config, "--candidates", "cnn,cnn-dropout", *FAST)
    assert code == 0, out + err
    cold = step_decisions(out)
    assert set(cold) == {"ingest", "train[cnn]", "train[cnn-dropout]", "select", "register"}
    assert all(d.startswith("ran: no earlier run") for d in cold.values()), cold
    assert "is champion" in out and "distml serve models:/images-classifier@champion" in out
    # The summary: each candidate's validation and test accuracy; the choice on validation, the test figure reported.
    assert re.search(r"^train\[cnn\] .* val acc \d+\.\d\d%, test acc \d+\.\d\d%$", out, re.M), out
    assert re.search(r"^select .* pl-cnn\S*: val acc \d+\.\d\d%, test acc \d+\.\d\d%$", out, re.M), out

    started = time.perf_counter()
    code, out, err = _run(home, config, "--candidates", "cnn,cnn-dropout", *FAST)
    warm_s = time.perf_counter() - started
    assert code == 0, out + err
    warm = step_decisions(out)
    assert all(d.startswith("hit: same inputs as run ") for d in warm.values()), warm
    assert warm_s < 15, warm_s  # the README's figure (≤ 5 s) comes from bench/pipeline.py on a quiet machine

    code, out, err = _run(home, config, "--candidates", "cnn,cnn-dropout", "--epochs", "2", "--workers", "1")
    assert code == 0, out + err
    longer = step_decisions(out)
    assert longer["ingest"].startswith("hit")
    for name in ("train[cnn]", "train[cnn-dropout]"):
        assert longer[name] == "ran: param epochs 1 → 2", longer
    assert "resumed from the 1-epoch run pl-cnn-" in out
    runs = list((home / "runs").glob("pl-cnn-??????????"))  # the 1-epoch run and the 2-epoch one, names by key
    epochs = sorted(len(json.loads((r / "history.json").read_text())) for r in runs)
    assert epochs == [1, 2]  # the longer run carries the shorter one's first epoch

    # One candidate's hyperparameter changes: only it, and the steps after it, run.
    two = '\n[[candidates]]\nmodel = "cnn"\n\n[[candidates]]\nmodel = "cnn-dropout"\nlr = 0.001\n'
    config2 = pipeline_config(tmp_path, images, two)
    code, out, err = _run(home, config2, "--epochs", "2", "--workers", "1")
    assert code == 0, out + err
    changed = step_decisions(out)
    assert changed["ingest"].startswith("hit") and changed["train[cnn]"].startswith("hit")
    assert changed["train[cnn-dropout]"] == "ran: param lr 0.002 → 0.001", changed
    assert changed["select"].startswith("ran: input train[cnn-dropout]")

    listing = run_cli("--home", home, "runs", "list")
    assert listing.code == 0 and len(listing.out.strip().splitlines()) == 1 + 4
    shown = run_cli("--home", home, "runs", "show", "latest")
    assert shown.code == 0
    assert "lineage:" in shown.out and "-> alias champion (models:/images-classifier@champion)" in shown.out
    assert "train[cnn-dropout] ran: param lr 0.002 → 0.001" in shown.out


def test_deleted_outputs_rerun_and_say_why(home: Path, tmp_path: Path, images: Path) -> None:
    config = pipeline_config(tmp_path, images)
    assert _run(home, config, "--candidates", "cnn", *FAST)[0] == 0
    for ckpt in (home / "runs").glob("pl-cnn-*/checkpoints/*.pt"):
        ckpt.unlink()
    code, out, err = _run(home, config, "--candidates", "cnn", *FAST)
    assert code == 0, out + err
    d = step_decisions(out)
    assert d["ingest"].startswith("hit")
    assert d["train[cnn]"].startswith("ran: the cached result failed verification: checkpoint "), d
    assert "is missing" in d["train[cnn]"]

    # --force select: only select runs (and says so); register's input, the winner's ONNX file, is unchanged.
    code, out, err = _run(home, config, "--candidates", "cnn", *FAST, "--force", "select")
    assert code == 0, out + err
    d = step_decisions(out)
    assert d["select"] == "ran: --force" and d["train[cnn]"].startswith("hit") and d["register"].startswith("hit")
    code, out, err = _run(home, config, "--candidates", "cnn", *FAST, "--no-cache")
    assert code == 0, out + err
    assert set(step_decisions(out).values()) == {"ran: --no-cache"}
    assert "train[cnn]" in out and "(trained from scratch)" in out  # not "resumed" from its own finished run

    # --serve: every step hits, then the champion is served and answers a real request before we stop it.
    cmd = [sys.executable, "-m", "distml", "--home", str(home), "run", "--config", str(config), "--candidates", "cnn",
           *FAST, "--serve", "--port", "0"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("smoke prediction"):
                break
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = "".join(lines) + rest
    assert proc.returncode == 0, text
    assert "smoke prediction: test image 0 -> " in text and "Ctrl-C stops the server" in text
    assert text.rstrip().endswith("stopped")


def test_a_failing_step_stops_its_dependents_only(home: Path, tmp_path: Path, images: Path) -> None:
    bad = '\n[[candidates]]\nmodel = "cnn"\n\n[[candidates]]\nmodel = "cnn-dropout"\noptimizer = "sgd"\nlr = 1e30\n'
    config = pipeline_config(tmp_path, images, bad + 'schedule = "constant"\n')
    code, out, err = _run(home, config, *FAST)
    assert code == 1
    d = step_decisions(out)
    assert d["train[cnn]"].startswith("ran") and d["train[cnn-dropout]"].startswith("FAILED: ")
    assert "loss is" in d["train[cnn-dropout]"]
    assert d["select"] == "skipped: train[cnn-dropout] did not finish" and d["register"].startswith("skipped")
    assert "step train[cnn-dropout] failed" in err and "log: " in err and "train.log" in err
    # The independent candidate's result was kept: the next run (with the bad one fixed) hits it.
    code, out, err = _run(home, pipeline_config(tmp_path, images, '\n[[candidates]]\nmodel = "cnn"\n'), *FAST)
    assert code == 0, out + err
    assert step_decisions(out)["train[cnn]"].startswith("hit")


def test_killed_mid_training_resumes_from_the_checkpoint(home: Path, tmp_path: Path, images: Path) -> None:
    config = pipeline_config(tmp_path, images, "checkpoint_every_steps = 1\n")
    cmd = [sys.executable, "-m", "distml", "--home", str(home), "run", "--config", str(config),
           "--candidates", "cnn", "--epochs", "6", "--workers", "1"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not list((home / "runs").glob("pl-cnn-*/checkpoints/ckpt-*.pt")) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            time.sleep(0.05)
        assert list((home / "runs").glob("pl-cnn-*/checkpoints/ckpt-*.pt")), "no checkpoint appeared in time"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # The training job under it stops too (it dies with its parent), so nothing keeps writing the run folder.
    time.sleep(1.0)
    code, out, err = _run(home, config, "--candidates", "cnn", "--epochs", "6", "--workers", "1")
    assert code == 0, out + err
    d = step_decisions(out)
    assert d["ingest"].startswith("hit")
    assert "resumed the interrupted run from its last checkpoint" in out
    assert d["train[cnn]"].startswith("ran: no earlier run")  # nothing was cached for the killed attempt
    listing = run_cli("--home", home, "runs", "list").out.splitlines()
    assert listing[1].split()[1] == "killed" and listing[2].split()[1] == "done", listing


def test_ctrl_c_stops_training_records_it_and_the_next_run_resumes(home: Path, tmp_path: Path, images: Path) -> None:
    config = pipeline_config(tmp_path, images, "checkpoint_every_steps = 1\n")
    cmd = [sys.executable, "-m", "distml", "--home", str(home), "run", "--config", str(config),
           "--candidates", "cnn", "--epochs", "6", "--workers", "1"]  # fmt: skip
    # Its own process group, signalled as a whole: what a terminal does on Ctrl-C.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not list((home / "runs").glob("pl-cnn-*/checkpoints/ckpt-*.pt")) and time.monotonic() < deadline:
            assert proc.poll() is None
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, out
    assert "interrupted; run the same command again to resume" in out and "FAILED" not in out, out
    record = json.loads(next((home / "pipeline" / "runs").glob("*/run.json")).read_text())
    assert record["status"] == "interrupted" and record["steps"]["train[cnn]"]["status"] == "interrupted"
    assert record["steps"]["ingest"]["status"] == "done"
    code, out, err = _run(home, config, "--candidates", "cnn", "--epochs", "6", "--workers", "1")
    assert code == 0, out + err
    assert step_decisions(out)["ingest"].startswith("hit") and "resumed the interrupted run" in out


def test_a_second_run_on_the_same_workspace_is_refused(home: Path, tmp_path: Path, images: Path) -> None:
    config = pipeline_config(tmp_path, images)
    with workspace_lock(home):
        code, _, err = _run(home, config, *FAST)
    assert code == 1
    assert f"another distml run is using the workspace {home} (pid {os.getpid()}" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("toml", "args", "message"),
    [
        (
            "[pipeline]\ncandidate = ['cnn']\n",
            [],
            "unknown config key pipeline.candidate in {cfg} (did you mean 'candidates'?)",
        ),
        ("[train]\nepochs = 'many'\n", [], "invalid config value train.epochs='many'"),
        ("[pipeline]\ndataset = 'folder'\n", [], "dataset 'folder' needs source = the image folder"),
        ("", ["--dataset", "fashion-mnist", "--source", "{tmp}/nowhere"], "nowhere"),
        ("", ["--epochs", "0"], "invalid config value epochs=0"),
        ("", ["--force", "trian"], "--force trian: no such step"),
    ],
)
def test_bad_input_is_one_clear_line(home: Path, tmp_path: Path, toml: str, args: list[str], message: str) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(toml)
    result = run_cli("--home", home, "run", "--config", cfg, *[a.format(tmp=tmp_path) for a in args])
    assert result.code in (1, 2), result.out + result.err
    assert message.format(cfg=cfg, tmp=tmp_path) in result.err + result.out, result.err + result.out
    assert "Traceback" not in result.err


# -- the cache's parts -------------------------------------------------------------------------------------------
def test_code_version_follows_imports_not_names() -> None:
    mods = closure(("distml.train.worker",))
    assert {"distml.train.loop", "distml.train.batches", "distml.data.reader"} <= set(mods)
    assert "distml.serve.app" not in mods and "distml.cli.main" not in mods
    assert set(code_version(("distml.train.worker",))) == set(mods)


def _copy_of_the_package(tmp_path: Path) -> Path:
    """A copy of the distml package to edit (the real sources stay as they are): ``<returned>/distml``."""
    shutil.copytree(ROOT, tmp_path / "code" / "distml", ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path / "code"


def _edit(path: Path) -> None:
    """A change to a module that is not a change of behaviour: the key must still see it, or not reach it."""
    path.write_text(path.read_text() + "\n# an edit\n")


def test_a_step_code_version_covers_only_the_modules_it_can_run(tmp_path: Path) -> None:
    train = closure(S.TRAIN_CODE)
    assert {"distml.train.loop", "distml.train.worker", "distml.data.reader", "distml.data.store"} <= set(train)
    outside = ("distml.data.sources", "distml.data.ingest", "distml.registry", "distml.serve", "distml.cli")
    assert [m for m in train if m.startswith(outside)] == []
    folder = FolderSource(tmp_path, FolderOptions(image_size=(8, 8), mode="L", test_fraction=0.25))
    ingest = closure(S.ingest_code(folder))
    assert "distml.data.sources.folder" in ingest and "distml.data.ingest" in ingest
    assert [m for m in ingest if m.endswith(("cifar10", "fashion_mnist", "safetar", "idx"))] == []
    assert "distml.registry.export" in closure(S.SELECT_CODE)  # select exports each run to ONNX: it runs the exporter

    code = _copy_of_the_package(tmp_path) / "distml"
    code_version.cache_clear()  # read once per process; here the same roots are read again after each edit
    before = code_version(S.TRAIN_CODE, code)
    assert before == code_version(S.TRAIN_CODE)  # the copy is the same code
    _edit(code / "data" / "sources" / "cifar10.py")
    code_version.cache_clear()
    assert code_version(S.TRAIN_CODE, code) == before
    _edit(code / "train" / "loop.py")
    code_version.cache_clear()
    after = code_version(S.TRAIN_CODE, code)
    assert sorted(m for m in after if after[m] != before[m]) == ["distml.train.loop"]


def test_the_register_key_does_not_cover_the_training_code() -> None:
    assert [m for m in closure(S.REGISTER_CODE) if m.startswith("distml.train")] == []


def test_an_edit_the_step_cannot_run_is_a_hit_and_one_it_can_run_says_which(home: Path, tmp_path: Path) -> None:
    """The real pipeline, run from an edited copy of the package (PYTHONPATH), so the real sources stay as they are."""
    images = make_image_folder(tmp_path / "images", per_class=16)  # a batch of 16 left after validation
    config = pipeline_config(tmp_path, images)
    code = _copy_of_the_package(tmp_path)

    def run() -> dict[str, str]:
        argv = ["--home", str(home), "run", "--config", str(config), "--candidates", "cnn", *FAST]
        env = {**os.environ, "PYTHONPATH": str(code)}
        result = subprocess.run(
            [sys.executable, "-m", "distml", *argv], capture_output=True, text=True, env=env, timeout=600, check=False
        )
        assert result.returncode == 0, result.stdout + result.stderr
        return step_decisions(result.stdout)

    cold = run()
    assert cold["train[cnn]"].startswith("ran: no earlier run"), cold
    _edit(code / "distml" / "data" / "sources" / "cifar10.py")  # another dataset's reader: nothing here runs it
    after_cifar = run()
    assert all(d.startswith("hit: ") for d in after_cifar.values()), after_cifar
    _edit(code / "distml" / "train" / "loop.py")
    after_loop = run()
    assert after_loop["ingest"].startswith("hit: "), after_loop
    assert after_loop["train[cnn]"] == "ran: code of distml.train.loop changed", after_loop
    records = [json.loads(p.read_text()) for p in (home / "pipeline" / "runs").glob("*/run.json")]
    last = max(records, key=lambda r: r["started"])
    assert last["steps"]["train[cnn]"]["why"] == "code of distml.train.loop changed"
    newest = StepCache(home / "pipeline" / "cache").entries("train[cnn]")[0]  # keyed by the copy's code
    edited = hashlib.sha256((code / "distml" / "train" / "loop.py").read_bytes()).hexdigest()
    assert newest.parts["code"]["distml.train.loop"] == edited != code_version(S.TRAIN_CODE)["distml.train.loop"]


def test_explain_miss_names_each_change(tmp_path: Path) -> None:
    old = KeyParts("train[cnn]", {"distml.train.loop": "a", "distml.x": "b"}, {"epochs": 5, "lr": 0.1},
                   {"dataset": "1234567890"}, {"torch": "2.13.0"})  # fmt: skip
    cache = StepCache(tmp_path / "cache")
    cache.put(Entry("train[cnn]", old.key, old.to_json(), {}, {}, "run-1", 1.0))
    new = KeyParts("train[cnn]", {"distml.train.loop": "c", "distml.x": "b"}, {"epochs": 10, "lr": 0.1},
                   {"dataset": "abcdef0123"}, {"torch": "2.14.0"})  # fmt: skip
    assert explain_miss(new, cache.entries("train[cnn]")[0]) == (
        "param epochs 5 → 10; input dataset 12345678… → abcdef01…; code of distml.train.loop changed; "
        "torch 2.13.0 → 2.14.0"
    )
    assert old.key != new.key and old.key == KeyParts(**{**vars(old)}).key
    assert explain_miss(new, None) == "no earlier run of this step"


def test_verify_files_catches_missing_and_changed(tmp_path: Path) -> None:
    f = tmp_path / "weights.pt"
    f.write_bytes(b"abc")
    files = {"checkpoint": file_record(f)}
    assert verify_files(files) is None
    f.write_bytes(b"abd")
    assert verify_files(files) == f"checkpoint {f} changed since it was cached"
    f.unlink()
    assert verify_files(files) == f"checkpoint {f} is missing"


def test_the_register_hit_check_reads_the_champion_without_mlflow_and_defers_to_the_registry(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real MLflow SQLite store: the direct read confirms only a plain yes; the registry answers the rest."""
    from distml import tracking
    from distml.pipeline.champion import champion_is
    from distml.workspace import Workspace

    name = "images-classifier"
    assert not champion_is(home, name, "1")  # no store yet: the registry decides (and says there is no model)
    home.mkdir(parents=True)
    client = tracking.mlflow_client(tracking.tracking_uri(home))
    client.create_registered_model(name)
    for _ in range(2):
        client.create_model_version(name, source="file:///nowhere")
    client.set_registered_model_alias(name, "champion", "1")
    registered = {"name": name, "version": "1", "ref": f"models:/{name}@champion"}
    assert champion_is(home, name, "1") and not champion_is(home, name, "2")
    assert S.verify_registered(Workspace(home), registered) is None
    client.set_registered_model_alias(name, "champion", "2")  # moved by hand: the cached register is stale
    assert not champion_is(home, name, "1")
    assert S.verify_registered(Workspace(home), registered) == f"the champion of {name} is now version 2, not 1"
    client.set_registered_model_tag(name, "distml.champion_move", "{}")  # a move half done: ask the registry
    assert not champion_is(home, name, "2")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # a tracking server: never read directly
    assert not champion_is(home, name, "2")


def test_the_live_training_line_shows_validation_and_marks_test_as_reported_only() -> None:
    from distml.pipeline.dag import progress_line

    epochs = [{"val_accuracy": 0.8, "test_accuracy": 0.7}, {"val_accuracy": 0.9125, "test_accuracy": 0.875}]
    assert progress_line([], 3) == ""
    assert progress_line(epochs, 3) == (
        "epoch 2/3: val accuracy 91.25%, test accuracy 87.50% (reported only, not used to choose)"
    )
    assert progress_line([{"val_accuracy": None, "test_accuracy": 0.5}], 1).startswith("epoch 1/1: no validation split")


def test_runner_gives_concurrent_gpu_steps_distinct_gpus(tmp_path: Path) -> None:
    """The runner alone, with steps that only record what they were given (no training; CI has no GPU)."""
    import threading

    from distml.pipeline.runner import Runner, Step
    from distml.pipeline.steps import StepResult

    seen: dict[str, list[int]] = {}
    both_running = threading.Barrier(2, timeout=10)

    def gpu_step(ctx: Any) -> StepResult:
        seen[ctx.name] = ctx.gpus
        both_running.wait()  # fails (BrokenBarrierError -> the step fails) unless the two run at once
        return StepResult({"gpus": ctx.gpus})

    def step(name: str, needs: tuple[str, ...], gpus: int, run: Any) -> Step:
        return Step(name, needs, ("distml.pipeline.cache",), (), {"n": name}, inputs=lambda o, f: {}, run=run,
                    gpus=gpus)  # fmt: skip

    steps = [step("a", (), 1, gpu_step), step("b", (), 1, gpu_step),
             step("c", ("a", "b"), 0, lambda ctx: StepResult({"after": sorted(ctx.upstream)}))]  # fmt: skip
    out = io.StringIO()
    outcomes = Runner(steps, home=tmp_path, config={}, cores=2, gpus=2, stream=out).execute()
    assert [o.status for o in outcomes.values()] == ["done"] * 3, out.getvalue()
    assert sorted(seen["a"] + seen["b"]) == [0, 1]
    assert outcomes["c"].outputs["after"] == ["a", "b"]


# -- bookkeeping on a full disk: a result that cannot be recorded is not done -----------------------------------
class FullDisk:
    """Makes ``folder`` a file system with no space left, when :meth:`fill` is called.

    ``tmpfs``: a real one, a small tmpfs mounted on the folder and filled to the last page (needs root and a
    ``mount`` that works here; skipped with the reason otherwise). ``injected``: ENOSPC raised by ``os.fsync``
    for files under the folder only, the call where a full disk shows itself at the latest (always runs).
    """

    def __init__(self, kind: str, folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.kind, self.folder, self.full = kind, folder, False
        folder.mkdir(parents=True, exist_ok=True)
        if kind == "tmpfs":
            if sys.platform != "linux" or os.geteuid() != 0 or not shutil.which("mount"):
                pytest.skip("a real full file system needs root and mount(8) on Linux")
            done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0755", "distml-full", str(folder)],
                                  capture_output=True, text=True, check=False)  # fmt: skip
            if done.returncode != 0:
                pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
        else:
            real_fsync = os.fsync

            def fsync(fd: int) -> None:
                if self.full and os.readlink(f"/proc/self/fd/{fd}").startswith(str(folder)):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                real_fsync(fd)

            monkeypatch.setattr(os, "fsync", fsync)

    def fill(self) -> None:
        self.full = True
        if self.kind == "tmpfs":
            with contextlib.suppress(OSError), (self.folder / "filler").open("wb", buffering=0) as fh:
                for chunk in (1 << 16, 1 << 12, 1):  # to the last byte of the last page
                    for _ in range(1 << 20):  # bounded: 256 KiB fills long before
                        try:
                            fh.write(b"\0" * chunk)
                        except OSError:
                            break

    def close(self) -> None:
        if self.kind == "tmpfs":
            done = subprocess.run(["umount", str(self.folder)], capture_output=True, check=False)
            if done.returncode != 0:
                subprocess.run(["umount", "-l", str(self.folder)], capture_output=True, check=False)


@pytest.fixture(params=["tmpfs", "injected"])
def full_disk(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Path], FullDisk]]:
    """``full_disk(folder)``: that folder on a file system that fills up on demand (both kinds, see FullDisk)."""
    made: list[FullDisk] = []

    def make(folder: Path) -> FullDisk:
        made.append(FullDisk(request.param, folder, monkeypatch))
        return made[-1]

    yield make
    for disk in made:
        disk.close()


def test_a_cache_entry_that_cannot_be_written_fails_the_step_not_the_cli(
    home: Path, tmp_path: Path, images: Path, full_disk: Callable[[Path], FullDisk]
) -> None:
    """ENOSPC on the step cache: before, the step's thread died, the run was 'done' and the CLI hit a KeyError."""
    cache = home / "pipeline" / "cache"
    full_disk(cache).fill()
    code, out, err = _run(home, pipeline_config(tmp_path, images), *FAST)
    assert code == 1, out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("error: step ingest failed after ") and "cannot write the step cache entry " in err
    assert f"{cache}/ingest/" in err and "No space left on device" in err and "record: " in err
    d = step_decisions(out)
    assert d["ingest"].startswith("FAILED: cannot write the step cache entry")
    assert all(why.startswith("skipped: ") for step, why in d.items() if step != "ingest"), d
    record = json.loads(next((home / "pipeline" / "runs").glob("*/run.json")).read_text())
    assert record["status"] == "failed"
    assert {n: s["status"] for n, s in record["steps"].items()} == {
        "ingest": "failed", "train[cnn]": "skipped", "train[cnn-dropout]": "skipped",
        "train[cnn-batchnorm]": "skipped", "select": "skipped", "register": "skipped",
    }  # fmt: skip
    assert not list(cache.glob("ingest/.*.tmp"))  # the failed write left no temp file behind
    assert run_cli("--home", home, "runs", "list").out.splitlines()[1].split()[1] == "failed"


def test_a_run_record_that_cannot_be_written_fails_the_step_and_the_run(
    tmp_path: Path, full_disk: Callable[[Path], FullDisk]
) -> None:
    """The record's file system fills up while a step runs: that step fails with the reason, never 'done'."""
    from distml.errors import PipelineError
    from distml.pipeline.runner import Runner, Step
    from distml.pipeline.steps import StepResult

    disk = full_disk(tmp_path / "pipeline" / "runs")

    def fills_the_disk(ctx: Any) -> StepResult:
        disk.fill()
        return StepResult({"ok": True})

    steps = [Step("a", (), ("distml.pipeline.cache",), (), {}, inputs=lambda o, f: {}, run=fills_the_disk),
             Step("b", ("a",), ("distml.pipeline.cache",), (), {}, inputs=lambda o, f: {},
                  run=lambda ctx: StepResult({}))]  # fmt: skip
    stream = io.StringIO()
    runner = Runner(steps, home=tmp_path, config={}, cores=1, stream=stream)
    with pytest.raises(PipelineError, match=r"cannot write the run record .*run\.json: No space left on device"):
        runner.execute()
    a, b = runner.outcomes["a"], runner.outcomes["b"]
    assert a.status == "failed" and a.error.startswith("cannot write the run record "), stream.getvalue()
    assert "No space left on device" in a.error
    assert b.status == "skipped" and b.why == "a did not finish"
    assert runner.record["status"] == "failed"
