"""``distml k8s``: rendered manifests match the committed golden files and validate against the upstream CRDs
and the Kubernetes schemas; a broken manifest is caught with its field path; ``distml step`` (what the
workflow's containers run) computes the local runner's keys and does its steps.

Regenerate the golden files after an intended change: ``DISTML_UPDATE_GOLDEN=1 pytest tests/test_k8s.py``.
"""

from __future__ import annotations

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

# The default config, and two variants: the v1 PyTorchJob with another image and namespace; and a folder
# dataset on GPUs with [[candidates]], 4-worker jobs of 2 pods, an existing MLflow and logger sink.
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "default": ("", []),
    "pytorchjob": (
        "",
        ["--training", "pytorchjob", "--image", "registry.example.com/distml:0.1.0", "--namespace", "ml-team"],
    ),
    "gpu-folder": (
        """
[pipeline]
dataset = "folder"
source = "/data/flowers"
image_size = [64, 64]
metric = "macro_f1"

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
    assert pipeline["source"] == "/workspace/sources/flowers" and pipeline["metric"] == "macro_f1"

    template = yaml.safe_load((out / "workflow-template.yaml").read_text())
    tasks = {t["name"]: t for t in template["spec"]["templates"][0]["dag"]["tasks"]}
    assert list(tasks) == ["ingest-key", "ingest", "train-resnet-small", "train-resnet-small-2", "select",
                           "register", "serve"]  # fmt: skip
    assert tasks["select"]["depends"] == "train-resnet-small && train-resnet-small-2"
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


@requires_crds
def test_a_broken_manifest_is_caught_with_its_field_path(tmp_path: Path) -> None:
    out = _render(tmp_path, "default")
    path = out / "workflow-template.yaml"
    doc = yaml.safe_load(path.read_text())
    train = doc["spec"]["templates"][3]
    job = yaml.safe_load(train["resource"]["manifest"])
    job["spec"]["trainer"]["numNodes"] = "two"  # a string where the CRD wants an integer
    train["resource"]["manifest"] = yaml.safe_dump(job)
    doc["spec"]["templates"][4]["resource"]["action"] = "creat"  # not in the enum
    path.write_text(yaml.safe_dump(doc))
    deploy = out / "mlflow.yaml"
    docs = list(yaml.safe_load_all(deploy.read_text()))
    docs[1]["spec"]["template"]["spec"]["containers"][0]["prots"] = []  # a typo: unknown field
    deploy.write_text(yaml.safe_dump_all(docs))

    result = run_cli("k8s", "validate", out, "--crds", CRDS)
    assert result.code == 1
    errors = [ln.strip() for ln in result.err.splitlines() if ln.strip().startswith("error ")]
    assert (
        "error  workflow-template.yaml: TrainJob/{{workflow.name}}-cnn (embedded): "
        "spec.templates[3].resource.manifest > spec.trainer.numNodes: 'two' is not of type 'integer'"
    ) in errors, result.err
    assert any(
        e.startswith("error  workflow-template.yaml: WorkflowTemplate/distml-pipeline: "
                     "spec.templates[4].resource.action: 'creat' is not one of")
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
    result = run_cli("k8s", "render", "--out", precious)
    assert result.code == 2 and "is not an earlier render" in result.err
    assert (precious / "notes.txt").read_text() == "mine"
    out = _render(tmp_path, "default")
    (out / "stale.yaml").write_text("kind: Stale\n")
    assert run_cli("k8s", "render", "--out", out).code == 0  # a render replaces an earlier render whole
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
        f'allow_oversubscribe = true\n[k8s]\nsource = "{images}"\ncpu_per_worker = 1\n'
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
    assert set(outputs) == {"ingest-key", "ingest", "train-cnn", "select", "register"}
    assert outputs["select"]["winner"] == "wf1-cnn"
    assert outputs["register"]["version"] == "1"


def test_cpu_autoscaling_uses_knatives_hpa_class(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[k8s]\nserve_scale_metric = "cpu"\nserve_scale_target = 70\n')
    assert run_cli("--config", config, "k8s", "render", "--out", tmp_path / "out").code == 0
    meta = yaml.safe_load((tmp_path / "out" / "inference-service.yaml").read_text())["metadata"]
    assert meta["annotations"]["autoscaling.knative.dev/class"] == "hpa.autoscaling.knative.dev"
    assert meta["annotations"]["autoscaling.knative.dev/metric"] == "cpu"
