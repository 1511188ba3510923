"""Multi-host training without Kubernetes: two ``distml train`` processes on this machine play two hosts.

Each "host" is its own ``distml train`` and torchrun agent with one worker (``--nnodes 2 --node-rank R
--rdzv-endpoint 127.0.0.1:PORT``); the agents meet over torchrun's c10d rendezvous and form one DDP job of world
size 2, all-reducing through gloo over TCP. Its per-step losses, test metrics and final weights must equal a
one-host run with ``--workers 2`` at the same global batch (averaging through shared memory on x86-64): rank r takes
the same slice of every global batch wherever it runs, and for two ranks both means are a/2 + b/2 exactly.

Two layouts: hosts sharing one --home (pods on one volume, as the Kubernetes render runs them; needed to resume,
since only global rank 0 writes checkpoints and every rank reads them), and hosts each with its own --home and its
own copy of the dataset ingested from the same source (a fresh run works; the results land on whichever host got
global rank 0, which torchrun's c10d rendezvous chooses: it ignores --node-rank).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import MnistFiles, free_port, make_mnist, run_cli
from distml.data import DatasetStore
from distml.data.ingest import ingest
from distml.data.sources import FashionMnistSource
from distml.train.checkpoint import load_latest
from distml.workspace import Workspace

TIMEOUT_S = 120  # for each job; a two-host job takes about 12 s on 2 cores
# 256 samples at a global batch of 32: 8 steps an epoch, 16 in all. Dropout and augmentation are drawn per rank,
# so a rank that took another rank's place (or a world that was not 2) would not give the same losses.
TRAIN = ["train", "--dataset", "tiny", "--model", "cnn-dropout", "--augment", "crop+flip", "--epochs", "2",
         "--batch-size", "32", "--lr", "0.02", "--optimizer", "sgd", "--schedule", "constant", "--seed", "3",
         "--threads-per-worker", "1", "--allow-oversubscribe"]  # fmt: skip
COMPARED = ("epoch", "global_step", "step_losses", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "lr")


@dataclass
class Host:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class Run:
    history: list[dict[str, Any]]
    weights: dict[str, torch.Tensor]
    output: str


def _ingest(home: Path, files: MnistFiles) -> None:
    """This host's copy of the dataset, ingested from the shared source files (the same digest everywhere)."""
    src = FashionMnistSource(home / "downloads", location=str(files.folder), spec=files.spec)
    ingest(src, store=DatasetStore(Workspace(home)), name="tiny")


def _env() -> dict[str, str]:
    # Tracking goes to each home's own SQLite store; a launcher's variables must not reach the agents.
    drop = {"MLFLOW_TRACKING_URI", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    return {k: v for k, v in os.environ.items() if k not in drop}


@contextlib.contextmanager
def _hosts() -> Iterator[list[Host]]:
    """Collects the started hosts; whatever still runs on the way out is killed by its pid.

    SIGKILL reaches only the ``distml train`` process; its torchrun agent gets SIGTERM from the kernel when it dies
    (PR_SET_PDEATHSIG, distml._proc.die_with_parent) and stops its worker.
    """
    started: list[Host] = []
    try:
        yield started
    finally:
        for host in started:
            if host.proc.poll() is None:
                host.proc.kill()
                host.proc.wait(timeout=30)


def _start(hosts: list[Host], name: str, home: Path, *args: str) -> Host:
    log = home.parent / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "distml", *TRAIN, "--home", str(home), *args],
            stdout=out, stderr=subprocess.STDOUT, env=_env(),
        )  # fmt: skip
    host = Host(name, proc, log)
    hosts.append(host)
    return host


def _two_hosts(endpoint: str, run: str, *args: str) -> list[str]:
    return ["--run-name", run, "--workers", "1", "--nnodes", "2", "--rdzv-endpoint", endpoint, *args]


def _wait_for(path: Path, host: Host, deadline: float) -> None:
    while not path.exists():
        if host.proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"{path.name} did not appear; {host.name} said:\n{host.output()[-3000:]}")
        time.sleep(0.05)


def _wait(hosts: list[Host], deadline: float) -> None:
    for host in hosts:
        try:
            host.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            outputs = "\n".join(f"--- {h.name}:\n{h.output()[-3000:]}" for h in hosts)
            pytest.fail(f"{host.name} still ran after {TIMEOUT_S} s\n{outputs}")
    for host in hosts:
        assert host.proc.returncode == 0, f"{host.name} exited with {host.proc.returncode}:\n{host.output()[-4000:]}"
        assert "Traceback" not in host.output(), host.output()


def _load(run_dir: Path, output: str) -> Run:
    loaded = load_latest(run_dir / "checkpoints", warn=print)
    assert loaded is not None, f"no checkpoint in {run_dir}"
    return Run(json.loads((run_dir / "history.json").read_text()), dict(loaded[1]["model"]), output)


def _assert_same_training(got: Run, ref: Run) -> None:
    assert [h["epoch"] for h in got.history] == [h["epoch"] for h in ref.history] == [1, 2]
    for g, r in zip(got.history, ref.history, strict=True):
        assert len(r["step_losses"]) == 8
        # Exactly equal: the same samples, dropout and crops per rank, and the same mean gradient bit for bit.
        torch.testing.assert_close(
            torch.tensor(g["step_losses"], dtype=torch.float64),
            torch.tensor(r["step_losses"], dtype=torch.float64),
            rtol=0,
            atol=0,
            msg=lambda m, epoch=g["epoch"]: f"epoch {epoch}: the two-host step losses differ from one host's: {m}",
        )
        assert {k: g[k] for k in COMPARED} == {k: r[k] for k in COMPARED}
    assert got.weights.keys() == ref.weights.keys()
    for key, value in ref.weights.items():
        torch.testing.assert_close(got.weights[key], value, rtol=0, atol=0, msg=f"final weights differ in {key}")


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> MnistFiles:
    # 284 images: the default validation split holds out round(28.4) = 28, leaving 256 = 8 steps of 32 per epoch.
    return make_mnist(tmp_path_factory.mktemp("source"), n_train=284, n_test=64, seed=5)


@pytest.fixture(scope="module")
def one_host(source: MnistFiles, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """The reference: one host, two workers, the same global batch."""
    home = tmp_path_factory.mktemp("one-host") / "home"
    _ingest(home, source)
    with _hosts() as hosts:
        _start(hosts, "one-host", home, "--run-name", "one-host", "--workers", "2")
        _wait(hosts, time.monotonic() + TIMEOUT_S)
    run = _load(home / "runs" / "one-host", hosts[0].output())
    assert "2 worker(s) x 16 = batch 32" in run.output, run.output
    losses = [x for h in run.history for x in h["step_losses"]]
    assert losses[0] != losses[-1], "the reference should learn: a comparison of constants proves nothing"
    return run


def test_two_hosts_sharing_a_home_equal_one_host_with_two_workers(
    source: MnistFiles, one_host: Run, tmp_path: Path
) -> None:
    home = tmp_path / "volume" / "home"  # one folder for both hosts, like pods on one PersistentVolumeClaim
    _ingest(home, source)
    run_dir = home / "runs" / "shared"
    endpoint = f"127.0.0.1:{free_port()}"
    deadline = time.monotonic() + TIMEOUT_S
    with _hosts() as hosts:
        node0 = _start(hosts, "node0", home, *_two_hosts(endpoint, "shared", "--node-rank", "0"))
        # Node 1 starts once node 0 has opened the MLflow run and written it into the shared job file, as a pod
        # scheduled later would: its own preparation of the same job must not drop that run from the job file.
        _wait_for(run_dir / "mlflow_run_id", node0, deadline)
        _start(hosts, "node1", home, *_two_hosts(endpoint, "shared", "--node-rank", "1"))
        _wait(hosts, deadline)
    outputs = "".join(h.output() for h in hosts)
    # One job of two ranks, one per agent, averaging over TCP (the one-host run averages through shared memory).
    started = "2 worker(s) x 16 = batch 32, 8 steps/epoch, 2 epochs, 28 validation images, gloo all-reduce"
    assert started in outputs, outputs
    assert sorted(p.name for p in (run_dir / "status").glob("*.done")) == ["rank-0.done", "rank-1.done"]
    for host in hosts:  # both hosts report the finished run with its results
        assert "run shared: cnn-dropout on tiny, 2 epochs, test accuracy" in host.output(), host.output()
    _assert_same_training(_load(run_dir, outputs), one_host)

    job = json.loads((run_dir / "job.json").read_text())
    assert job["world_size"] == 2
    assert job["mlflow_run_id"] == (run_dir / "mlflow_run_id").read_text().strip()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{home.resolve() / 'mlflow.db'}")
    run = client.get_run(job["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.params["world_size"] == "2"
    # Global rank 0 logged every epoch into the one run that node 0 opened.
    assert [m.step for m in client.get_metric_history(run.info.run_id, "test_accuracy")] == [1, 2]


def test_two_hosts_with_their_own_homes_equal_one_host_with_two_workers(
    source: MnistFiles, one_host: Run, tmp_path: Path
) -> None:
    homes = [tmp_path / "host0" / "home", tmp_path / "host1" / "home"]
    for home in homes:
        _ingest(home, source)
    endpoint = f"127.0.0.1:{free_port()}"
    deadline = time.monotonic() + TIMEOUT_S
    with _hosts() as hosts:
        # Node 1 first: c10d ranks the agents by host name, then pid, so here node 1's agent (the older one)
        # mostly gets global rank 0 and the hosts' numbering and torchrun's disagree. Either way must work.
        node1 = _start(hosts, "node1", homes[1], *_two_hosts(endpoint, "own", "--node-rank", "1"))
        _wait_for(homes[1] / "runs" / "own" / "job.json", node1, deadline)
        _start(hosts, "node0", homes[0], *_two_hosts(endpoint, "own", "--node-rank", "0"))
        _wait(hosts, deadline)
    with_results = [home for home in homes if (home / "runs" / "own" / "history.json").is_file()]
    assert len(with_results) == 1, "exactly one host, global rank 0's, holds the history"
    rank0_home = with_results[0]
    rank0_host = hosts[0] if rank0_home == homes[1] else hosts[1]
    other_host = hosts[1] if rank0_host is hosts[0] else hosts[0]
    assert "run own: cnn-dropout on tiny, 2 epochs, test accuracy" in rank0_host.output(), rank0_host.output()
    assert "this host's workers finished" in other_host.output(), other_host.output()
    assert "global rank 0 ran on another host" in other_host.output()
    _assert_same_training(_load(rank0_home / "runs" / "own", rank0_host.output()), one_host)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--nnodes", "2"], "--nnodes > 1 needs --rdzv-endpoint HOST:PORT"),
        (["--nnodes", "2", "--node-rank", "2", "--rdzv-endpoint", "127.0.0.1:29400"], "--node-rank 2 is outside 0..1"),
        (["--nnodes", "2", "--node-rank", "-1", "--rdzv-endpoint", "127.0.0.1:29400"], "--node-rank -1 is outside"),
        (["--node-rank", "1"], "--node-rank 1 is outside 0..0 for --nnodes 1"),
        (["--nnodes", "0"], "--nnodes 0 is not a number of hosts"),
        (["--nnodes", "2", "--rdzv-endpoint", "10.0.0.1"], "--rdzv-endpoint '10.0.0.1' is not HOST:PORT"),
        (["--nnodes", "2", "--rdzv-endpoint", "10.0.0.1:http"], "is not HOST:PORT"),
        (["--nnodes", "2", "--rdzv-endpoint", "10.0.0.1:70000"], "is not HOST:PORT"),
    ],
)
def test_bad_multi_host_flags_are_one_line_before_anything_starts(
    source: MnistFiles, tmp_path: Path, args: list[str], needle: str
) -> None:
    home = tmp_path / "home"
    _ingest(home, source)
    result = run_cli(*TRAIN, "--home", home, "--run-name", "bad", "--workers", "1", *args)
    assert result.code == 2, result.err
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.err
    assert needle in lines[0]
    assert "Traceback" not in result.err
    assert not (home / "runs" / "bad").exists(), "a refused job must leave no run folder"
    assert not (home / "mlflow.db").exists(), "nor an MLflow run"
