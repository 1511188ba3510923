"""``distml k8s render``: the pipeline as a Kustomize folder for a cluster.

=============================  ==========================================================================
file                           what it holds
=============================  ==========================================================================
kustomization.yaml             the folder for ``kubectl apply -k`` (everything below but workflow.yaml)
namespace.yaml                 the Namespace (Pod Security admission: restricted)
network-policy.yaml            NetworkPolicies: default deny, then the pipeline's flows only
config.yaml                    ConfigMap distml-config: distml.toml and train-<label>.toml, read by every step
storage.yaml                   the workspace PersistentVolumeClaim (datasets, runs, exports)
rbac.yaml                      ServiceAccounts (none with an automounted token) and the Roles of the two that
                               use the API: Argo's executor, and the workflow's resource steps
mlflow.yaml                    the MLflow tracking server + registry, basic auth (unless [k8s] mlflow_uri)
request-log.yaml               the sink of KServe's request logger (unless [k8s] logger_url names one)
training-runtime.yaml          the TrainJobs' ClusterTrainingRuntime, restricted pods (unless [k8s] runtime)
workflow-template.yaml         the Argo WorkflowTemplate: the DAG of distml steps and training jobs
workflow.yaml                  a Workflow that runs the template (``kubectl create -f``: a new name each time)
inference-service.yaml         the InferenceService as the workflow's last step applies it (current champion)
inference-service-canary.yaml  with [serve] canary: the same serving the canary, canaryTrafficPercent (KServe
                               sends that share to it, the rest to the champion's revision); applied by hand
monitoring/                    ServiceMonitor + metrics Service, PrometheusRule, Grafana dashboard
=============================  ==========================================================================

With ``--engine ray`` (:mod:`distml.k8s.ray`), ``rbac.yaml`` holds the Ray pods' and the predictor's service
accounts only, ``config.yaml`` the one ``distml.toml`` that ``distml run`` reads, and in place of the runtime,
the workflow template and the workflow:

=============================  ==========================================================================
ray-cluster.yaml               the RayCluster distml-ray: a head and the worker pods, token auth (authOptions)
ray-job.yaml                   a RayJob running 'distml run --ray auto' on it (``kubectl create -f``)
=============================  ==========================================================================

The folder is written next to itself and renamed into place, so a failed render leaves the old one whole.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from distml.config import DistmlConfig
from distml.errors import UsageError
from distml.k8s import core, network, ray, serving, training, workflow
from distml.k8s.core import Obj
from distml.k8s.plan import Plan, make_plan
from distml.k8s.yamlio import dump_all

CANARY_FILE = "inference-service-canary.yaml"  # with [serve] canary: KServe's rollout step, applied by hand
MARKER = ".distml-k8s"  # a render's folder holds this; only such a folder is replaced by a new render


def build(plan: Plan) -> dict[str, list[Obj] | str]:
    """Every file of the render: a path -> its objects (YAML documents) or its text."""
    if plan.k8s.engine == "ray":
        return build_ray(plan)
    files: dict[str, list[Obj] | str] = {
        "namespace.yaml": [core.namespace(plan)],
        "network-policy.yaml": network.policies(plan),
        "config.yaml": [core.config_map(plan)],
        "storage.yaml": [core.workspace_claim(plan)],
        "rbac.yaml": core.rbac(plan),
    }
    if plan.render_mlflow:
        files["mlflow.yaml"] = core.mlflow(plan)
    if plan.render_logsink:
        files["request-log.yaml"] = core.request_log_sink(plan)
    if plan.render_runtime:
        files["training-runtime.yaml"] = [training.training_runtime(plan)]
    files["workflow-template.yaml"] = [workflow.workflow_template(plan)]
    _serving(plan, files)
    # The InferenceService is the workflow's to create (with a champion to serve) and the Workflow is created
    # per run, so neither is part of 'kubectl apply -k'.
    files["kustomization.yaml"] = [_kustomization(plan, files)]
    files["workflow.yaml"] = [workflow.workflow(plan)]
    return files


def build_ray(plan: Plan) -> dict[str, list[Obj] | str]:
    """The render for KubeRay: the same namespace, volume, MLflow and serving, with a RayCluster and a RayJob
    (``ray-job.yaml``, created per run) in place of the Argo workflow and the Kubeflow jobs."""
    files: dict[str, list[Obj] | str] = {
        "namespace.yaml": [core.namespace(plan)],
        "network-policy.yaml": network.policies(plan),
        "config.yaml": [ray.config_map(plan)],
        "storage.yaml": [core.workspace_claim(plan)],
        "rbac.yaml": ray.service_accounts(plan),
    }
    if plan.render_mlflow:
        files["mlflow.yaml"] = core.mlflow(plan)
    if plan.render_logsink:
        files["request-log.yaml"] = core.request_log_sink(plan)
    files["ray-cluster.yaml"] = [ray.ray_cluster(plan)]
    _serving(plan, files)
    # The InferenceService serves a champion, which the first RayJob registers; a RayJob is created per run.
    files["kustomization.yaml"] = [_kustomization(plan, files)]
    files["ray-job.yaml"] = [ray.ray_job(plan)]
    return files


def _serving(plan: Plan, files: dict[str, list[Obj] | str]) -> None:
    """The InferenceService of the current champion, the canary's rollout step when ``[serve] canary`` is set,
    and their monitoring (either engine)."""
    files["inference-service.yaml"] = [serving.inference_service(plan, ref=plan.model_ref, version="champion")]
    canary = plan.config.serve.canary
    if canary is not None:  # a models:/NAME@ALIAS reference with a whole percent (checked by make_plan)
        percent = int(plan.config.serve.canary_percent)
        alias = canary.rsplit("@", 1)[-1] if "@" in canary else canary.rsplit("/", 1)[-1]
        isvc = serving.inference_service(plan, ref=canary, version=alias, canary_percent=percent)
        files[CANARY_FILE] = [isvc]
    files["monitoring/service-monitor.yaml"] = [serving.metrics_service(plan), serving.service_monitor(plan)]
    files["monitoring/prometheus-rule.yaml"] = [serving.prometheus_rule(plan)]
    files["monitoring/grafana-dashboard.yaml"] = [serving.dashboard_config_map(plan)]
    files["monitoring/grafana-dashboard.json"] = json.dumps(serving.dashboard(), indent=2) + "\n"


def _kustomization(plan: Plan, files: dict[str, list[Obj] | str]) -> Obj:
    """``kubectl apply -k``: every YAML file so far but the InferenceServices."""
    resources = [p for p in files if p.endswith(".yaml") and p not in ("inference-service.yaml", CANARY_FILE)]
    return {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": plan.namespace,
        "resources": resources,
    }


def render(config: DistmlConfig, out: Path) -> tuple[Plan, list[Path]]:
    """Write the folder ``out`` (replacing an earlier render there); returns the plan and the files written.

    ``config`` is already validated, command-line options included (``load_config(overrides=...)``)."""
    plan = make_plan(config)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MARKER).exists())):
        raise UsageError(f"{out} exists and is not an earlier render", hint="pick a new or empty --out folder")
    files = build(plan)
    tmp = out.with_name(f".{out.name}.rendering")
    shutil.rmtree(tmp, ignore_errors=True)
    written = []
    for rel, content in files.items():
        path = tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content if isinstance(content, str) else dump_all(content))
        written.append(out / rel)
    (tmp / MARKER).write_text("rendered by distml k8s render; the next render replaces this folder\n")
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(out)
    return plan, written
