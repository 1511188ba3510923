"""Candidates and search trials on a Ray cluster: sized by the cluster's CPUs, spread over its nodes, same results.

The first tests check the sizing and the plumbing without a cluster (a cluster's nodes are stubbed): the
scheduler and the trial executor count the cluster's CPUs instead of this host's cores, ``candidate.json``
carries the ``[cluster]`` settings to the job's ``train()``, and no step's cache key or study name depends on
them. The rest run the real thing on a two-node local cluster (one CPU per node, everything on loopback), the
way a user does: ``distml run --ray`` and ``distml tune --ray`` in a subprocess. Two 1-worker candidates then
run at once, one on each node (each run's ``placement.json`` says where), and are selected and registered as
locally; the same command without ``--ray`` is a cache hit from end to end; two concurrent trials also land one
on each node, and the study is the one a local ``distml tune`` continues.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

from conftest import make_image_folder, pipeline_config, step_decisions
from distml.config import ClusterConfig, DistmlConfig, TrainConfig, load_config
from distml.errors import UsageError
from distml.train.candidates import placement_line, plan
from distml.workspace import Workspace
from ray_cluster import LocalRayCluster, ray_cluster  # noqa: F401  (the module's two-node cluster)

RAY = ClusterConfig(engine="ray", address="127.0.0.1:6379")


def _cfg(**kw: object) -> TrainConfig:
    return TrainConfig.model_validate({"dataset": "tiny", "workers": 1, "epochs": 1, **kw})


@dataclass(frozen=True)
class _Node:
    node_id: str
    ip: str
    cpus: float
    gpus: float


# -- without a cluster: the sizing and the plumbing ------------------------------------------------------------
def test_on_ray_the_candidates_are_sized_by_the_clusters_cpus(tmp_path: Path) -> None:
    # Two nodes of 1 CPU: two 1-worker candidates run at once with one thread each, and a lone candidate's worker
    # gets one node's CPU, not the cluster's two (a worker runs on one node).
    two = plan([_cfg(), _cfg()], cores=2, gpus=0, prefix="p", home=tmp_path, node_cores=1, where="on the Ray cluster")
    assert [(j.threads, j.slots) for j in two] == [(1, 1), (1, 1)]
    assert [(j.threads, j.slots) for j in plan([_cfg()], cores=2, gpus=0, prefix="p", home=tmp_path)] == [(2, 2)]
    (lone,) = plan([_cfg()], cores=2, gpus=0, prefix="p", home=tmp_path, node_cores=1)
    assert (lone.threads, lone.slots) == (1, 1)
    # More workers than the cluster's CPUs never fit there, whatever allow_oversubscribe says (it does here).
    with pytest.raises(UsageError, match=r"candidate cnn: --workers 3 is more than the 2 CPUs of the Ray cluster"):
        plan([_cfg(workers=3, allow_oversubscribe=True)], cores=2, gpus=0, prefix="p", home=tmp_path, node_cores=1)
    assert plan([_cfg(workers=3, allow_oversubscribe=True)], cores=2, gpus=0, prefix="p", home=tmp_path)
    with pytest.raises(UsageError, match="threads_per_worker 2 is more than the 1 CPUs of the largest Ray node"):
        plan([_cfg(threads_per_worker=2)], cores=2, gpus=0, prefix="p", home=tmp_path, node_cores=1)
    with pytest.raises(UsageError, match=r"more than the 1 GPU\(s\) on the Ray cluster"):
        plan([_cfg(workers=2)], cores=8, gpus=1, prefix="g", home=tmp_path, where="on the Ray cluster")


def test_the_resources_of_a_ray_cluster_are_its_alive_nodes(monkeypatch: pytest.MonkeyPatch) -> None:
    import types

    import distml.cluster
    from distml.train.resources import count_resources

    nodes = [_Node("a" * 56, "127.0.0.1", 1.0, 0.0), _Node("b" * 56, "127.0.0.1", 2.0, 1.0)]
    connected: list[str] = []

    def init(address: str, **kwargs: object) -> None:
        connected.append(address)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # as ray.init does: it replaces the driver's handler

    class _AuthError(Exception):
        pass

    errors = types.SimpleNamespace(AuthenticationError=_AuthError)
    fake_ray = types.SimpleNamespace(is_initialized=lambda: bool(connected), init=init, exceptions=errors)

    def mine(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    # distml.cluster.connect itself runs; only Ray (and its checks of a live cluster) are stand-ins
    monkeypatch.setattr(distml.cluster, "require_ray", lambda: fake_ray)
    for check in ("_probe", "_check_token", "_require_local_node"):
        monkeypatch.setattr(distml.cluster, check, lambda *a, **k: None)
    monkeypatch.setattr(distml.cluster, "nodes", lambda: nodes)
    previous = signal.signal(signal.SIGTERM, mine)
    try:
        res = count_resources(RAY)
        assert signal.getsignal(signal.SIGTERM) is mine  # the caller's interrupt handling stays in force
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert connected == ["127.0.0.1:6379"]
    assert (res.cores, res.gpus, res.node_cores, res.nodes, res.cluster) == (3, 1, 2, 2, RAY)
    assert res.describe() == "3 CPUs, 1 GPUs on 2 Ray node(s) at 127.0.0.1:6379"
    local = count_resources(ClusterConfig())  # the local engine counts this host, and connects to nothing
    assert local.cluster is None and local.node_cores is None and connected == ["127.0.0.1:6379"]


def test_candidate_json_carries_the_cluster_to_the_jobs_train(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import distml.train.candidates as candidates
    import distml.train.launch

    started: list[dict[str, str]] = []

    class Popen:
        def __init__(self, cmd: list[str], **kw: Any) -> None:
            started.append(kw["env"])

    monkeypatch.setattr(candidates.subprocess, "Popen", Popen)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    run_dir = tmp_path / "runs" / "r"
    candidates.start_job(_cfg(), Workspace(tmp_path), run_dir, 1, [0], cluster=RAY)
    doc = json.loads((run_dir / "candidate.json").read_text())
    assert doc["cluster"] == RAY.model_dump(mode="json") and doc["threads_per_worker"] == 1
    # Ray gives each worker its GPU: this host's device numbers mean nothing on the nodes.
    assert "CUDA_VISIBLE_DEVICES" not in started[0]
    candidates.start_job(_cfg(), Workspace(tmp_path), tmp_path / "runs" / "l", 1, [1])
    assert started[1]["CUDA_VISIBLE_DEVICES"] == "1"
    assert "cluster" not in json.loads((tmp_path / "runs" / "l" / "candidate.json").read_text())

    seen: list[ClusterConfig | None] = []

    def train(cfg: TrainConfig, workspace: Workspace, run_name: str, **kw: Any) -> Any:
        seen.append(kw.get("cluster"))
        raise UsageError("stop here")

    monkeypatch.setattr(distml.train.launch, "train", train)
    handler = signal.getsignal(signal.SIGTERM)
    try:
        assert candidates._main([str(tmp_path), str(run_dir / "candidate.json"), "r"]) == 2
    finally:
        signal.signal(signal.SIGTERM, handler)  # the job's process sets its own; this one is pytest's
    assert seen == [RAY]


def test_the_trial_executor_on_ray_sizes_trials_by_the_cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import distml.train.candidates
    import distml.train.resources
    from distml.search.executor import RayExecutor
    from distml.train.resources import Resources

    monkeypatch.setattr(
        distml.train.resources, "count_resources", lambda c: Resources(2, 0, node_cores=1, cluster=c, nodes=2)
    )
    executor = RayExecutor(Workspace(tmp_path), RAY)
    assert (executor.capacity(_cfg(), 3), executor.threads) == (2, 1)  # one trial per node
    assert (executor.capacity(_cfg(), 1), executor.threads) == (1, 1)  # not 2 threads: no node has 2 CPUs
    with pytest.raises(UsageError, match="workers 3 is more than the 2 CPUs of the Ray cluster"):
        executor.capacity(_cfg(workers=3, allow_oversubscribe=True), 1)
    given: list[object] = []
    monkeypatch.setattr(distml.train.candidates, "start_job", lambda *a, **kw: given.append(kw.get("cluster")))
    executor.start(_cfg(), tmp_path / "runs" / "s-t000", {})
    assert given == [RAY]


def _keys(config: DistmlConfig, *, search: bool, ray: bool) -> list[tuple[str, Any, Any, Any]]:
    """(name, params, code, libs) of each step dag.build makes: what a step's key hashes besides its inputs."""
    from distml.pipeline import dag

    cores, node_cores = (2, 1) if ray else (8, None)
    steps = dag.build(
        Workspace(config.workspace.home), config, search=search, refit=search, cores=cores, node_cores=node_cores
    )
    return [(s.name, s.params, s.code, s.libs) for s in steps]


def test_the_cluster_settings_are_in_no_step_key_or_study_name(tmp_path: Path) -> None:
    images = make_image_folder(tmp_path / "images", per_class=4)
    path = pipeline_config(tmp_path, images, "\n[search.space]\nlr = [0.01, 0.02]\n")
    local = load_config(path, overrides={"workspace.home": str(tmp_path / "home")})
    on_ray = load_config(
        path,
        overrides={"workspace.home": str(tmp_path / "home"), "cluster.engine": "ray",
                   "cluster.address": "127.0.0.1:6379", "cluster.placement": "spread"},
    )  # fmt: skip
    for search in (False, True):
        assert _keys(local, search=search, ray=False) == _keys(on_ray, search=search, ray=True)
    from distml.pipeline.search_step import search_params

    assert search_params(local, local.train) == search_params(on_ray, on_ray.train)


def test_placement_line_names_each_ranks_node(tmp_path: Path) -> None:
    run = tmp_path / "pl-cnn-0123456789"
    run.mkdir()
    assert placement_line(run) is None  # a local run writes none
    ranks = [
        {"rank": 1, "local_rank": 0, "node_id": "b" * 56, "node_ip": "127.0.0.1", "pid": 2, "attempt": 1},
        {"rank": 0, "local_rank": 0, "node_id": "a" * 56, "node_ip": "127.0.0.1", "pid": 1, "attempt": 1},
    ]
    (run / "placement.json").write_text(json.dumps(ranks))
    assert placement_line(run) == (
        "pl-cnn-0123456789: rank 0 on node aaaaaaaa (127.0.0.1), rank 1 on node bbbbbbbb (127.0.0.1) (attempt 2)"
    )


# -- on a real two-node cluster ---------------------------------------------------------------------------------
SEARCH = """
[search]
sampler = "grid"
pruner = "none"

[search.space]
lr = [0.01, 0.02]
"""
FAST = ["--epochs", "1", "--workers", "1"]


@dataclass(frozen=True)
class _Workspace:
    home: Path
    config: Path


@dataclass(frozen=True)
class _Ran:
    out: str
    record: dict[str, Any]


def _distml(env: dict[str, str], *args: str | Path, timeout_s: float = 240) -> subprocess.CompletedProcess[str]:
    """``distml ARGS`` in its own process, as a user runs it (with the cluster's token in ``env``, or not)."""
    env = {k: v for k, v in env.items() if k != "MLFLOW_TRACKING_URI"}  # the workspace's own store
    return subprocess.run(
        [sys.executable, "-m", "distml", *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> _Workspace:
    """A tiny image folder (3 classes x 16 images, 16x16 grey) and a config with a 2-point grid search."""
    tmp = tmp_path_factory.mktemp("ray-pipeline")
    images = make_image_folder(tmp / "images", per_class=16)
    return _Workspace(tmp / "home", pipeline_config(tmp, images, SEARCH))


@pytest.fixture(scope="module")
def ray_run(ray_cluster: LocalRayCluster, workspace: _Workspace) -> _Ran:  # noqa: F811
    """``distml run --ray``: two 1-worker candidates on the two 1-CPU nodes, then select and register."""
    done = _distml(
        ray_cluster.client_env(),
        "--home", workspace.home, "run", "--config", workspace.config, "--ray", ray_cluster.address,
        "--candidates", "cnn,cnn-dropout", *FAST,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr + ray_cluster.log(0)[-2000:]
    run_id = next(ln for ln in done.stdout.splitlines() if ln.startswith("pipeline run ")).split()[2].rstrip(":")
    record = json.loads((workspace.home / "pipeline" / "runs" / run_id / "run.json").read_text())
    return _Ran(done.stdout, record)


@pytest.mark.timeout(600)  # with the fixture: a cluster, two Ray jobs, select, register (209 s at load 6 on 2 cores)
def test_run_on_ray_spreads_the_candidates_over_the_nodes_and_registers_as_locally(ray_run: _Ran) -> None:
    out, record = ray_run.out, ray_run.record
    assert "2 CPUs, 0 GPUs on 2 Ray node(s) at 127.0.0.1:" in out
    steps = record["steps"]
    assert list(steps) == ["ingest", "train[cnn]", "train[cnn-dropout]", "select", "register"]
    assert all(s["status"] == "done" and s["cache"] == "ran" for s in steps.values()), steps
    runs = [Path(steps[name]["outputs"]["run_dir"]) for name in ("train[cnn]", "train[cnn-dropout]")]
    placements = [json.loads((run / "placement.json").read_text()) for run in runs]
    assert [[r["rank"] for r in p] for p in placements] == [[0], [0]]
    # Each node has one CPU and both jobs ran at once (the scheduler counted the cluster's 2 CPUs): one per node.
    assert placements[0][0]["node_id"] != placements[1][0]["node_id"]
    # The end of the output says where each job ran, from those files.
    assert "where the jobs ran" in out
    for run in runs:
        assert f"  {placement_line(run)}" in out.splitlines()
    # The same records as a local run: results, MLflow runs, a registered champion.
    for run in runs:
        assert (run / "result.json").is_file() and (run / "mlflow_run_id").read_text().strip()
    assert record["lineage"]["model"]["version"] == "1" and "is champion" in out


@pytest.mark.timeout(600)
def test_a_cluster_only_change_is_a_cache_hit(ray_run: _Ran, workspace: _Workspace) -> None:
    """The same command on this host's processes (no --ray) reruns nothing: the engine is in no step's key."""
    local = _distml(
        dict(os.environ), "--home", workspace.home, "run", "--config", workspace.config,
        "--candidates", "cnn,cnn-dropout", *FAST,
    )  # fmt: skip
    assert local.returncode == 0, local.stdout + local.stderr
    decisions = step_decisions(local.stdout)
    assert list(decisions) == list(ray_run.record["steps"]), decisions
    assert all(d.startswith("hit: same inputs as run ") for d in decisions.values()), decisions
    assert "where the jobs ran" not in local.stdout


@pytest.mark.timeout(600)  # two concurrent 1-epoch trials on Ray, then a local tune: 183 s at load 6 on 2 cores
def test_tune_on_ray_runs_trials_on_the_nodes_and_is_the_local_study(
    ray_cluster: LocalRayCluster,  # noqa: F811
    ray_run: _Ran,
    workspace: _Workspace,
) -> None:
    from distml.search.result import load_study_result
    from distml.search.trials import trial_run_dir

    dataset = ray_run.record["steps"]["ingest"]["outputs"]["dataset"]
    args = ["--home", workspace.home, "--config", workspace.config, "tune", "--dataset", dataset, "--study", "rs",
            "--trials", "2", "--max-concurrent", "2", "--epochs", "1", "--workers", "1"]  # fmt: skip
    tuned = _distml(ray_cluster.client_env(), *args, "--ray", ray_cluster.address)
    assert tuned.returncode == 0, tuned.stdout + tuned.stderr
    assert "running 1 trial(s) at once" not in tuned.stdout  # two at once: the cluster has 2 CPUs
    result = load_study_result(Workspace(workspace.home), "rs")
    assert [(t["number"], t["state"]) for t in result.trials] == [(0, "COMPLETE"), (1, "COMPLETE")]
    assert sorted(t["params"]["lr"] for t in result.trials) == [0.01, 0.02]
    runs = [trial_run_dir(workspace.home, "rs", n) for n in (0, 1)]
    assert [t["run_dir"] for t in result.trials] == [str(r) for r in runs]
    nodes = {json.loads((run / "placement.json").read_text())[0]["node_id"] for run in runs}
    assert len(nodes) == 2  # the two concurrent trials, one on each node
    assert "where the trials ran" in tuned.stdout
    # Each trial's MLflow run is a child of the study's run, as locally (the launcher reads the same environment).
    assert all((run / "mlflow_run_id").read_text().strip() for run in runs)
    # The study is the one the same command without --ray continues: nothing new to run in it.
    local = _distml(dict(os.environ), *args)
    assert local.returncode == 0, local.stdout + local.stderr
    assert "study rs (" in local.stdout and "2 trial(s) done, 0 interrupted, 0 new to run" in local.stdout
    assert "nothing to run: the study has its 2 trial(s)" in local.stdout
