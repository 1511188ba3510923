"""``distml k8s``: rendered manifests match the committed golden files and validate against the upstream CRDs
and the Kubernetes schemas; a broken manifest is caught with its field path; ``distml step`` (what the
workflow's containers run) computes the local runner's keys and does its steps.

Regenerate the golden files after an intended change: ``DISTML_UPDATE_GOLDEN=1 pytest tests/test_k8s.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from conftest import free_port, make_image_folder, run_cli
from distml.config import load_config

GOLDEN = Path(__file__).parent / "golden" / "k8s"
CRDS = Path(__file__).resolve().parents[2] / "shared" / "k8s-crds"
requires_crds = pytest.mark.skipif(not (CRDS / "argoproj.io_workflows.yaml").is_file(), reason="no ../shared/k8s-crds")

# The sink image the renders pin: a made-up digest (a real one is the user's to look up; see docs/kubernetes.md).
SINK_IMAGE = "gcr.io/knative-releases/knative.dev/eventing/cmd/event_display:v0-test@sha256:" + "0123456789abcdef" * 4
SINK = f'[k8s]\nlog_sink_image = "{SINK_IMAGE}"\n'

# The default config (but the one setting that has no default), and three variants: the v1 PyTorchJob with another
# image and namespace; a folder dataset on GPUs with [[candidates]], 4-worker jobs of 2 pods, an existing
# MLflow and logger sink; and serving over gRPC with a canary rollout (its port pinned, whatever the local one).
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "default": (SINK, []),
    "pytorchjob": (
        SINK,
        ["--training", "pytorchjob", "--image", "registry.example.com/distml:0.1.0", "--namespace", "ml-team"],
    ),
    "gpu-folder": (
        """
[pipeline]
dataset = "folder"
source = "/data/flowers"
image_size = [64, 64]
metric = "val_macro_f1"

[train]
workers = 4
epochs = 12
batch_size = 256

[[candidates]]
model = "resnet-small"

[[candidates]]
model = "resnet-small"
lr = 0.004
augment = "crop+flip"

[k8s]
image = "distml-cuda:0.1.0"
procs_per_node = 2
gpus_per_node = 2
cpu_per_worker = 4
memory_per_worker = "16Gi"
access_mode = "ReadWriteMany"
storage_class = "nfs"
source = "/workspace/sources/flowers"
mlflow_uri = "http://mlflow.mlops.svc.cluster.local:5000"
logger_url = "http://broker-ingress.knative-eventing.svc.cluster.local/ml/default"
serve_min_replicas = 0
serve_max_replicas = 10
serve_scale_metric = "rps"
serve_scale_target = 200
""",
        [],
    ),
    "serve-rollout": (
        SINK
        + '[serve]\ngrpc_port = 9000\ncanary = "models:/fashion-mnist-classifier@challenger"\ncanary_percent = 20\n',
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


def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_render_matches_the_golden_files(tmp_path: Path, variant: str) -> None:
    out = _render(tmp_path, variant)
    golden = GOLDEN / variant
    if os.environ.get("DISTML_UPDATE_GOLDEN"):
        shutil.rmtree(golden, ignore_errors=True)
        shutil.copytree(out, golden)
    rendered, expected = _tree(out), _tree(golden)
    assert sorted(rendered) == sorted(expected)
    for name in expected:
        assert rendered[name] == expected[name], f"{variant}/{name} differs from its golden file"


@requires_crds
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_render_validates(tmp_path: Path, variant: str) -> None:
    out = _render(tmp_path, variant)
    result = run_cli("k8s", "validate", out, "--crds", CRDS)
    assert result.code == 0, result.out + result.err
    n = int(re.search(r"(\d+) objects valid", result.out).group(1))  # type: ignore[union-attr]
    kinds = {"WorkflowTemplate", "Workflow", "InferenceService", "ServiceMonitor", "PrometheusRule", "Deployment"}
    assert all(f": {k}/" in result.out for k in kinds - ({"Deployment"} if variant == "gpu-folder" else set()))
    job = "PyTorchJob" if variant == "pytorchjob" else "TrainJob"
    assert result.out.count(f"{job}/{{{{workflow.name}}}}-") == (2 if variant == "gpu-folder" else 3)
    assert n >= 15


def test_the_rendered_pipeline_is_the_local_one(tmp_path: Path) -> None:
    """Same steps, same settings: the DAG, the candidates' config files, the serve command."""
    out = _render(tmp_path, "gpu-folder")
    config = load_config(tmp_path / "gpu-folder.toml")
    cm = yaml.safe_load((out / "config.yaml").read_text())["data"]
    # Each candidate's file is its [train] + [[candidates]] table, as 'distml run' trains it.
    for label, want in (("resnet-small", config.candidate_configs()[0]), ("resnet-small-2",
                                                                           config.candidate_configs()[1])):  # fmt: skip
        path = tmp_path / f"{label}.toml"
        path.write_text(cm[f"train-{label}.toml"])
        got = load_config(path).train
        assert got == want.model_copy(update={"threads_per_worker": 4}), label
    pipeline = tomllib.loads(cm["distml.toml"])["pipeline"]
    assert pipeline["source"] == "/workspace/sources/flowers" and pipeline["metric"] == "val_macro_f1"

    template = yaml.safe_load((out / "workflow-template.yaml").read_text())
    tasks = {t["name"]: t for t in template["spec"]["templates"][0]["dag"]["tasks"]}
    assert list(tasks) == ["ingest-key", "ingest", "job-network-resnet-small", "job-network-resnet-small-2",
                           "train-resnet-small", "train-resnet-small-2", "select", "register", "serve"]  # fmt: skip
    assert tasks["select"]["depends"] == "train-resnet-small && train-resnet-small-2"
    assert tasks["train-resnet-small"]["depends"] == "ingest && job-network-resnet-small"  # its policy first
    by_name = {t["name"]: t for t in template["spec"]["templates"]}
    assert by_name["ingest"]["memoize"]["key"] == "ingest-{{inputs.parameters.key}}"
    assert by_name["ingest-key"]["container"]["args"][2:] == ["step", "key", "ingest", "--outputs", "/tmp/outputs"]
    job = yaml.safe_load(by_name["train-resnet-small"]["resource"]["manifest"])
    trainer = job["spec"]["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (2, 2)  # 4 workers = 2 pods x 2 GPUs
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "2"
    assert trainer["args"] == ["--config", "/etc/distml/train-resnet-small.toml", "train", "--dataset",
                               "{{inputs.parameters.dataset}}", "--run-name", "{{workflow.name}}-resnet-small",
                               "--workers", "2", "--nnodes", "2", "--node-rank", "$(PET_NODE_RANK)",
                               "--rdzv-endpoint", "$(PET_MASTER_ADDR):$(PET_MASTER_PORT)"]  # fmt: skip
    select_args = by_name["select"]["container"]["args"]
    assert select_args[3:6] == ["select", "{{workflow.name}}-resnet-small", "{{workflow.name}}-resnet-small-2"]
    isvc = yaml.safe_load(by_name["serve"]["resource"]["manifest"])
    assert isvc["spec"]["predictor"]["annotations"]["distml.io/model-version"] == "{{inputs.parameters.version}}"
    assert isvc["spec"]["predictor"]["containers"][0]["args"][2:4] == ["serve", "{{inputs.parameters.ref}}"]
    assert not (out / "mlflow.yaml").exists() and not (out / "request-log.yaml").exists()  # existing ones named
    dashboard = json.loads((out / "monitoring" / "grafana-dashboard.json").read_text())
    assert {p["title"] for p in dashboard["panels"]} >= {"Error ratio (5xx)", "Latency p50 / p99 (total)"}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_the_rendered_dag_is_the_local_runners_dag(tmp_path: Path, variant: str) -> None:
    """Every step the local runner runs is an Argo task needing the same steps; the only tasks besides are the
    cluster's own (the ingest's memo key, a multi-pod job's NetworkPolicy, serve after register)."""
    from distml.pipeline import dag
    from distml.workspace import Workspace

    out = _render(tmp_path, variant)
    config = load_config(tmp_path / f"{variant}.toml")
    local = {s.name: s.needs for s in dag.build(Workspace(tmp_path / "home"), config, cores=64)}

    def task(step: str) -> str:  # train[cnn] -> train-cnn: Argo names are DNS-like
        return re.sub(r"^train\[(.+)\]$", r"train-\1", step)

    tasks = yaml.safe_load((out / "workflow-template.yaml").read_text())["spec"]["templates"][0]["dag"]["tasks"]
    depends = {t["name"]: t["depends"].split(" && ") if "depends" in t else [] for t in tasks}
    networked = {n for n in depends if n.startswith("job-network-")}
    extras = {"ingest-key": [], **{n: [] for n in networked}, "serve": ["register"]}
    assert [n for n in depends if n not in extras] == [task(s) for s in local]  # same steps, same order
    for step, needs in local.items():
        assert [d for d in depends[task(step)] if d not in extras] == [task(n) for n in needs], step
    for name, needs in extras.items():
        assert depends[name] == needs, name
    # What waits for the extras: the ingest for its memo key, a multi-pod job for its pods' policy.
    waits = {t: [d for d in ds if d in extras] for t, ds in depends.items() if t not in extras}
    jobs = {f"train-{n.removeprefix('job-network-')}": [n] for n in networked}
    assert waits == {**{task(s): [] for s in local}, "ingest": ["ingest-key"], **jobs}
    assert len(networked) == (2 if variant == "gpu-folder" else 3)  # one per multi-pod job


def test_a_render_loads_no_training_code(tmp_path: Path) -> None:
    """``distml k8s render`` builds the pipeline's shape without the training stage (nor torch or MLflow)."""
    (tmp_path / "c.toml").write_text(VARIANTS["gpu-folder"][0])
    script = (
        "import sys\nfrom pathlib import Path\nfrom distml.config import load_config\n"
        "from distml.k8s.render import render\n"
        f"render(load_config(Path({str(tmp_path / 'c.toml')!r})), Path({str(tmp_path / 'out')!r}))\n"
        "print(sorted(m for m in sys.modules if m.startswith(('distml.train', 'torch', 'mlflow'))))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
    assert (tmp_path / "out" / "workflow-template.yaml").is_file()


@requires_crds
def test_a_broken_manifest_is_caught_with_its_field_path(tmp_path: Path) -> None:
    out = _render(tmp_path, "default")
    path = out / "workflow-template.yaml"
    doc = yaml.safe_load(path.read_text())
    index = {t["name"]: i for i, t in enumerate(doc["spec"]["templates"])}
    train_at, other_at = index["train-cnn"], index["train-cnn-dropout"]
    train = doc["spec"]["templates"][train_at]
    job = yaml.safe_load(train["resource"]["manifest"])
    job["spec"]["trainer"]["numNodes"] = "two"  # a string where the CRD wants an integer
    train["resource"]["manifest"] = yaml.safe_dump(job)
    doc["spec"]["templates"][other_at]["resource"]["action"] = "creat"  # not in the enum
    path.write_text(yaml.safe_dump(doc))
    deploy = out / "mlflow.yaml"
    docs = list(yaml.safe_load_all(deploy.read_text()))
    deployment = next(i for i, d in enumerate(docs) if d["kind"] == "Deployment")
    docs[deployment]["spec"]["template"]["spec"]["containers"][0]["prots"] = []  # a typo: unknown field
    deploy.write_text(yaml.safe_dump_all(docs))

    result = run_cli("k8s", "validate", out, "--crds", CRDS)
    assert result.code == 1
    errors = [ln.strip() for ln in result.err.splitlines() if ln.strip().startswith("error ")]
    assert (
        "error  workflow-template.yaml: TrainJob/{{workflow.name}}-cnn (embedded): "
        f"spec.templates[{train_at}].resource.manifest > spec.trainer.numNodes: 'two' is not of type 'integer'"
    ) in errors, result.err
    assert any(
        e.startswith("error  workflow-template.yaml: WorkflowTemplate/distml-pipeline: "
                     f"spec.templates[{other_at}].resource.action: 'creat' is not one of")
        for e in errors
    ), result.err  # fmt: skip
    assert any(
        e.startswith("error  mlflow.yaml: Deployment/distml-mlflow: spec.template.spec.containers[0]: ")
        and "'prots' was unexpected" in e
        for e in errors
    ), result.err
    assert result.err.strip().endswith("error: 3 problem(s) in " + str(out) + "; each is listed above")
    assert "Traceback" not in result.err


@pytest.mark.parametrize(
    ("toml", "args", "message"),
    [
        ('[pipeline]\ndataset = "folder"\nsource = "/x"\n', [], "a folder dataset needs [k8s] source"),
        ("[train]\nworkers = 3\n[k8s]\nprocs_per_node = 2\n", [], "candidate cnn: 3 workers do not split into pods"),
        ("[k8s]\nimgae = 'x'\n", [], "unknown config key k8s.imgae in"),
        ("", ["--namespace", "Bad_NS"], "invalid config value namespace='Bad_NS'"),
        ("[k8s]\nserve_min_replicas = 5\nserve_max_replicas = 2\n", [], "serve_max_replicas must be at least"),
        # The sink's image has no default: a render without one (and without logger_url) says what to set.
        ("", [], "the request-log sink needs [k8s] log_sink_image pinned by tag and digest"),
        ('[k8s]\nlog_sink_image = "gcr.io/x/sink:v1"\n', [], "log_sink_image 'gcr.io/x/sink:v1' is not REPO:TAG@"),
        ('[k8s]\napi_server_cidr = "the control plane"\n', [], "api_server_cidr 'the control plane' is not a CIDR"),
    ],
)
def test_render_refuses_bad_settings_with_one_line(tmp_path: Path, toml: str, args: list[str], message: str) -> None:
    config = tmp_path / "c.toml"
    config.write_text(toml)
    result = run_cli("--config", config, "k8s", "render", "--out", tmp_path / "out", *args)
    assert result.code == 2, result.out + result.err
    assert message in result.err and "Traceback" not in result.err
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_render_replaces_only_its_own_folder(tmp_path: Path) -> None:
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("mine")
    config = tmp_path / "c.toml"
    config.write_text(SINK)
    result = run_cli("--config", config, "k8s", "render", "--out", precious)
    assert result.code == 2 and "is not an earlier render" in result.err
    assert (precious / "notes.txt").read_text() == "mine"
    out = _render(tmp_path, "default")
    (out / "stale.yaml").write_text("kind: Stale\n")
    assert run_cli("--config", config, "k8s", "render", "--out", out).code == 0  # replaces an earlier render whole
    assert not (out / "stale.yaml").exists() and (out / "kustomization.yaml").exists()


def test_validate_needs_the_crds_and_a_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DISTML_K8S_CRDS", raising=False)
    result = run_cli("k8s", "validate", tmp_path)
    assert result.code == 2 and "no CRD schemas at" in result.err and "--crds" in result.err
    if CRDS.is_dir():
        result = run_cli("k8s", "validate", tmp_path / "nope", "--crds", CRDS)
        assert result.code == 2 and "is not a folder" in result.err


def test_step_commands_compute_the_runners_key_and_do_its_steps(home: Path, tmp_path: Path) -> None:
    """What the workflow's containers run, against a workspace a local 'distml run' filled."""
    images = make_image_folder(tmp_path / "images", per_class=16)
    config = tmp_path / "distml.toml"
    config.write_text(f'[pipeline]\ndataset = "folder"\nsource = "{images}"\nimage_size = [16, 16]\nmode = "L"\n'
                      "[train]\nbatch_size = 16\nlog_every_steps = 1000\n")  # fmt: skip
    ran = run_cli("--home", home, "run", "--config", config, "--candidates", "cnn", "--epochs", "1", "--workers", "1")
    assert ran.code == 0, ran.out + ran.err
    record = json.loads(next((home / "pipeline" / "runs").glob("*/run.json")).read_text())
    steps = record["steps"]

    out = tmp_path / "outputs"
    key = run_cli("--home", home, "--config", config, "step", "key", "ingest", "--outputs", out / "key")
    assert key.code == 0, key.out + key.err
    assert (out / "key" / "key").read_text() == steps["ingest"]["key"]  # Argo memoizes on the local runner's key

    ingest = run_cli("--home", home, "--config", config, "step", "ingest", "--outputs", out / "ingest")
    assert ingest.code == 0 and "the store already held this version" in ingest.out
    assert (out / "ingest" / "digest").read_text() == steps["ingest"]["outputs"]["digest"]
    assert (out / "ingest" / "digest16").read_text() == steps["ingest"]["outputs"]["digest"][:16]

    run_dir = steps["train[cnn]"]["outputs"]["run_dir"]
    select = run_cli("--home", home, "--config", config, "step", "select", run_dir, "--outputs", out / "select")
    assert select.code == 0, select.out + select.err
    assert (out / "select" / "winner").read_text() == Path(run_dir).name
    artifact = (out / "select" / "artifact").read_text()
    register = run_cli("--home", home, "--config", config, "step", "register", artifact, "--outputs", out / "reg")
    assert register.code == 0, register.out + register.err
    # The pipeline already registered this very model: the step makes that version champion, adds none.
    assert "already held this model" in register.out
    assert (out / "reg" / "version").read_text() == str(steps["register"]["outputs"]["version"])
    assert (out / "reg" / "ref").read_text() == "models:/images-classifier@champion"


def test_dockerfiles_install_the_pinned_torch_and_run_distml() -> None:
    root = Path(__file__).resolve().parents[1]
    pin = re.search(r'"torch==([0-9.]+)"', (root / "pyproject.toml").read_text()).group(1)  # type: ignore[union-attr]
    for name in ("Dockerfile", "Dockerfile.cuda"):
        text = (root / name).read_text()
        assert f"torch=={pin}" in text, name
        assert 'ENTRYPOINT ["distml"]' in text and "USER " in text, name
        assert "pip install '.[ray]'" in text, name  # the KubeRay render's pods run `ray start` from the image


def test_the_workflows_own_commands_run_the_pipeline_here(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run the rendered WorkflowTemplate's commands on this machine, as Argo and the kubelet would run them.

    Each task's command line is taken from the YAML: its Argo parameters filled from earlier tasks' output
    files, the ConfigMap's files at the mount path, a training job's pods as one process per pod with the
    operator's variables expanded, and the InferenceService's container as a server on 127.0.0.1 that must answer
    a V2 request. If a flag in the YAML were wrong, or a step needed logic that lives only in YAML, this fails.
    """
    from serve_support import ServerProcess, request

    images = make_image_folder(tmp_path / "images", per_class=16)
    config = tmp_path / "distml.toml"
    config.write_text(
        f'[pipeline]\ndataset = "folder"\nsource = "{images}"\nimage_size = [16, 16]\nmode = "L"\n'
        f'candidates = ["cnn"]\n[train]\nworkers = 2\nepochs = 1\nbatch_size = 16\nlog_every_steps = 1000\n'
        f'allow_oversubscribe = true\n{SINK}source = "{images}"\ncpu_per_worker = 1\n'
    )
    out = tmp_path / "render"
    assert run_cli("--config", config, "k8s", "render", "--out", out).code == 0
    template = yaml.safe_load((out / "workflow-template.yaml").read_text())["spec"]
    config_files = yaml.safe_load((out / "config.yaml").read_text())["data"]
    mount = tmp_path / "etc-distml"
    mount.mkdir()
    for name, text in config_files.items():
        (mount / name).write_text(text)
    monkeypatch.setenv("DISTML_HOME", str(home))  # the pods' env: DISTML_HOME=/workspace (the volume)
    templates = {t["name"]: t for t in template["templates"]}
    outputs: dict[str, dict[str, str]] = {}

    def fill(text: str, params: dict[str, str]) -> str:
        text = text.replace("{{workflow.name}}", "wf1").replace("/etc/distml", str(mount))
        for name, value in params.items():
            text = text.replace(f"{{{{inputs.parameters.{name}}}}}", value)
        return text

    for task in template["templates"][0]["dag"]["tasks"]:
        params = {}
        for p in task.get("arguments", {}).get("parameters", []):
            ref = re.fullmatch(r"\{\{tasks\.([\w-]+)\.outputs\.parameters\.(\w+)\}\}", p["value"])
            assert ref is not None, p
            params[p["name"]] = outputs[ref[1]][ref[2]]
        t = templates[task["template"]]
        if "container" in t:
            folder = tmp_path / "outputs" / task["name"]
            args = [fill(a, params).replace("/tmp/outputs", str(folder)) for a in t["container"]["args"]]
            result = run_cli(*args)
            assert result.code == 0, f"{task['name']}: {args}\n{result.out}{result.err}"
            outputs[task["name"]] = {o["name"]: (folder / o["name"]).read_text() for o in t["outputs"]["parameters"]}
        elif task["name"].startswith("job-network-"):  # the job's NetworkPolicy: nothing to run here
            policy = yaml.safe_load(fill(t["resource"]["manifest"], params))
            assert policy["kind"] == "NetworkPolicy" and policy["metadata"]["name"] == f"wf1-{task['name'][12:]}"
            outputs[task["name"]] = {}
        elif task["name"].startswith("train-"):
            job = yaml.safe_load(fill(t["resource"]["manifest"], params))
            trainer = job["spec"]["trainer"]
            port = str(free_port())
            procs = []
            for rank in range(trainer["numNodes"]):  # one process per pod; the kubelet expands $(VAR)
                env = {"PET_NODE_RANK": str(rank), "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": port}
                args = [re.sub(r"\$\((\w+)\)", lambda m, env=env: env[m[1]], a) for a in trainer["args"]]
                log = (tmp_path / f"{job['metadata']['name']}-{rank}.log").open("wb")
                procs.append(subprocess.Popen([sys.executable, "-m", "distml", *args], stdout=log,
                                              stderr=subprocess.STDOUT))  # fmt: skip
            try:
                codes = [p.wait(timeout=240) for p in procs]
            finally:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
            logs = "".join(p.read_text() for p in tmp_path.glob(f"{job['metadata']['name']}-*.log"))
            assert codes == [0] * len(procs), logs
            assert "2 worker(s)" in logs  # one DDP job over both "pods"
            outputs[task["name"]] = {}
        else:  # serve: the InferenceService's predictor container, on loopback
            isvc = yaml.safe_load(fill(t["resource"]["manifest"], params))
            container = isvc["spec"]["predictor"]["containers"][0]
            assert container["args"][3] == outputs["register"]["ref"]
            args = ["127.0.0.1" if a == "0.0.0.0" else a for a in container["args"]]
            args[args.index("--port") + 1] = "0"
            server = ServerProcess(args)
            try:
                assert request(server.base, "GET", "/v2/health/ready").status == 200
                model = json.loads(request(server.base, "GET", "/v2/models/images-classifier").body)
                assert model["name"] == "images-classifier"
            finally:
                assert server.stop() == 0, server.output
    assert set(outputs) == {"ingest-key", "ingest", "job-network-cnn", "train-cnn", "select", "register"}
    assert outputs["select"]["winner"] == "wf1-cnn"
    assert outputs["register"]["version"] == "1"


def test_cpu_autoscaling_uses_knatives_hpa_class(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'{SINK}serve_scale_metric = "cpu"\nserve_scale_target = 70\n')
    assert run_cli("--config", config, "k8s", "render", "--out", tmp_path / "out").code == 0
    meta = yaml.safe_load((tmp_path / "out" / "inference-service.yaml").read_text())["metadata"]
    assert meta["annotations"]["autoscaling.knative.dev/class"] == "hpa.autoscaling.knative.dev"
    assert meta["annotations"]["autoscaling.knative.dev/metric"] == "cpu"


# --- hardening: what each pod may do, what may reach it, and with which identity ---------------------------------


def _objects(folder: Path) -> list[tuple[str, dict]]:
    """Every object of a render with where it is, the workflow's resource-step manifests included."""
    out = []
    for path in sorted(folder.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc:
                continue
            out.append((str(path.relative_to(folder)), doc))
            if doc["kind"] == "WorkflowTemplate":
                out += [(f"{path.name}:{t['name']}", yaml.safe_load(t["resource"]["manifest"]))
                        for t in doc["spec"]["templates"] if "resource" in t]  # fmt: skip
    return out


def _pod_specs(folder: Path) -> list[tuple[str, dict]]:
    """(where, pod spec) of every pod the render runs or has the workflow run; a TrainJob's pods are its
    runtime's pod with the job's podSpecOverrides applied (the volumes and mounts it adds)."""
    objects = _objects(folder)
    runtimes = {d["metadata"]["name"]: d for _, d in objects if d["kind"] == "ClusterTrainingRuntime"}
    pods: list[tuple[str, dict]] = []
    for where, d in objects:
        meta = d.get("metadata", {})  # (a Kustomization has none)
        kind, name = d["kind"], meta.get("name") or meta.get("generateName")
        at = f"{where}: {kind}/{name}"
        if kind == "Deployment":
            pods.append((at, d["spec"]["template"]["spec"]))
        elif kind == "PyTorchJob":
            pods += [(f"{at} {r}", s["template"]["spec"]) for r, s in d["spec"]["pytorchReplicaSpecs"].items()]
        elif kind == "InferenceService":
            pods.append((at, d["spec"]["predictor"]))
        elif kind == "TrainJob":
            runtime = runtimes[d["spec"]["runtimeRef"]["name"]]  # the render writes the runtime it runs on
            job = runtime["spec"]["template"]["spec"]["replicatedJobs"][0]
            pod = json.loads(json.dumps(job["template"]["spec"]["template"]["spec"]))
            (override,) = d["spec"]["podSpecOverrides"]
            pod["volumes"] = pod.get("volumes", []) + override["volumes"]
            for c in pod["containers"]:
                for o in override["containers"]:
                    if o["name"] == c["name"]:
                        c["volumeMounts"] = c.get("volumeMounts", []) + o["volumeMounts"]
            pods.append((at, pod))
        elif kind == "WorkflowTemplate":
            spec = d["spec"]
            for t in spec["templates"]:
                if "container" in t:
                    pods.append(
                        (
                            f"{at} {t['name']}",
                            {
                                "securityContext": spec["securityContext"],
                                "containers": [t["container"]],
                                "volumes": spec["volumes"],
                            },
                        )
                    )
    return pods


def _security_problems(pod: dict) -> list[str]:
    """What keeps ``pod`` from Kubernetes' restricted Pod Security Standard, a read-only root, scratch, probes."""
    problems = []
    pod_ctx = pod.get("securityContext") or {}
    empty_dirs = {v["name"] for v in pod.get("volumes", []) if "emptyDir" in v}
    for c in pod["containers"]:
        ctx = c.get("securityContext") or {}
        name = c.get("name", "main")
        if (ctx.get("seccompProfile") or pod_ctx.get("seccompProfile")) != {"type": "RuntimeDefault"}:
            problems.append(f"{name}: no seccompProfile RuntimeDefault")
        if not (ctx.get("runAsNonRoot") or pod_ctx.get("runAsNonRoot")):
            problems.append(f"{name}: may run as root")
        if ctx.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation is not false")
        if ctx.get("capabilities") != {"drop": ["ALL"]}:
            problems.append(f"{name}: capabilities not dropped")
        if ctx.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{name}: writable root filesystem")
        if not any(m["mountPath"] == "/tmp" and m["name"] in empty_dirs for m in c.get("volumeMounts", [])):
            problems.append(f"{name}: no emptyDir scratch at /tmp")
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if probe in c and "timeoutSeconds" not in c[probe]:
                problems.append(f"{name}: {probe} without timeoutSeconds")
    return problems


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_pod_is_restricted_with_a_read_only_root(tmp_path: Path, variant: str) -> None:
    """Each pod and container: seccomp RuntimeDefault, non-root, no privilege escalation, no capabilities, a
    read-only root with an emptyDir at /tmp, probes with a timeout; the namespace enforces 'restricted'."""
    out = _render(tmp_path, variant)
    pods = _pod_specs(out)
    kinds = {where.split(": ")[1].split("/")[0] for where, _ in pods}
    assert kinds >= {"WorkflowTemplate", "InferenceService", "PyTorchJob" if variant == "pytorchjob" else "TrainJob"}
    problems = [f"{where}: {p}" for where, pod in pods for p in _security_problems(pod)]
    assert not problems, "\n".join(problems)
    namespace = yaml.safe_load((out / "namespace.yaml").read_text())
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    # The steps' HOME and caches point at the scratch volume, not at the read-only image.
    step = next(pod for where, pod in pods if where.endswith(" ingest"))
    env = {e["name"]: e.get("value") for e in step["containers"][0]["env"]}
    assert env["HOME"] == "/tmp" and env["MPLCONFIGDIR"].startswith("/tmp/")


def test_the_sink_image_is_pinned_by_tag_and_digest(tmp_path: Path) -> None:
    out = _render(tmp_path, "default")
    sink = yaml.safe_load_all((out / "request-log.yaml").read_text())
    (container,) = next(d for d in sink if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"]
    assert container["image"] == SINK_IMAGE
    assert re.fullmatch(r"[^@]+:[\w.-]+@sha256:[0-9a-f]{64}", container["image"])


def test_only_the_resource_steps_hold_a_kubernetes_token(tmp_path: Path) -> None:
    """distml's own containers get no token; Argo's init/wait report outputs as an account that can do only
    that; the resource steps (Argo's executor alone) create jobs, policies and the InferenceService."""
    out = _render(tmp_path, "default")
    spec = yaml.safe_load((out / "workflow-template.yaml").read_text())["spec"]
    assert spec["automountServiceAccountToken"] is False
    assert spec["executor"] == {"serviceAccountName": "distml-workflow-executor"}
    for t in spec["templates"]:
        if "container" in t:  # inherits: no token in the pod; Argo mounts the executor's into its containers only
            assert not {"serviceAccountName", "automountServiceAccountToken", "executor"} & set(t), t["name"]
        if "resource" in t:
            assert t["serviceAccountName"] == t["executor"]["serviceAccountName"] == "distml-workflow-resources"
            assert t["automountServiceAccountToken"] is True
    rbac = list(yaml.safe_load_all((out / "rbac.yaml").read_text()))
    assert all(d["automountServiceAccountToken"] is False for d in rbac if d["kind"] == "ServiceAccount")
    tokens = {d["metadata"]["annotations"]["kubernetes.io/service-account.name"]
              for d in rbac if d["kind"] == "Secret"}  # fmt: skip
    assert tokens == {"distml-workflow-executor", "distml-workflow-resources"}  # what Argo mounts from
    roles = {d["metadata"]["name"]: d["rules"] for d in rbac if d["kind"] == "Role"}
    granted = {d["subjects"][0]["name"]: roles[d["roleRef"]["name"]] for d in rbac if d["kind"] == "RoleBinding"}
    assert "distml-workflow" not in granted  # the step pods' account can do nothing
    assert granted["distml-workflow-executor"] == [
        {"apiGroups": ["argoproj.io"], "resources": ["workflowtaskresults"], "verbs": ["create", "patch"]}
    ]
    creates = {r for rule in granted["distml-workflow-resources"] if "create" in rule["verbs"]
               for r in rule["resources"]}  # fmt: skip
    assert creates == {"workflowtaskresults", "trainjobs", "networkpolicies", "inferenceservices"}
    for where, pod in _pod_specs(out):  # and no pod outside the workflow mounts a token either
        if "WorkflowTemplate" not in where and "InferenceService" not in where:
            assert pod.get("automountServiceAccountToken") is False, where


def _policies(out: Path) -> dict[str, dict]:
    return {d["metadata"]["name"]: d["spec"] for d in yaml.safe_load_all((out / "network-policy.yaml").read_text())}


def test_network_policies_deny_by_default_and_admit_only_the_pipelines_flows(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'{SINK}ingress_namespaces = ["gateways"]\nprometheus_namespace = "observability"\n')
    out = tmp_path / "out"
    assert run_cli("--config", config, "k8s", "render", "--out", out).code == 0
    policies = _policies(out)
    deny = policies["distml-default-deny"]
    assert deny["podSelector"] == {} and sorted(deny["policyTypes"]) == ["Egress", "Ingress"]
    assert not deny["ingress"] and not deny["egress"]
    (dns,) = policies["distml-dns"]["egress"]
    assert dns["to"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                          "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}]  # fmt: skip
    assert {(p["protocol"], p["port"]) for p in dns["ports"]} == {("UDP", 53), ("TCP", 53)}

    # MLflow: in from the workflow's pods (its steps and the jobs it runs) and the predictor, on its port only.
    mlflow = policies["distml-mlflow"]
    assert mlflow["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "mlflow"
    (rule,) = mlflow["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 5000}]
    assert rule["from"] == [
        {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "distml"}, "matchExpressions": [
            {"key": "app.kubernetes.io/component", "operator": "In", "values": ["workflow", "train"]}]}},
        {"podSelector": {"matchLabels": {"serving.kserve.io/inferenceservice": "distml"}}},
    ]  # fmt: skip
    assert "egress" not in mlflow  # and out to nothing (the default deny)
    # The predictor: in from the configured ingress namespaces and Prometheus; out to MLflow and the sink.
    serve = policies["distml-serve"]
    assert serve["podSelector"] == {"matchLabels": {"serving.kserve.io/inferenceservice": "distml"}}
    sources = [peer for rule in serve["ingress"] for peer in rule["from"]]
    assert sources == [
        {"namespaceSelector": {"matchExpressions": [
            {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["gateways"]}]}},
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "observability"}},
         "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}},
    ]  # fmt: skip
    assert [r["to"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for r in serve["egress"]] == [
        "mlflow", "request-log"]  # fmt: skip
    (sink_in,) = policies["distml-request-log"]["ingress"]
    assert sink_in["from"] == [{"podSelector": serve["podSelector"]}]
    # Nothing else admits traffic in: every other policy is egress only.
    admitting = {name for name, p in policies.items() if p.get("ingress")}
    assert admitting == {"distml-mlflow", "distml-serve", "distml-request-log"}
    # Steps reach the API server (Argo's executor) and MLflow; only the ingest steps reach the dataset's mirrors.
    workflow = policies["distml-workflow"]["egress"]
    assert workflow[0] == {"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}],
                           "ports": [{"protocol": "TCP", "port": 443}, {"protocol": "TCP", "port": 6443}]}  # fmt: skip
    ingest = policies["distml-ingest"]["podSelector"]["matchExpressions"]
    assert ingest == [{"key": "distml.io/step", "operator": "In", "values": ["ingest-key", "ingest"]}]


@requires_crds
@pytest.mark.parametrize("variant", ["default", "pytorchjob"])
def test_training_pods_admit_only_their_own_jobs_pods(tmp_path: Path, variant: str) -> None:
    """torchrun's c10d store has no authentication and gloo's ports are ephemeral: each multi-pod job gets a
    NetworkPolicy, created before the job, that lets its pods reach each other (any port) and nothing else."""
    out = _render(tmp_path, variant)
    label = {"default": "jobset.sigs.k8s.io/jobset-name", "pytorchjob": "training.kubeflow.org/job-name"}[variant]
    spec = yaml.safe_load((out / "workflow-template.yaml").read_text())["spec"]
    templates = {t["name"]: t for t in spec["templates"]}
    tasks = {t["name"]: t for t in templates["pipeline"]["dag"]["tasks"]}
    for cand in ("cnn", "cnn-dropout", "cnn-batchnorm"):
        assert tasks[f"train-{cand}"]["depends"] == f"ingest && job-network-{cand}"
        job = yaml.safe_load(templates[f"train-{cand}"]["resource"]["manifest"])
        policy = yaml.safe_load(templates[f"job-network-{cand}"]["resource"]["manifest"])
        assert policy["kind"] == "NetworkPolicy" and templates[f"job-network-{cand}"]["resource"]["action"] == "create"
        own = {"podSelector": {"matchLabels": {label: job["metadata"]["name"]}}}  # the operator's label: this job
        assert policy["spec"] == {"podSelector": own["podSelector"], "policyTypes": ["Ingress", "Egress"],
                                  "ingress": [{"from": [own]}], "egress": [{"to": [own]}]}  # fmt: skip
    # Besides its job, a training pod reaches MLflow only.
    (to_mlflow,) = _policies(out)["distml-train"]["egress"]
    assert to_mlflow["ports"] == [{"protocol": "TCP", "port": 5000}]
    # A one-pod job's workers talk over the pod's loopback: no policy, no step.
    config = tmp_path / "one.toml"
    config.write_text(f"[train]\nworkers = 1\n{SINK}")
    assert run_cli("--config", config, "k8s", "render", "--out", tmp_path / "one").code == 0
    names = [t["name"] for t in yaml.safe_load((tmp_path / "one" / "workflow-template.yaml").read_text())["spec"]
             ["templates"]]  # fmt: skip
    assert not [n for n in names if n.startswith("job-network-")]


def test_mlflow_requires_a_login_and_no_password_is_rendered(tmp_path: Path) -> None:
    out = _render(tmp_path, "default")
    docs = list(yaml.safe_load_all((out / "mlflow.yaml").read_text()))
    (container,) = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"]
    assert container["args"][container["args"].index("--app-name") + 1] == "basic-auth"
    env = {e["name"]: e for e in container["env"]}
    for name, key in (("MLFLOW_AUTH_ADMIN_USERNAME", "username"), ("MLFLOW_AUTH_ADMIN_PASSWORD", "password"),
                      ("MLFLOW_FLASK_SERVER_SECRET_KEY", "flask-secret-key")):  # fmt: skip
        assert env[name]["valueFrom"]["secretKeyRef"] == {"name": "distml-mlflow-auth", "key": key}
    ini = next(d for d in docs if d["kind"] == "ConfigMap")["data"]["basic_auth.ini"]
    assert "database_uri = sqlite:////mlflow/basic_auth.db" in ini and "password" not in ini
    # Every client (steps, training pods, predictor) logs in with the same Secret.
    # (A TrainJob's pods take their env from the job's trainer, below.)
    pods = [(where, pod) for where, pod in _pod_specs(out) if "mlflow" not in where and "TrainJob" not in where]
    for where, c in [(where, c) for where, pod in pods for c in pod["containers"]]:
        if c.get("image", "").startswith("distml"):
            creds = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"] if "valueFrom" in e}
            assert creds["MLFLOW_TRACKING_PASSWORD"]["name"] == "distml-mlflow-auth", where
    train = yaml.safe_load(next(t for t in yaml.safe_load((out / "workflow-template.yaml").read_text())["spec"]
                                ["templates"] if t["name"] == "train-cnn")["resource"]["manifest"])  # fmt: skip
    assert "MLFLOW_TRACKING_PASSWORD" in {e["name"] for e in train["spec"]["trainer"]["env"]}
    # The folder is meant to be committed: no Secret with the credentials, no literal password anywhere.
    assert not [d for _, d in _objects(out) if d["kind"] == "Secret" and d["metadata"]["name"] == "distml-mlflow-auth"]
    for path in out.rglob("*.yaml"):
        assert not re.search(r"PASSWORD\n\s+value:", path.read_text()), path


def test_the_rendered_mlflow_server_admits_only_its_admin(tmp_path: Path) -> None:
    """The MLflow container's own command, env and auth config, run here on loopback: /health (the probes)
    answers without a login, the API refuses anonymous and wrong credentials and serves the Secret's admin."""
    pytest.importorskip("flask_wtf", reason="MLflow's basic-auth app needs Flask-WTF (mlflow[auth])")
    import signal
    import time
    import urllib.error
    import urllib.request
    from base64 import b64encode

    out = _render(tmp_path, "default")
    docs = list(yaml.safe_load_all((out / "mlflow.yaml").read_text()))
    (container,) = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"]
    (tmp_path / "mlflow").mkdir()
    (tmp_path / "auth").mkdir()
    (tmp_path / "scratch").mkdir()

    mounts = {"/mlflow": "mlflow", "/etc/mlflow-auth": "auth", "/tmp": "scratch"}

    def local(text: str) -> str:  # the pod's mount paths (a path, or an SQLite URL's) -> their folders here
        return re.sub(r"(^|sqlite:///)(/mlflow|/etc/mlflow-auth|/tmp)(?=/|$)",
                      lambda m: m[1] + str(tmp_path / mounts[m[2]]), text, flags=re.M)  # fmt: skip

    ini = next(d for d in docs if d["kind"] == "ConfigMap")["data"]["basic_auth.ini"]
    (tmp_path / "auth" / "basic_auth.ini").write_text(local(ini))
    secret = {"username": "admin", "password": "a-generated-password", "flask-secret-key": "0f" * 32}
    env = {e["name"]: secret[e["valueFrom"]["secretKeyRef"]["key"]] if "valueFrom" in e else local(e["value"])
           for e in container["env"]}  # fmt: skip
    port = free_port()
    args = [local(a) for a in container["args"]]
    args[args.index("--host") + 1], args[args.index("--port") + 1] = "127.0.0.1", str(port)
    command = [str(Path(sys.executable).parent / container["command"][0]), *container["command"][1:], *args]
    proc = subprocess.Popen(command, env={**os.environ, **env}, stdout=(tmp_path / "log").open("wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip

    def get(path: str, user: str | None = None, password: str = "") -> int:
        request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
        if user:
            request.add_header("Authorization", "Basic " + b64encode(f"{user}:{password}".encode()).decode())
        try:
            with urllib.request.urlopen(request, timeout=60) as response:  # a busy box is slow
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return exc.code

    try:
        deadline = time.monotonic() + 240  # the app imports a lot; a loaded 2-core box takes a while
        while True:
            assert proc.poll() is None, (tmp_path / "log").read_text()[-3000:]
            try:
                if get("/health") == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "log").read_text()[-3000:]
            time.sleep(0.5)
        search = "/api/2.0/mlflow/experiments/search?max_results=1"
        assert get(search) == 401
        assert get(search, "admin", "not-the-password") == 401
        assert get(search, "admin", secret["password"]) == 200
        assert (tmp_path / "mlflow" / "basic_auth.db").is_file()  # the users live on the MLflow volume
    finally:  # the server and its uvicorn workers: the process group this test started
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@requires_crds
def test_validation_checks_each_kind_against_its_own_crd(tmp_path: Path) -> None:
    """The WorkflowTemplate and PrometheusRule against their upstream CRDs (no stand-ins): named in the report,
    a broken one rejected by its CRD, and a folder without their CRDs an error, not a fallback."""
    out = _render(tmp_path, "default")
    result = run_cli("k8s", "validate", out, "--crds", CRDS, "-v")
    assert result.code == 0, result.out + result.err
    assert "WorkflowTemplate/distml-pipeline (against CRD argoproj.io_workflowtemplates.yaml)" in result.out
    assert "PrometheusRule/distml-serve (against CRD monitoring.coreos.com_prometheusrules.yaml)" in result.out
    assert "ClusterTrainingRuntime/distml-torch-distributed (against CRD" in result.out

    template = out / "workflow-template.yaml"
    doc = yaml.safe_load(template.read_text())
    doc["spec"]["podGC"]["strategy"] = "WhenIFeelLikeIt"  # not one of the CRD's strategies
    doc["spec"]["templates"][1]["container"]["imagePullPolicy"] = 3  # a number where a string goes
    template.write_text(yaml.safe_dump(doc))
    rule = out / "monitoring" / "prometheus-rule.yaml"
    rules = yaml.safe_load(rule.read_text())
    rules["spec"]["groups"][0]["rules"][0]["for"] = "five minutes"  # not a Prometheus duration
    rule.write_text(yaml.safe_dump(rules))
    result = run_cli("k8s", "validate", out, "--crds", CRDS)
    assert result.code == 1
    assert "WorkflowTemplate/distml-pipeline: spec.podGC.strategy: 'WhenIFeelLikeIt' is not one of" in result.err
    assert "spec.templates[1].container.imagePullPolicy: 3 is not of type 'string'" in result.err
    assert "PrometheusRule/distml-serve: spec.groups[0].rules[0].for: 'five minutes' does not match" in result.err

    partial = tmp_path / "crds"
    partial.mkdir()
    for crd in CRDS.glob("*.yaml"):
        if crd.name not in ("argoproj.io_workflowtemplates.yaml", "monitoring.coreos.com_prometheusrules.yaml"):
            (partial / crd.name).symlink_to(crd)
    (tmp_path / "again").mkdir()
    result = run_cli("k8s", "validate", _render(tmp_path / "again", "default"), "--crds", partial)
    assert result.code == 1
    assert "WorkflowTemplate/distml-pipeline: apiVersion: no schema for argoproj.io/v1alpha1 WorkflowTemplate" in (
        result.err
    )
    assert "PrometheusRule/distml-serve: apiVersion: no schema for monitoring.coreos.com/v1 PrometheusRule" in (
        result.err
    )


# --- serving: gRPC on the one port Knative gives a revision, and KServe's canary rollout -------------------------


def _one(path: Path) -> dict:
    (doc,) = yaml.safe_load_all(path.read_text())
    return doc


def test_grpc_is_the_revisions_one_port_and_the_canary_is_kserves_rollout(tmp_path: Path) -> None:
    out = _render(tmp_path, "serve-rollout")
    champion, canary = _one(out / "inference-service.yaml"), _one(out / "inference-service-canary.yaml")
    for isvc, ref in (
        (champion, "models:/fashion-mnist-classifier@champion"),
        (canary, "models:/fashion-mnist-classifier@challenger"),
    ):
        (container,) = isvc["spec"]["predictor"]["containers"]
        args = container["args"]
        assert args[args.index("serve") + 1] == ref and args[-2:] == ["--grpc-port", "8081"]  # pinned, not 9000
        # Knative: one port across the pod, named for its protocol; REST stays on 8080 for the readiness probe
        # (queue-proxy probes the port a probe names) and the liveness probe speaks gRPC (Knative would point an
        # HTTP one at the serving port).
        assert container["ports"] == [{"name": "h2c", "containerPort": 8081, "protocol": "TCP"}]
        assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 8080}
        assert container["livenessProbe"]["grpc"] == {"port": 8081} and "httpGet" not in container["livenessProbe"]
        assert isvc["metadata"]["annotations"]["distml.io/model"] == ref
    assert "canaryTrafficPercent" not in champion["spec"]["predictor"]
    assert canary["spec"]["predictor"]["canaryTrafficPercent"] == 20
    assert canary["metadata"]["name"] == champion["metadata"]["name"]  # the same service: a new revision of it
    assert canary["spec"]["predictor"]["annotations"] == {"distml.io/model-version": "challenger"}
    # The pods split nothing themselves (KServe does, by revision) and serve gRPC on the pinned port.
    serve = tomllib.loads(_one(out / "config.yaml")["data"]["distml.toml"])["serve"]
    assert "canary" not in serve and serve["grpc_port"] == 8081 and serve["canary_percent"] == 20
    # Neither InferenceService is in 'kubectl apply -k': the workflow applies the champion, the rollout is by hand.
    resources = _one(out / "kustomization.yaml")["resources"]
    assert "inference-service.yaml" not in resources and "inference-service-canary.yaml" not in resources
    ingress = _policies(out)["distml-serve"]["ingress"][0]
    assert {"port": 8081, "protocol": "TCP"} in ingress["ports"]


def test_without_grpc_or_a_canary_the_predictor_is_http_only(tmp_path: Path) -> None:
    out = _render(tmp_path, "default")
    (container,) = _one(out / "inference-service.yaml")["spec"]["predictor"]["containers"]
    assert container["ports"] == [{"name": "http1", "containerPort": 8080, "protocol": "TCP"}]
    assert "--grpc-port" not in container["args"] and not (out / "inference-service-canary.yaml").exists()
    ingress = _policies(out)["distml-serve"]["ingress"][0]
    assert {"port": 8081, "protocol": "TCP"} not in ingress["ports"]


@pytest.mark.parametrize(
    ("serve", "message"),
    [
        ('canary = "/models/challenger"', "[serve] canary = '/models/challenger' is a folder on this machine"),
        (
            'canary = "models:/fashion-mnist-classifier@challenger"\ncanary_percent = 12.5',
            "[serve] canary_percent = 12.5: KServe splits traffic by whole percents",
        ),
    ],
)
def test_a_canary_the_cluster_cannot_serve_is_one_line(tmp_path: Path, serve: str, message: str) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f"{SINK}[serve]\n{serve}\n")
    result = run_cli("--config", config, "k8s", "render", "--out", tmp_path / "out")
    assert result.code == 2, result.out + result.err
    assert message in result.err and "Traceback" not in result.err and len(result.err.strip().splitlines()) <= 2
    assert not (tmp_path / "out").exists()


def test_the_render_says_when_to_apply_the_canary(tmp_path: Path) -> None:
    toml, _ = VARIANTS["serve-rollout"]
    (tmp_path / "c.toml").write_text(toml)
    result = run_cli("--config", tmp_path / "c.toml", "k8s", "render", "--out", tmp_path / "out")
    assert result.code == 0, result.out + result.err
    assert f"kubectl apply -f {tmp_path / 'out'}/inference-service-canary.yaml (KServe sends 20% " in result.out
    (tmp_path / "plain.toml").write_text(SINK)  # no canary: no such line
    plain = run_cli("--config", tmp_path / "plain.toml", "k8s", "render", "--out", tmp_path / "plain")
    assert plain.code == 0 and "canary" not in plain.out, plain.out + plain.err
