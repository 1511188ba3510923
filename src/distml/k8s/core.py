"""Core Kubernetes objects: namespace, config, the workspace volume, service accounts + RBAC, MLflow, log sink."""

from __future__ import annotations

from typing import Any

from distml.k8s.plan import (
    CONFIG_MOUNT,
    CONTAINER_SECURITY,
    GRPC_PORT,
    MLFLOW_AUTH_SECRET,
    MLFLOW_PORT,
    POD_SECURITY,
    SECCOMP,
    Plan,
    scratch_env,
    scratch_mount,
    scratch_volume,
)
from distml.k8s.tomlw import dumps_toml

Obj = dict[str, Any]

# The workflow's identities. Step containers run distml and hold no token at all; Argo's own init and wait
# containers report each step's outputs as the executor; only the resource steps (which create the training
# jobs, their network policies and the InferenceService, and run nothing but Argo's executor) get a token that
# can create anything.
WORKFLOW_SA = "distml-workflow"
EXECUTOR_SA = "distml-workflow-executor"
RESOURCES_SA = "distml-workflow-resources"
SINK_UID = 65532  # the event display is a ko-built image: distroless, user 65532 ("nonroot")
SINK_PORT = 8080


def namespace(plan: Plan) -> Obj:
    """The namespace, with Kubernetes' Pod Security admission enforcing ``[k8s] pod_security`` (restricted)."""
    pss = "pod-security.kubernetes.io"
    labels = {
        **plan.labels("namespace"),
        f"{pss}/enforce": plan.k8s.pod_security,
        f"{pss}/enforce-version": "latest",
        # Even where baseline is enforced, what would break restricted is reported.
        f"{pss}/warn": "restricted",
        f"{pss}/audit": "restricted",
    }
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": plan.namespace, "labels": labels}}


def config_map(plan: Plan) -> Obj:
    """``distml.toml`` (the pipeline's settings, as the cluster sees them) and one ``train-<label>.toml`` each.

    Every step reads the same file a local ``distml run`` would, so no setting exists only in YAML.
    """
    c = plan.config
    pipeline = c.pipeline.model_dump(mode="json")
    pipeline["source"] = plan.k8s.source  # the cluster's copy (None: the dataset's download mirrors)
    doc = {"data": c.data.model_dump(mode="json"), "pipeline": pipeline, "serve": serve_settings(plan)}
    files = {"distml.toml": dumps_toml(doc, header="distml settings for the cluster (rendered by distml k8s)")}
    for cand in plan.candidates:
        train = cand.config.model_dump(mode="json")
        header = f"candidate {cand.label}: {cand.nodes} pod(s) x {cand.procs} DDP worker(s)"
        files[cand.config_file] = dumps_toml({"data": doc["data"], "train": train}, header=header)
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": plan.meta("distml-config", "config"), "data": files}


def serve_settings(plan: Plan) -> dict[str, Any]:
    """``[serve]`` as the predictor pods read it: on all interfaces, the request log from KServe's logger, gRPC
    on its pinned port, and no canary of their own (KServe splits the traffic between revisions: a canary inside
    each pod as well would split it twice)."""
    serve: dict[str, Any] = plan.config.serve.model_dump(mode="json")
    serve |= {"host": "0.0.0.0", "log_url": None, "log_file": None, "canary": None}  # noqa: S104
    if serve["grpc_port"] is not None:
        serve["grpc_port"] = GRPC_PORT
    return serve


def workspace_claim(plan: Plan) -> Obj:
    spec: Obj = {
        "accessModes": [plan.k8s.access_mode],
        "resources": {"requests": {"storage": plan.k8s.storage_size}},
    }
    if plan.k8s.storage_class:
        spec["storageClassName"] = plan.k8s.storage_class
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": plan.meta("distml-workspace", "workspace"),
        "spec": spec,
    }


def rbac(plan: Plan) -> list[Obj]:
    """A service account per role, none with an automounted token; Roles for the two that use the API."""
    accounts = [
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": plan.meta(name, component),
            "automountServiceAccountToken": False,
        }
        for name, component in (
            (WORKFLOW_SA, "workflow"),
            (EXECUTOR_SA, "workflow"),
            (RESOURCES_SA, "workflow"),
            ("distml-train", "train"),
            ("distml-serve", "serve"),
        )
    ]
    # Argo mounts an executor's token from the Secret '<account>.service-account-token' (Kubernetes >= 1.24
    # creates none by itself); the control plane fills in the token, so nothing secret is rendered here.
    tokens = [
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "kubernetes.io/service-account-token",
            "metadata": plan.meta(
                f"{sa}.service-account-token", "workflow", annotations={"kubernetes.io/service-account.name": sa}
            ),
        }
        for sa in (EXECUTOR_SA, RESOURCES_SA)
    ]
    # Argo's executor (emissary, Argo >= 3.4) reports each step's outputs through WorkflowTaskResults.
    task_results = {"apiGroups": ["argoproj.io"], "resources": ["workflowtaskresults"], "verbs": ["create", "patch"]}
    job = ("trainer.kubeflow.org", "trainjobs") if plan.k8s.training == "trainjob" else ("kubeflow.org", "pytorchjobs")
    resources_rules = [
        task_results,
        # Resource steps: create the candidates' training jobs and watch them to success or failure...
        {"apiGroups": [job[0]], "resources": [job[1]], "verbs": ["create", "get", "list", "watch", "patch", "delete"]},
        # ...each with the NetworkPolicy that lets its own pods (and only those) reach each other...
        {"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"], "verbs": ["create", "get", "delete"]},
        # ...and create or patch the InferenceService with the new champion.
        {
            "apiGroups": ["serving.kserve.io"],
            "resources": ["inferenceservices"],
            "verbs": ["create", "get", "list", "watch", "patch", "update"],
        },
    ]
    roles: list[Obj] = []
    for sa, rules in ((EXECUTOR_SA, [task_results]), (RESOURCES_SA, resources_rules)):
        roles += _role(plan, sa, rules, [{"kind": "ServiceAccount", "name": sa, "namespace": plan.namespace}])
    # Argo's controller keeps memoized outputs in a ConfigMap of the workflow's namespace; its stock roles
    # cannot create or update ConfigMaps, so the ingest would never be memoized without this grant.
    controller_ns, controller_sa = plan.k8s.argo_controller.split(":")
    roles += _role(
        plan,
        "distml-argo-memoize",
        [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "create", "update"]}],
        [{"kind": "ServiceAccount", "name": controller_sa, "namespace": controller_ns}],
    )
    return [*accounts, *tokens, *roles]


def _role(plan: Plan, name: str, rules: list[Obj], subjects: list[Obj]) -> list[Obj]:
    """A Role and the RoleBinding that grants it to ``subjects``."""
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": plan.meta(name, "workflow"),
        "rules": rules,
    }
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": plan.meta(name, "workflow"),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": subjects,
    }
    return [role, binding]


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
    plan: Plan,
    name: str,
    component: str,
    port: int,
    target: int,
    *,
    selector: dict[str, str] | None = None,
    port_name: str = "http",
) -> Obj:
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


# MLflow's basic-auth app: who may do what lives in its own SQLite file on the MLflow volume. The admin comes
# from the environment (the Secret) on first start; users added later start with no permission at all.
MLFLOW_AUTH_INI = """\
[mlflow]
database_uri = sqlite:////mlflow/basic_auth.db
default_permission = NO_PERMISSIONS
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
"""
MLFLOW_AUTH_MOUNT = "/etc/mlflow-auth"


def mlflow(plan: Plan) -> list[Obj]:
    """An MLflow tracking server + registry (SQLite and artifacts on its own volume, artifacts proxied over HTTP).

    It runs from the distml image (which has MLflow) as MLflow's basic-auth app: every request but ``/health``
    needs the admin's credentials, from the Secret ``distml-mlflow-auth`` that the user creates (keys
    ``username``, ``password``, ``flask-secret-key``; docs/kubernetes.md), so no password is ever rendered.
    A pipeline that outgrows SQLite points ``[k8s] mlflow_uri`` at a server with a database instead, and this
    is not rendered.
    """
    claim: Obj = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": plan.meta("distml-mlflow", "mlflow"),
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "5Gi"}}},
    }
    if plan.k8s.storage_class:
        claim["spec"]["storageClassName"] = plan.k8s.storage_class
    auth_config = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": plan.meta("distml-mlflow-auth-config", "mlflow"),
        "data": {"basic_auth.ini": MLFLOW_AUTH_INI},
    }
    health = {"httpGet": {"path": "/health", "port": MLFLOW_PORT}, "timeoutSeconds": 5}  # /health needs no login

    def secret(name: str, key: str) -> Obj:
        return {"name": name, "valueFrom": {"secretKeyRef": {"name": MLFLOW_AUTH_SECRET, "key": key}}}

    args = ["--host", "0.0.0.0", "--port", str(MLFLOW_PORT),  # noqa: S104 (a pod listens on its IP)
            "--backend-store-uri", "sqlite:////mlflow/mlflow.db",
            "--artifacts-destination", "/mlflow/artifacts", "--serve-artifacts",
            "--app-name", "basic-auth",
            # One worker: SQLite has one writer anyway, and each worker is a whole MLflow app in memory.
            "--workers", "1",
            # MLflow refuses Host headers it does not know (DNS-rebinding guard): allow the Service's names.
            "--allowed-hosts", "distml-mlflow,distml-mlflow:*,distml-mlflow.*,localhost:*,127.0.0.1:*"]  # fmt: skip
    container = {
        "name": "mlflow",
        "image": plan.k8s.image,
        "command": ["mlflow", "server"],
        "args": args,
        "env": [
            {"name": "MLFLOW_AUTH_CONFIG_PATH", "value": f"{MLFLOW_AUTH_MOUNT}/basic_auth.ini"},
            secret("MLFLOW_AUTH_ADMIN_USERNAME", "username"),
            secret("MLFLOW_AUTH_ADMIN_PASSWORD", "password"),
            # The auth app signs its CSRF tokens with this; a fixed key keeps them valid across restarts.
            secret("MLFLOW_FLASK_SERVER_SECRET_KEY", "flask-secret-key"),
            *scratch_env(),
        ],
        "ports": [{"name": "http", "containerPort": MLFLOW_PORT}],
        # Starting takes a while on a busy node (the app imports a lot): up to 5 minutes before liveness counts.
        "startupProbe": {**health, "periodSeconds": 5, "failureThreshold": 60},
        "readinessProbe": {**health, "periodSeconds": 10},
        "livenessProbe": {**health, "periodSeconds": 20, "failureThreshold": 3},
        "resources": {"requests": {"cpu": "250m", "memory": "512Mi"}, "limits": {"memory": "2Gi"}},
        "volumeMounts": [
            {"name": "data", "mountPath": "/mlflow"},
            {"name": "auth-config", "mountPath": MLFLOW_AUTH_MOUNT, "readOnly": True},
            scratch_mount(),
        ],
        "securityContext": CONTAINER_SECURITY,
    }
    pod = {
        "containers": [container],
        "automountServiceAccountToken": False,
        "securityContext": POD_SECURITY,
        "volumes": [
            {"name": "data", "persistentVolumeClaim": {"claimName": "distml-mlflow"}},
            {"name": "auth-config", "configMap": {"name": "distml-mlflow-auth-config"}},
            scratch_volume(),
        ],
    }
    deployment = _deployment(plan, "distml-mlflow", "mlflow", pod)
    deployment["spec"]["strategy"] = {"type": "Recreate"}  # one writer of the SQLite file at a time
    return [claim, auth_config, deployment, _service(plan, "distml-mlflow", "mlflow", MLFLOW_PORT, MLFLOW_PORT)]


def request_log_sink(plan: Plan) -> list[Obj]:
    """Where KServe's logger sends each request and response (CloudEvents): Knative's event display.

    It prints every event to its log (``kubectl logs deploy/distml-request-log``); point ``[k8s] logger_url`` at
    a real sink (a Knative broker, Kafka bridge...) for storage, and this is not rendered. Its image is pinned
    by tag and digest (``[k8s] log_sink_image``): what runs is exactly what was checked.
    """
    user = {"runAsUser": SINK_UID, "runAsGroup": SINK_UID}
    container = {
        "name": "event-display",
        "image": plan.k8s.log_sink_image,
        "ports": [{"name": "http", "containerPort": SINK_PORT}],
        "readinessProbe": {"tcpSocket": {"port": SINK_PORT}, "periodSeconds": 10, "timeoutSeconds": 2},
        "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}},
        "volumeMounts": [scratch_mount()],
        "securityContext": {**CONTAINER_SECURITY, **user},
    }
    pod = {
        "containers": [container],
        "automountServiceAccountToken": False,
        "securityContext": {"runAsNonRoot": True, **user, "seccompProfile": SECCOMP},
        "volumes": [scratch_volume()],
    }
    return [
        _deployment(plan, "distml-request-log", "request-log", pod),
        _service(plan, "distml-request-log", "request-log", 80, SINK_PORT),
    ]


def config_mount_path(name: str) -> str:
    return f"{CONFIG_MOUNT}/{name}"
