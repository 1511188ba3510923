"""``distml k8s render --engine ray``: a KubeRay RayCluster + RayJob matching the committed golden files, valid
against KubeRay's CRDs, restricted pods with no token rendered, NetworkPolicies that admit Ray's pinned ports from
the same cluster's pods only, the config ``distml run`` reads, one-line errors for bad settings, and a real Ray
node that listens on nothing but the ports the render pins.

Regenerate the golden files after an intended change: ``DISTML_UPDATE_GOLDEN=1 pytest tests/test_k8s_ray.py``.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import pytest
import yaml

from conftest import free_port, run_cli, run_cli_fresh
from distml.config import load_config
from distml.pipeline.shape import candidate_configs
from test_k8s import CRDS, GOLDEN, SINK, _security_problems, _tree, requires_crds

RAY_CLI = Path(sys.executable).with_name("ray")
requires_ray = pytest.mark.skipif(not RAY_CLI.is_file(), reason="Ray is an optional extra: pip install 'distml[ray]'")

# The default config on KubeRay; and a search with a refit on GPUs: a folder dataset on the volume, an existing
# MLflow and logger sink, 4-worker trials of 2 pods, two at once on a cluster of 3 worker pods (one trial waits).
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "ray": (SINK, ["--engine", "ray"]),
    "ray-gpu-search": (
        """
[pipeline]
dataset = "folder"
source = "/data/flowers"
image_size = [64, 64]

[train]
workers = 4
epochs = 12

[search]
trials = 8
max_concurrent = 2
epochs = 6
enqueue = [{ model = "resnet-small", lr = 0.003 }]

[search.space]
model = ["resnet-small", "cnn-batchnorm"]
lr = { low = 1e-3, high = 1e-2, log = true }
batch_size = [128, 256]

[k8s]
engine = "ray"
ray_run = "search+refit"
ray_worker_pods = 3
ray_head_cpu = "4"
ray_head_memory = "16Gi"
ray_operator_namespace = "kuberay-system"
image = "registry.example.com/ml/distml-cuda:0.1.0"
procs_per_node = 2
gpus_per_node = 2
cpu_per_worker = 4
memory_per_worker = "16Gi"
access_mode = "ReadWriteMany"
storage_class = "nfs"
source = "/workspace/sources/flowers"
mlflow_uri = "http://mlflow.mlops.svc.cluster.local:5000"
logger_url = "http://broker-ingress.knative-eventing.svc.cluster.local/ml/default"
""",
        [],
    ),
}


def _render(tmp_path: Path, variant: str) -> Path:
    toml, args = VARIANTS[variant]
    config = tmp_path / f"{variant}.toml"
    config.write_text(toml)
    out = tmp_path / f"render-{variant}"
    result = run_cli("--config", config, "k8s", "render", "--out", out, *args)
    assert result.code == 0, result.out + result.err
    return out


def _docs(out: Path, name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((out / name).read_text()) if d]


def _cluster(out: Path) -> dict:
    (cluster,) = _docs(out, "ray-cluster.yaml")
    return cluster


def _job(out: Path) -> dict:
    (job,) = _docs(out, "ray-job.yaml")
    return job


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_ray_render_matches_the_golden_files(tmp_path: Path, variant: str) -> None:
    out = _render(tmp_path, variant)
    golden = GOLDEN / variant
    if os.environ.get("DISTML_UPDATE_GOLDEN"):
        shutil.rmtree(golden, ignore_errors=True)
        shutil.copytree(out, golden)
    rendered, expected = _tree(out), _tree(golden)
    assert sorted(rendered) == sorted(expected)
    for name in expected:
        assert rendered[name] == expected[name], f"{variant}/{name} differs from its golden file"
    # No Argo objects: the RayJob runs the pipeline.
    assert not {"workflow.yaml", "workflow-template.yaml", "training-runtime.yaml"} & set(rendered)
    kustomized = yaml.safe_load(rendered["kustomization.yaml"])["resources"]
    assert "ray-cluster.yaml" in kustomized and "ray-job.yaml" not in kustomized  # a RayJob per run


def test_the_default_engine_is_argo_and_its_render_is_unchanged(tmp_path: Path) -> None:
    """``--engine argo`` is the default render, byte for byte (its golden files are test_k8s.py's)."""
    config = tmp_path / "c.toml"
    config.write_text(SINK)
    result = run_cli("--config", config, "k8s", "render", "--out", tmp_path / "argo", "--engine", "argo")
    assert result.code == 0, result.err
    assert _tree(tmp_path / "argo") == _tree(GOLDEN / "default")


def test_the_render_says_what_runs_and_where_the_token_is(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(SINK)
    result = run_cli("--config", config, "k8s", "render", "--out", tmp_path / "out", "--engine", "ray")
    assert result.code == 0, result.err
    assert "RayCluster distml-ray (head + 6 worker pods of 2 cores), RayJob: distml --config " in result.out
    assert "the Secret distml-ray (key auth_token)" in result.out
    assert result.out.strip().endswith(f"kubectl create -f {tmp_path / 'out'}/ray-job.yaml")


def test_a_ray_render_loads_neither_ray_nor_torch(tmp_path: Path) -> None:
    """The render is text: Ray, torch, MLflow and the training code stay unloaded (Ray need not be installed)."""
    config = tmp_path / "c.toml"
    config.write_text(VARIANTS["ray-gpu-search"][0])
    result, loaded = run_cli_fresh(tmp_path, "--config", config, "k8s", "render", "--out", tmp_path / "out")
    assert result.code == 0, result.err
    assert not loaded & {"ray", "torch", "mlflow", "optuna"}, loaded
    assert (tmp_path / "out" / "ray-cluster.yaml").is_file()


@requires_crds
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_ray_render_validates(tmp_path: Path, variant: str) -> None:
    out = _render(tmp_path, variant)
    result = run_cli("k8s", "validate", out, "--crds", CRDS, "-v")
    assert result.code == 0, result.out + result.err
    assert "ray-cluster.yaml: RayCluster/distml-ray (against CRD ray.io_rayclusters.yaml)" in result.out
    assert "ray-job.yaml: RayJob/distml-run-* (against CRD ray.io_rayjobs.yaml)" in result.out
    assert "network-policy.yaml: NetworkPolicy/distml-ray (against Kubernetes 1.33 OpenAPI (strict))" in result.out
    assert "storage.yaml: PersistentVolumeClaim/distml-workspace (against Kubernetes" in result.out


@requires_crds
def test_a_broken_ray_manifest_is_caught_with_its_field_path(tmp_path: Path) -> None:
    """Each RayCluster/RayJob problem is named with its field path, and a RayJob selecting a RayCluster the
    folder does not hold is an error (KubeRay would wait for it forever)."""
    out = _render(tmp_path, "ray")
    cluster = _cluster(out)
    cluster["spec"]["authOptions"]["mode"] = "tokens"  # not in the CRD's enum
    cluster["spec"]["workerGroupSpecs"][0]["replicas"] = "six"  # a string where the CRD wants an integer
    cluster["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0  # rayStartParams are strings
    (out / "ray-cluster.yaml").write_text(yaml.safe_dump(cluster))
    job = _job(out)
    job["spec"]["clusterSelector"]["ray.io/cluster"] = "distml-rey"
    job["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["imagePullPolice"] = "Always"  # a typo
    (out / "ray-job.yaml").write_text(yaml.safe_dump(job))

    result = run_cli("k8s", "validate", out, "--crds", CRDS)
    assert result.code == 1
    errors = [ln.strip() for ln in result.err.splitlines() if ln.strip().startswith("error ")]
    mode = "error  ray-cluster.yaml: RayCluster/distml-ray: spec.authOptions.mode: 'tokens' is not one of"
    assert any(e.startswith(mode) for e in errors), result.err
    assert (
        "error  ray-cluster.yaml: RayCluster/distml-ray: spec.workerGroupSpecs[0].replicas: 'six' is not of type "
        "'integer'"
    ) in errors, result.err
    assert (
        "error  ray-cluster.yaml: RayCluster/distml-ray: spec.headGroupSpec.rayStartParams.num-cpus: 0 is not of "
        "type 'string'"
    ) in errors, result.err
    assert any(
        e.startswith("error  ray-job.yaml: RayJob/distml-run-*: spec.submitterPodTemplate.spec.containers[0]: ")
        and "'imagePullPolice' was unexpected" in e
        for e in errors
    ), result.err
    assert (
        "error  ray-job.yaml: RayJob/distml-run-*: spec.clusterSelector.ray.io/cluster: no RayCluster 'distml-rey' "
        f"in {out}"
    ) in errors, result.err
    assert "5 problem(s)" in result.err and "Traceback" not in result.err


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_the_ray_job_runs_distml_run_on_the_rendered_config(tmp_path: Path, variant: str) -> None:
    """The RayJob's entrypoint is ``distml run --ray auto`` (``--search --refit`` as configured), its options
    exist, and the distml.toml it reads gives ``distml run`` the same candidates / search as the user's config,
    each worker asking for the cores its pod offers."""
    out = _render(tmp_path, variant)
    config = load_config(tmp_path / f"{variant}.toml")
    entry = shlex.split(_job(out)["spec"]["entrypoint"])
    search = ["--search", "--refit"] if variant == "ray-gpu-search" else []
    assert entry == ["distml", "--config", "/etc/distml/distml.toml", "run", "--ray", "auto", *search]
    help_run = run_cli(*entry[1:], "--help")  # every option parses ('--help' last: parsing comes first)
    assert help_run.code == 0 and "--ray ADDRESS" in help_run.out, help_run.err

    (cm,) = _docs(out, "config.yaml")
    assert set(cm["data"]) == {"distml.toml"}
    (tmp_path / "cluster.toml").write_text(cm["data"]["distml.toml"])
    cluster = load_config(tmp_path / "cluster.toml")
    cores = config.k8s.cpu_per_worker
    assert cluster.train == config.train.model_copy(update={"threads_per_worker": cores})
    if variant == "ray-gpu-search":
        assert cluster.search == config.search and not cluster.candidates
        assert cluster.pipeline.source == "/workspace/sources/flowers"  # the cluster's copy
    else:
        want = [c.model_copy(update={"threads_per_worker": cores}) for c in candidate_configs(config)]
        assert candidate_configs(cluster) == want and len(want) == 3
        assert cluster.pipeline.source is None and cluster.pipeline.candidates == config.pipeline.candidates
    assert cluster.pipeline.model_dump(exclude={"source"}) == config.pipeline.model_dump(exclude={"source"})
    assert cluster.data == config.data and cluster.serve.port == config.serve.port
    # The driver reads it from the config volume, which every Ray pod mounts with the workspace (same paths).
    for group in _groups(_cluster(out)):
        mounts = {m["mountPath"]: m["name"] for m in group["template"]["spec"]["containers"][0]["volumeMounts"]}
        assert mounts["/etc/distml"] == "config" and mounts["/workspace"] == "workspace"
        volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
        assert volumes["workspace"] == {"name": "workspace", "persistentVolumeClaim": {"claimName": "distml-workspace"}}


def _groups(cluster: dict) -> list[dict]:
    """The head group and the worker groups of a RayCluster."""
    return [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_ray_pods_are_restricted_and_no_token_is_rendered(tmp_path: Path, variant: str) -> None:
    """Head, workers and the submitter: the restricted Pod Security Standard, a read-only root with scratch at
    /tmp, no Kubernetes token; the only sysctl a safe one. Ray's token comes from KubeRay (authOptions), which
    generates the Secret and sets the variables: nothing secret is in the folder."""
    out = _render(tmp_path, variant)
    cluster, job = _cluster(out), _job(out)
    pods = [(g.get("groupName", "head"), g["template"]["spec"]) for g in _groups(cluster)]
    pods.append(("submitter", job["spec"]["submitterPodTemplate"]["spec"]))
    problems = [f"{where}: {p}" for where, pod in pods for p in _security_problems(pod)]
    assert not problems, "\n".join(problems)
    accounts = {d["metadata"]["name"] for d in _docs(out, "rbac.yaml") if d["kind"] == "ServiceAccount"}
    for where, pod in pods:
        assert pod["automountServiceAccountToken"] is False, where
        assert pod["serviceAccountName"] in accounts, where
        sysctls = {s["name"] for s in pod["securityContext"].get("sysctls", [])}
        assert sysctls <= {"net.ipv4.ip_local_port_range"}, where  # a "safe" sysctl: restricted pods may set it
    assert cluster["spec"]["authOptions"] == {"mode": "token"}
    text = "\n".join(_tree(out).values())
    assert "RAY_AUTH_TOKEN" not in text and "auth_token" not in text
    assert not [d for name in _tree(out) if name.endswith(".yaml") for d in _docs(out, name) if d["kind"] == "Secret"]
    assert not [d for d in _docs(out, "rbac.yaml") if d["kind"] in ("Role", "RoleBinding")]  # nothing calls the API


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_the_cluster_is_sized_from_the_k8s_settings(tmp_path: Path, variant: str) -> None:
    """Worker pods offer procs_per_node workers' cores (and GPUs); the head runs no training."""
    out = _render(tmp_path, variant)
    config = load_config(tmp_path / f"{variant}.toml").k8s
    head, workers = _groups(_cluster(out))
    assert head["rayStartParams"]["num-cpus"] == "0"
    head_limits = head["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert head_limits == {"cpu": config.ray_head_cpu, "memory": config.ray_head_memory}
    cores = config.cpu_per_worker * config.procs_per_node
    limits = workers["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert workers["rayStartParams"]["num-cpus"] == str(cores) and limits["cpu"] == str(cores)
    if config.gpus_per_node:
        assert workers["rayStartParams"]["num-gpus"] == limits["nvidia.com/gpu"] == str(config.gpus_per_node)
    else:
        assert "num-gpus" not in workers["rayStartParams"] and "nvidia.com/gpu" not in limits
    # Default: room for every candidate's job at once (3 jobs of 2 pods); or the configured size.
    pods = config.ray_worker_pods or 6
    assert workers["replicas"] == workers["minReplicas"] == workers["maxReplicas"] == pods
    images = {c["image"] for g in _groups(_cluster(out)) for c in g["template"]["spec"]["containers"]}
    images |= {c["image"] for c in _job(out)["spec"]["submitterPodTemplate"]["spec"]["containers"]}
    assert images == {config.image}


def _ports(rules: list[dict]) -> set[tuple[int, int]]:
    """The (first, last) TCP port ranges a policy's rules name."""
    return {(p["port"], p.get("endPort", p["port"])) for r in rules for p in r["ports"]}


def _covered(port: int, ranges: set[tuple[int, int]]) -> bool:
    return any(low <= port <= high for low, high in ranges)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_ray_ports_are_admitted_only_from_the_same_clusters_pods(tmp_path: Path, variant: str) -> None:
    """Every port a Ray node is started on (rayStartParams) and the pods' ephemeral range (the sysctl: torch's
    rendezvous and gloo/NCCL) is admitted between the cluster's own pods and from nothing else; the job API
    (8265) also from the RayJob's submitter and KubeRay's operator, which reach nothing else."""
    out = _render(tmp_path, variant)
    config = load_config(tmp_path / f"{variant}.toml").k8s
    policies = {d["metadata"]["name"]: d["spec"] for d in _docs(out, "network-policy.yaml")}
    assert not {"distml-workflow", "distml-ingest", "distml-train"} & set(policies)  # Argo's pods are not here
    own = [{"podSelector": {"matchLabels": {"ray.io/cluster": "distml-ray"}}}]
    ray = policies["distml-ray"]
    assert ray["podSelector"] == own[0]["podSelector"]
    (peers,) = ray["ingress"]
    assert peers["from"] == own
    egress_to_own = [r for r in ray["egress"] if r.get("to") == own]
    assert len(egress_to_own) == 1 and _ports(egress_to_own) == _ports([peers])
    admitted = _ports([peers])
    cluster = _cluster(out)
    for group in _groups(cluster):
        params = group["rayStartParams"]
        started = {int(v) for k, v in params.items() if k.endswith("-port") or k == "port"}
        assert all(_covered(p, admitted) for p in started), (sorted(started), admitted)
        assert (int(params["min-worker-port"]), int(params["max-worker-port"])) in admitted
        (sysctl,) = group["template"]["spec"]["securityContext"]["sysctls"]
        low, high = map(int, sysctl["value"].split())
        assert (low, high) in admitted  # what gloo/NCCL and MASTER_PORT bind
    head_params = _groups(cluster)[0]["rayStartParams"]
    assert [head_params[k] for k in ("port", "dashboard-port", "ray-client-server-port")] == ["6379", "8265", "10001"]
    # The head's job API: from the submitter and the operator's namespace only, on 8265 only.
    head = policies["distml-ray-head"]
    assert head["podSelector"]["matchLabels"] == {"ray.io/cluster": "distml-ray", "ray.io/node-type": "head"}
    (api,) = head["ingress"]
    assert _ports([api]) == {(8265, 8265)}
    submitter = {"app.kubernetes.io/name": "distml", "app.kubernetes.io/component": "ray-submitter"}
    operator_ns = {"kubernetes.io/metadata.name": config.ray_operator_namespace}
    assert api["from"] == [
        {"podSelector": {"matchLabels": submitter}},
        {
            "namespaceSelector": {"matchLabels": operator_ns},
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}},
        },
    ]
    submitter_labels = _job(out)["spec"]["submitterPodTemplate"]["metadata"]["labels"]
    assert api["from"][0]["podSelector"]["matchLabels"].items() <= submitter_labels.items()
    (to_api,) = policies["distml-ray-submitter"]["egress"]
    assert to_api == {"to": [{"podSelector": head["podSelector"]}], "ports": [{"protocol": "TCP", "port": 8265}]}
    assert "ingress" not in policies["distml-ray-submitter"]
    # The driver on the head ingests: the dataset's mirrors (HTTPS) unless the source is on the volume.
    assert head.get("egress", []) == ([] if config.source else [{"ports": [{"protocol": "TCP", "port": 443}]}])
    # MLflow: from the Ray pods (when rendered); nothing but the pinned policies admit anything in.
    if "distml-mlflow" in policies:
        (clients,) = policies["distml-mlflow"]["ingress"]
        assert clients["from"][0]["podSelector"]["matchExpressions"][0]["values"] == ["ray"]
    admitting = {name for name, p in policies.items() if p.get("ingress")}
    assert admitting <= {"distml-ray", "distml-ray-head", "distml-mlflow", "distml-serve", "distml-request-log"}


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        # The CPU image has no CUDA or NCCL.
        ("[k8s]\ngpus_per_node = 1\n", "[k8s] gpus_per_node = 1 needs the CUDA image, but distml:0.1.0 is the CPU"),
        ("[train]\nworkers = 3\n[k8s]\nprocs_per_node = 2\n", "candidate cnn: 3 workers do not split into pods of 2"),
        (
            '[train]\nworkers = 3\n[k8s]\nprocs_per_node = 2\nray_run = "search"\n',
            "a search trial ([train] workers): 3 workers do not split into pods of 2",
        ),
        (
            "[k8s]\nray_worker_pods = 1\n",
            "candidate cnn: a job of 2 pod(s) x 1 worker(s) cannot fit on 1 Ray worker pod(s)",
        ),
        (
            '[k8s]\nimage = "distml-cuda:0.1.0"\ngpus_per_node = 1\nprocs_per_node = 2\n',
            "candidate cnn: 2 workers per pod but 1 GPUs per pod",
        ),
        ('[k8s]\nray_run = "tune"\n', "invalid config value k8s.ray_run='tune'"),
        ("[k8s]\nray_worker_pods = 0\n", "invalid config value k8s.ray_worker_pods=0"),
        ('[k8s]\nray_operator_namespace = "Kube_Ray"\n', "invalid config value k8s.ray_operator_namespace='Kube_Ray'"),
        ('[k8s]\nray_head_memory = "lots"\n', "invalid config value k8s.ray_head_memory='lots'"),
        ('[pipeline]\ndataset = "folder"\nsource = "/x"\n', "a folder dataset needs [k8s] source"),
    ],
)
def test_ray_render_refuses_bad_settings_with_one_line(tmp_path: Path, toml: str, message: str) -> None:
    config = tmp_path / "c.toml"
    config.write_text(toml.replace("[k8s]\n", SINK) if "[k8s]" in toml else toml + SINK)
    result = run_cli("--config", config, "k8s", "render", "--out", tmp_path / "out", "--engine", "ray")
    assert result.code == 2, result.out + result.err
    assert message in result.err and "Traceback" not in result.err
    assert len(result.err.strip().splitlines()) <= 2  # the error, and its hint
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_the_clusters_ray_is_the_pinned_extra() -> None:
    """rayVersion (KubeRay picks the health checks by it) is the version pyproject's ray extra pins."""
    from distml.k8s.ray import RAY_VERSION

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    (pin,) = pyproject["project"]["optional-dependencies"]["ray"]
    assert pin.endswith(f"=={RAY_VERSION}")


# --- a real Ray node, started as KubeRay would start the render's head ----------------------------------------


def _listening(pids: list[int]) -> set[int]:
    """The TCP ports these processes listen on (their socket inodes, looked up in /proc/net/tcp{,6})."""
    inodes: set[str] = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target.startswith("socket:["):
                        inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # state LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def _tree_pids(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rpartition(")")[2].split()[1])
                children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


@requires_ray
def test_a_ray_head_listens_only_on_the_pinned_ports(tmp_path: Path) -> None:
    """``ray start`` with the rendered head's rayStartParams (each port moved to a free one here, the dashboard
    off as in every test): every port its processes listen on is one of them, or one the kernel picked (the
    ephemeral range, which the render pins by sysctl and admits). A Ray default port the render forgot to pin
    would show up here, and be refused by the NetworkPolicy in the cluster."""
    out = _render(tmp_path, "ray")
    head, workers = _groups(_cluster(out))
    params = dict(head["rayStartParams"])
    assert set(workers["rayStartParams"]) <= {*params, "num-gpus"}  # so ray start takes the workers' too
    for key in ("dashboard-host", "dashboard-port"):  # the dashboard stays off in tests
        del params[key]
    moved = {k: str(free_port()) for k in params if k.endswith("-port") and not k.endswith("worker-port")}
    moved["port"] = str(free_port())
    params |= moved | {"num-cpus": "1"}
    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    temp = Path(tempfile.mkdtemp(prefix="rk", dir="/tmp"))  # short: Ray's unix sockets live under it
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "t" * 32, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    args = [
        str(RAY_CLI),
        "start",
        "--head",
        "--block",
        "--disable-usage-stats",
        "--node-ip-address=127.0.0.1",
        "--include-dashboard=false",
        "--object-store-memory=100000000",
        f"--temp-dir={temp}",
        *(f"--{k}={v}" for k, v in params.items()),
    ]
    log = tmp_path / "ray-start.log"
    with log.open("w") as sink:  # a file, not a pipe: nothing has to drain it
        node = subprocess.Popen(args, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    # Without the dashboard, a head runs GCS, the raylet, the client server and the runtime-env agent (the last
    # to listen): the test waits for those, then a little longer for anything else.
    up = {int(moved[k]) for k in ("port", "node-manager-port", "object-manager-port", "runtime-env-agent-port")}
    try:
        deadline, seen = time.monotonic() + 120, set()
        pinned = {int(v) for v in moved.values()}
        while time.monotonic() < deadline and node.poll() is None and not up <= seen:
            time.sleep(0.5)
            seen = _listening(_tree_pids(node.pid))
        time.sleep(2)
        seen = _listening(_tree_pids(node.pid))
        assert node.poll() is None, f"ray start refused the rendered parameters:\n{log.read_text()[-3000:]}"
        assert up <= seen, f"the head's processes did not all come up: {sorted(seen)}, waiting for {sorted(up)}"
        worker_ports = range(int(params["min-worker-port"]), int(params["max-worker-port"]) + 1)
        stray = sorted(p for p in seen if p not in pinned and p not in worker_ports and not low <= p <= high)
        assert not stray, f"listening outside the pinned ports and the ephemeral range: {stray} (pinned {moved})"
    finally:
        pids = _tree_pids(node.pid)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in reversed(pids):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.wait(timeout=8)
        shutil.rmtree(temp, ignore_errors=True)
