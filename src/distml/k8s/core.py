"""Core Kubernetes objects: namespace, config, the workspace volume, service accounts + RBAC, MLflow, log sink."""

from __future__ import annotations

from typing import Any

from distml.k8s.plan import CONFIG_MOUNT, CONTAINER_SECURITY, MLFLOW_PORT, POD_SECURITY, Plan
from distml.k8s.tomlw import dumps_toml

Obj = dict[str, Any]


def namespace(plan: Plan) -> Obj:
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": plan.namespace, "labels": plan.labels("namespace")}}  # fmt: skip


def config_map(plan: Plan) -> Obj:
    """``distml.toml`` (the pipeline's settings, as the cluster sees them) and one ``train-<label>.toml`` each.

    Every step reads the same file a local ``distml run`` would, so no setting exists only in YAML.
    """
    c = plan.config
    pipeline = c.pipeline.model_dump(mode="json")
    pipeline["source"] = plan.k8s.source  # the cluster's copy (None: the dataset's download mirrors)
    serve = c.serve.model_dump(mode="json") | {"host": "0.0.0.0", "log_url": None, "log_file": None}  # noqa: S104
    doc = {"data": c.data.model_dump(mode="json"), "pipeline": pipeline, "serve": serve}
    files = {"distml.toml": dumps_toml(doc, header="distml settings for the cluster (rendered by distml k8s)")}
    for cand in plan.candidates:
        train = cand.config.model_dump(mode="json")
        header = f"candidate {cand.label}: {cand.nodes} pod(s) x {cand.procs} DDP worker(s)"
        files[cand.config_file] = dumps_toml({"data": doc["data"], "train": train}, header=header)
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": plan.meta("distml-config", "config"),
            "data": files}  # fmt: skip


def workspace_claim(plan: Plan) -> Obj:
    spec: Obj = {
        "accessModes": [plan.k8s.access_mode],
        "resources": {"requests": {"storage": plan.k8s.storage_size}},
    }
    if plan.k8s.storage_class:
        spec["storageClassName"] = plan.k8s.storage_class
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": plan.meta("distml-workspace", "workspace"), "spec": spec}  # fmt: skip


def rbac(plan: Plan) -> list[Obj]:
    """A service account per role; only the workflow's may touch the API (the jobs and services it creates)."""
    accounts = [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": plan.meta(f"distml-{role}", role),
         **({} if role == "workflow" else {"automountServiceAccountToken": False})}
        for role in ("workflow", "train", "serve")
    ]  # fmt: skip
    job = ("trainer.kubeflow.org", "trainjobs") if plan.k8s.training == "trainjob" else ("kubeflow.org", "pytorchjobs")
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": plan.meta("distml-workflow", "workflow"),
        "rules": [
            # Argo's executor (emissary, Argo >= 3.4) reports each step's outputs through WorkflowTaskResults.
            {"apiGroups": ["argoproj.io"], "resources": ["workflowtaskresults"], "verbs": ["create", "patch"]},
            # Resource steps: create the candidates' training jobs and watch them to success or failure...
            {"apiGroups": [job[0]], "resources": [job[1]],
             "verbs": ["create", "get", "list", "watch", "patch", "delete"]},
            # ...and create or patch the InferenceService with the new champion.
            {"apiGroups": ["serving.kserve.io"], "resources": ["inferenceservices"],
             "verbs": ["create", "get", "list", "watch", "patch", "update"]},
        ],
    }  # fmt: skip
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": plan.meta("distml-workflow", "workflow"),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "distml-workflow"},
        "subjects": [{"kind": "ServiceAccount", "name": "distml-workflow", "namespace": plan.namespace}],
    }
    # Argo's controller keeps memoized outputs in a ConfigMap of the workflow's namespace; its stock roles
    # cannot create or update ConfigMaps, so the ingest would never be memoized without this grant.
    controller_ns, controller_sa = plan.k8s.argo_controller.split(":")
    memo_role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": plan.meta("distml-argo-memoize", "workflow"),
        "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "create", "update"]}],
    }
    memo_binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": plan.meta("distml-argo-memoize", "workflow"),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "distml-argo-memoize"},
        "subjects": [{"kind": "ServiceAccount", "name": controller_sa, "namespace": controller_ns}],
    }
    return [*accounts, role, binding, memo_role, memo_binding]


def _deployment(plan: Plan, name: str, component: str, pod: Obj, replicas: int = 1) -> Obj:
    selector = {"app.kubernetes.io/name": "distml", "app.kubernetes.io/component": component}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": plan.meta(name, component),
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": selector},
            "template": {"metadata": {"labels": plan.labels(component)}, "spec": pod},
        },
    }


def _service(
    plan: Plan, name: str, component: str, port: int, target: int, *,
    selector: dict[str, str] | None = None, port_name: str = "http",
) -> Obj:  # fmt: skip
    """A Service over the pods of ``component`` (or ``selector``)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": plan.meta(name, component),
        "spec": {
            "selector": selector or {"app.kubernetes.io/name": "distml", "app.kubernetes.io/component": component},
            "ports": [{"name": port_name, "port": port, "targetPort": target, "protocol": "TCP"}],
        },
    }


def mlflow(plan: Plan) -> list[Obj]:
    """An MLflow tracking server + registry (SQLite and artifacts on its own volume, artifacts proxied over HTTP).

    It runs from the distml image (which has MLflow); a pipeline that outgrows SQLite points ``[k8s]
    mlflow_uri`` at a server with a database instead, and this is not rendered.
    """
    claim: Obj = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": plan.meta("distml-mlflow", "mlflow"),
             "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "5Gi"}}}}  # fmt: skip
    if plan.k8s.storage_class:
        claim["spec"]["storageClassName"] = plan.k8s.storage_class
    probe = {"httpGet": {"path": "/health", "port": MLFLOW_PORT}, "periodSeconds": 10}
    container = {
        "name": "mlflow",
        "image": plan.k8s.image,
        "command": ["mlflow", "server"],
        "args": ["--host", "0.0.0.0", "--port", str(MLFLOW_PORT),  # noqa: S104 (a pod listens on its IP)
                 "--backend-store-uri", "sqlite:////mlflow/mlflow.db",
                 "--artifacts-destination", "/mlflow/artifacts", "--serve-artifacts",
                 # MLflow refuses Host headers it does not know (DNS-rebinding guard): allow the Service's names.
                 "--allowed-hosts", "distml-mlflow,distml-mlflow:*,distml-mlflow.*,localhost:*,127.0.0.1:*"],
        "ports": [{"name": "http", "containerPort": MLFLOW_PORT}],
        "readinessProbe": probe,
        "livenessProbe": {**probe, "initialDelaySeconds": 30},
        "resources": {"requests": {"cpu": "250m", "memory": "512Mi"}, "limits": {"memory": "2Gi"}},
        "volumeMounts": [{"name": "data", "mountPath": "/mlflow"}],
        "securityContext": CONTAINER_SECURITY,
    }  # fmt: skip
    pod = {"containers": [container], "automountServiceAccountToken": False, "securityContext": POD_SECURITY,
           "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "distml-mlflow"}}]}  # fmt: skip
    deployment = _deployment(plan, "distml-mlflow", "mlflow", pod)
    deployment["spec"]["strategy"] = {"type": "Recreate"}  # one writer of the SQLite file at a time
    return [claim, deployment, _service(plan, "distml-mlflow", "mlflow", MLFLOW_PORT, MLFLOW_PORT)]


def request_log_sink(plan: Plan) -> list[Obj]:
    """Where KServe's logger sends each request and response (CloudEvents): Knative's event display.

    It prints every event to its log (``kubectl logs deploy/distml-request-log``); point ``[k8s] logger_url`` at
    a real sink (a Knative broker, Kafka bridge...) for storage, and this is not rendered.
    """
    container = {
        "name": "event-display",
        "image": "gcr.io/knative-releases/knative.dev/eventing/cmd/event_display",
        "ports": [{"name": "http", "containerPort": 8080}],
        "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}},
    }
    pod = {"containers": [container], "automountServiceAccountToken": False}
    return [_deployment(plan, "distml-request-log", "request-log", pod),
            _service(plan, "distml-request-log", "request-log", 80, 8080)]  # fmt: skip


def config_mount_path(name: str) -> str:
    return f"{CONFIG_MOUNT}/{name}"
