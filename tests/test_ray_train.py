"""Training on a real two-node Ray cluster on this machine: the same job as torchrun's, faults, and bad input.

Every test drives ``distml train --ray <address>`` in a subprocess with the cluster's token in its environment,
as a user would. The cluster (tests/ray_cluster.py) has two nodes of 1 CPU each, both on 127.0.0.1; with
``--placement spread`` the two ranks of a job run on different nodes. Ray numbers local ranks by node IP, so here
the ranks count as one host's and average their gradients through shared memory, as the torchrun reference does
(on separate hosts they use gloo: for two ranks both are a/2 + b/2 exactly, tests/test_multinode.py). The losses of
every step and the final weights must be equal bit for bit.

Ray Train jobs start slowly (a controller and one process per rank, each importing Ray Train and torch), so the
torchrun reference trains while the cluster and the first Ray job start. (The two node-loss jobs side by side, on
nodes of 2 CPUs, took longer here than one after the other: 201-205 s against 163 s on the shared 2-core box.)

The tests that kill a node run last: each adds a node back so the module's cluster has two again.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import free_port, make_mnist, run_cli_fresh
from distml.data.ingest import ingest
from distml.data.sources import FashionMnistSource
from distml.data.store import DatasetStore
from distml.train.checkpoint import list_checkpoints, load_latest
from distml.train.ray_launch import PLACEMENT_FILE
from distml.workspace import Workspace
from ray_cluster import LocalRayCluster, ray_cluster  # noqa: F401  (the module's cluster fixture)

TIMEOUT_S = 240
# One epoch of 115 steps (2048 images less 205 for validation, at a global batch of 16), a checkpoint every 20 steps.
# Dropout and crops are drawn per rank, so a rank out of its place, or another world size, would not give the same
# losses; a node killed after the checkpoint at step 40 is lost mid-epoch, and the job must resume from there.
LONG = ["--dataset", "long", "--model", "cnn-dropout", "--augment", "crop+flip", "--epochs", "1",
        "--batch-size", "16", "--lr", "0.02", "--optimizer", "sgd", "--schedule", "constant", "--seed", "5",
        "--threads-per-worker", "1", "--allow-oversubscribe", "--workers", "2",
        "--checkpoint-every-steps", "20"]  # fmt: skip
STEPS = 115
KILL_AFTER = "ckpt-000000-000000040.pt"
_RAY_PREFIX = re.compile(r"^(\x1b\[\d+m)?\(\w+ pid=\d+")


@pytest.fixture(scope="module")
def cluster(ray_cluster: LocalRayCluster) -> LocalRayCluster:  # noqa: F811
    """The module's two-node cluster (tests/ray_cluster.py), under a name that does not shadow the import."""
    return ray_cluster


@pytest.fixture(scope="module")
def ray_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One workspace for the module (every node sees it: they all run on this host), with two tiny datasets."""
    root = tmp_path_factory.mktemp("ray-train")
    home = root / "home"
    for name, n_train in (("tiny", 256), ("long", 2048)):
        files = make_mnist(root / f"src-{name}", n_train=n_train, n_test=32, seed=len(name))
        src = FashionMnistSource(home / "downloads", location=str(files.folder), spec=files.spec)
        ingest(src, store=DatasetStore(Workspace(home)), name=name)
    return home


@pytest.fixture(scope="module")
def reference_job(ray_home: Path) -> Iterator[subprocess.Popen[str]]:
    """The LONG job under torchrun on this host, uninterrupted, started (it trains while the Ray job starts)."""
    log = (ray_home.parent / "long-torchrun.log").open("w")
    cmd = [sys.executable, "-m", "distml", "train", *LONG, "--run-name", "long-torchrun", "--home", str(ray_home)]
    proc = subprocess.Popen(cmd, env=_local_env(), stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def reference(ray_home: Path, reference_job: subprocess.Popen[str]) -> Path:
    """The torchrun job's run folder once it has finished: what every Ray run of it must equal."""
    return _reference(ray_home, reference_job)


def _reference(home: Path, job: subprocess.Popen[str]) -> Path:
    try:
        job.wait(timeout=TIMEOUT_S)
    finally:
        if job.poll() is None:
            job.kill()
    output = (home.parent / "long-torchrun.log").read_text()
    assert job.returncode == 0, output[-4000:]
    assert "Traceback" not in output, output[-4000:]
    return home / "runs" / "long-torchrun"


def _distml(
    env: dict[str, str], home: Path, *args: str, timeout: float = TIMEOUT_S
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "distml", *args, "--home", str(home)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _local_env() -> dict[str, str]:
    """A torchrun job's environment: no Ray settings, no outside tracking server."""
    return {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != "MLFLOW_TRACKING_URI"}


def _ok(result: subprocess.CompletedProcess[str]) -> str:
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "Traceback" not in _own_lines(result.stderr), result.stderr[-4000:]
    return output


def _own_lines(text: str) -> str:
    """The command's own output, without the log lines Ray forwards from its actors (``(Name pid=N) ...``).

    Ray's internal actors log their own retries with tracebacks (its autoscaling coordinator, under load); what
    distml says is checked here.
    """
    return "\n".join(line for line in text.splitlines() if not _RAY_PREFIX.match(line))


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    loaded = load_latest(run_dir / "checkpoints", warn=print)
    assert loaded is not None, f"no checkpoint in {run_dir}"
    return dict(loaded[1]["model"])


def _history(run_dir: Path) -> list[dict[str, Any]]:
    return list(json.loads((run_dir / "history.json").read_text()))


def _assert_same_weights(got: Path, ref: Path) -> None:
    a, b = _weights(got), _weights(ref)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs from the torchrun run"


def _mlflow_run(home: Path, run_dir: Path) -> Any:
    from distml.tracking import mlflow_client, tracking_uri

    return mlflow_client(tracking_uri(home)).get_run((run_dir / "mlflow_run_id").read_text().strip())


def _worker_node(cluster: LocalRayCluster) -> int:
    """The newest worker node that still runs (node 0 is the head)."""
    alive = cluster.worker_nodes()
    assert alive, "no worker node left"
    return alive[-1]


# -- the same job as torchrun's ---------------------------------------------------------------------------------


def test_a_ray_job_equals_the_torchrun_job_step_for_step(
    reference_job: subprocess.Popen[str], ray_home: Path, cluster: LocalRayCluster
) -> None:
    """(The reference job is asked for first: it trains while the cluster starts, then while this job starts.)"""
    home = ray_home
    started = time.monotonic()
    done, modules = run_cli_fresh(home.parent, "train", *LONG, "--run-name", "long-ray", "--ray", cluster.address,
                                  "--placement", "spread", "--home", home, env=cluster.client_env(),
                                  timeout_s=TIMEOUT_S)  # fmt: skip
    print(f"ray job: {time.monotonic() - started:.1f} s")
    output = _ok(subprocess.CompletedProcess([], done.code, done.out, done.err))
    reference = _reference(home, reference_job)  # trained meanwhile
    run_dir = home / "runs" / "long-ray"
    assert "resuming" not in output  # a fresh run
    assert "torch" not in modules  # only the ranks train: the driver never loads torch (ray_trainer.py)
    assert re.search(r"placement: long-ray: rank 0 on node \w{8} \(127\.0\.0\.1\), rank 1 on node \w{8}", output)
    # Every step as under torchrun: the same losses bit for bit, then the same final weights.
    (ours,), (theirs,) = _history(run_dir), _history(reference)
    assert len(ours["step_losses"]) == STEPS
    assert ours["step_losses"] == theirs["step_losses"]
    assert ours["test_loss"] == theirs["test_loss"]
    _assert_same_weights(run_dir, reference)
    # One rank on each node, both on loopback, recorded for the first attempt.
    placement = json.loads((run_dir / "placement.json").read_text())
    assert [p["rank"] for p in placement] == [0, 1]
    assert len({p["node_id"] for p in placement}) == 2
    assert {p["node_ip"] for p in placement} == {"127.0.0.1"}
    assert {p["attempt"] for p in placement} == {0}
    # What follows a job is the same as locally: its result and its finished MLflow run.
    assert json.loads((run_dir / "result.json").read_text())["global_step"] == STEPS
    assert _mlflow_run(home, run_dir).info.status == "FINISHED"


# -- bad input ----------------------------------------------------------------------------------------------------


def test_more_workers_than_the_cluster_can_ever_place_is_refused_in_seconds(
    cluster: LocalRayCluster, ray_home: Path
) -> None:
    home = ray_home
    base = ["train", "--dataset", "tiny", "--epochs", "1", "--batch-size", "48", "--ray", cluster.address]
    started = time.monotonic()
    spread = _distml(cluster.client_env(), home, *base, "--workers", "3", "--placement", "spread", timeout=60)
    assert spread.returncode == 2, spread.stderr
    assert "--workers 3 with --placement spread needs 3 nodes" in spread.stderr
    assert "has 2 (of 2 nodes)" in spread.stderr
    pack = _distml(cluster.client_env(), home, *base, "--workers", "3", timeout=60)
    assert pack.returncode == 2, pack.stderr
    assert "is more than the cluster at" in pack.stderr and "can ever place" in pack.stderr
    assert time.monotonic() - started < 40  # two commands, each with Python's and torch's start-up
    assert "Traceback" not in spread.stderr + pack.stderr
    assert not (home / "runs").exists() or not any((home / "runs").glob("cnn-tiny-*"))


def test_ray_auto_connects_to_the_cluster_of_ray_address(cluster: LocalRayCluster, ray_home: Path) -> None:
    """``--ray auto`` (what the KubeRay RayJob runs) finds the cluster RAY_ADDRESS names, as Ray's own lookup does.

    A job too large for it is refused after connecting, so the error shows what ``auto`` found: this cluster's
    two nodes of 1 CPU, without starting anything.
    """
    assert cluster.client_env()["RAY_ADDRESS"] == cluster.address
    args = ["train", "--dataset", "tiny", "--workers", "3", "--batch-size", "48", "--ray", "auto"]
    result = _distml(cluster.client_env(), ray_home, *args, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "is more than the cluster at auto can ever place (2 such workers on its 2 node(s):" in result.stderr
    assert "127.0.0.1 1 CPU, 127.0.0.1 1 CPU" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_unreachable_address_fails_within_ten_seconds_naming_it(ray_home: Path) -> None:
    home = ray_home
    address = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    result = _distml(_local_env(), home, "train", "--dataset", "tiny", "--ray", address, timeout=60)
    assert result.returncode == 1, result.stderr
    assert f"cannot reach the Ray cluster at {address}" in result.stderr
    assert "Traceback" not in result.stderr
    assert time.monotonic() - started < 10


@pytest.mark.parametrize(
    ("token", "needle"),
    [("wrong-token-0000000000000000", "refused this client's token"), (None, "this client has none")],
)
def test_a_wrong_or_missing_token_is_one_line(
    cluster: LocalRayCluster, ray_home: Path, tmp_path: Path, token: str | None, needle: str
) -> None:
    home = ray_home
    env = cluster.client_env(HOME=str(tmp_path))  # no ~/.ray/auth_token to fall back on
    if token is None:
        env.pop("RAY_AUTH_TOKEN")
    else:
        env["RAY_AUTH_TOKEN"] = token
    started = time.monotonic()
    result = _distml(env, home, "train", "--dataset", "tiny", "--ray", cluster.address, timeout=60)
    assert result.returncode == 1, result.stderr
    assert needle in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert time.monotonic() - started < 30


def test_without_ray_installed_the_error_says_how_to_install_it(ray_home: Path, tmp_path: Path) -> None:
    """Ray is made unimportable in the command's own interpreter: a ``ray`` module first on its path raises."""
    home = ray_home
    shim = tmp_path / "no-ray"
    shim.mkdir()
    (shim / "ray.py").write_text("raise ImportError('No module named ray (test shim)')\n")
    env = {**_local_env(), "PYTHONPATH": os.pathsep.join([str(shim), os.environ.get("PYTHONPATH", "")])}
    result = _distml(env, home, "train", "--dataset", "tiny", "--ray", "127.0.0.1:6379", timeout=60)
    assert result.returncode == 2, result.stderr
    assert "error: Ray is not installed; pip install 'distml[ray]'" in result.stderr
    assert "Traceback" not in result.stderr


def _unshare_problem() -> str | None:
    """Why a node cannot be given its own mount namespace here (None: it can)."""
    if os.geteuid() != 0:
        return "needs root to mount a tmpfs in a new mount namespace"
    if shutil.which("unshare") is None:
        return "no unshare command"
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True, text=True)
    return f"unshare --mount is not permitted here: {probe.stderr.strip()}" if probe.returncode else None


def test_a_node_that_does_not_see_the_workspace_fails_the_job_naming_the_node(
    cluster: LocalRayCluster, ray_home: Path
) -> None:
    """A third node runs in its own mount namespace with an empty tmpfs over the workspace: it cannot see it."""
    home = ray_home
    problem = _unshare_problem()
    if problem:
        pytest.skip(problem)
    hide = 'mount -t tmpfs tmpfs "$0" && exec "$@"'
    blind = cluster.add_node(wrap=["unshare", "--mount", "--propagation", "private", "sh", "-c", hide, str(home)])
    try:
        # Three workers, one per node: one of them lands on the blind node.
        result = _distml(cluster.client_env(), home, "train", "--dataset", "tiny", "--epochs", "1", "--workers", "3",
                         "--batch-size", "48", "--threads-per-worker", "1", "--placement", "spread",
                         "--run-name", "blind", "--ray", cluster.address)  # fmt: skip
    finally:
        cluster.kill_node(blind)
    assert result.returncode == 1, result.stderr[-4000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors, result.stderr[-4000:]
    assert "node 127.0.0.1 (" in errors[-1] and "does not see the workspace" in errors[-1]
    assert "shared filesystem path" in errors[-1]
    assert "Traceback" not in _own_lines(result.stderr)
    # Found by the check of each node before the trainer started, not by the ranks of a first attempt.
    assert "failed on Ray after" not in errors[-1]


# -- faults ---------------------------------------------------------------------------------------------------------


def _kill_mid_epoch(
    cluster: LocalRayCluster, home: Path, run: str, *args: str, after: str = KILL_AFTER
) -> subprocess.Popen[str]:
    """Start a LONG job, kill a worker node once ``after`` is in the run folder (by default the step-40
    checkpoint); the still-running command."""
    log = (home.parent / f"{run}.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "distml", "train", *LONG, "--run-name", run, "--ray", cluster.address,
         "--placement", "spread", "--home", str(home), *args],
        env=cluster.client_env(), stdout=log, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    run_dir = home / "runs" / run
    deadline = time.monotonic() + TIMEOUT_S
    while not _written(run_dir, after):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no {after}:\n{(home.parent / f'{run}.log').read_text()[-4000:]}")
        time.sleep(0.02)
    cluster.kill_node(_worker_node(cluster))
    return proc


def _written(run_dir: Path, name: str) -> bool:
    """Whether the run folder has ``name``: a checkpoint's file name, or a file of the folder itself."""
    if name.startswith("ckpt-"):
        return name in [p.name for p in list_checkpoints(run_dir / "checkpoints")]
    return (run_dir / name).is_file()


def _finish(proc: subprocess.Popen[str], home: Path, run: str) -> str:
    try:
        proc.wait(timeout=TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    return (home.parent / f"{run}.log").read_text()


def test_a_node_lost_mid_epoch_restarts_the_group_and_resumes_exactly(
    cluster: LocalRayCluster, ray_home: Path, reference: Path
) -> None:
    home = ray_home
    proc = _kill_mid_epoch(cluster, home, "long-killed", "--max-restarts", "1")
    cluster.add_node()  # the lost node comes back, so both ranks can be placed on two nodes again
    output = _finish(proc, home, "long-killed")
    assert proc.returncode == 0, output[-4000:]
    run_dir = home / "runs" / "long-killed"
    assert "resuming long-killed from ckpt-" in output
    placement = json.loads((run_dir / "placement.json").read_text())
    assert {p["attempt"] for p in placement} == {1}  # the latest attempt: the restarted group
    (resumed,), (theirs,) = _history(run_dir), _history(reference)
    start = resumed["resumed_at_step"]
    assert start >= 40
    assert resumed["step_losses"] == theirs["step_losses"][start:]  # the steps run after the restart
    _assert_same_weights(run_dir, reference)


def test_a_node_lost_beyond_the_restart_budget_fails_the_run_with_the_reason(
    cluster: LocalRayCluster, ray_home: Path
) -> None:
    """The node is killed as soon as the ranks run (rank 0 has written where they run): any loss fails this run,
    so it need not wait for a checkpoint. The node comes back meanwhile, for the module's later tests."""
    home = ray_home
    proc = _kill_mid_epoch(cluster, home, "long-lost", after=PLACEMENT_FILE)  # max_restarts 0: no restart
    with ThreadPoolExecutor(max_workers=1) as pool:
        back = pool.submit(cluster.add_node)
        output = _finish(proc, home, "long-lost")
        back.result(timeout=120)
    assert proc.returncode == 1, output[-4000:]
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert errors, output[-4000:]
    assert "failed on Ray after 1 attempt(s) ([train] max_restarts = 0)" in errors[-1]
    assert "lost" in errors[-1]
    run = _mlflow_run(home, home / "runs" / "long-lost")
    assert run.info.status == "FAILED"
    assert "max_restarts = 0" in run.data.tags["distml.error"]
