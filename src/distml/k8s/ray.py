"""The pipeline on KubeRay: a ``RayCluster`` (head + one worker group) and a ``RayJob`` that runs ``distml run``.

``distml k8s render --engine ray`` writes these in place of the Argo workflow and the Kubeflow jobs::

    RayCluster distml-ray     head pod (no training: num-cpus 0) + ray_worker_pods worker pods, each offering
                              procs_per_node workers' cores (and GPUs); the workspace volume on every pod at
                              /workspace, as the Argo render mounts it; token auth (KubeRay's authOptions)
    RayJob distml-run-*       'distml run --ray auto [--search [--refit]]' submitted to that cluster by a
                              submitter pod; the driver runs on the head, the jobs' workers on the worker pods

The RayJob selects the long-lived cluster (``clusterSelector``) rather than bringing its own
(``rayClusterSpec``): the cluster is applied once with the rest of the folder (``kubectl apply -k``), its name is
fixed, so the NetworkPolicies and the token Secret can name it, and a rerun finds it warm, like the workspace
whose cache makes a rerun fast. A RayJob is created per run (``kubectl create -f ray-job.yaml``: a new name
each time) and leaves the cluster up when it ends.

Token: ``authOptions.mode: token`` makes KubeRay generate a random token into the Secret ``distml-ray`` (key
``auth_token``) and set ``RAY_AUTH_MODE``/``RAY_AUTH_TOKEN`` on every Ray container and on the submitter, so no
token is ever rendered (the folder is meant to be committed).

Ports: every port Ray listens on is pinned in ``rayStartParams``, and the pods' ephemeral port range (where
torch's rendezvous store and gloo/NCCL, and anything else bound to port 0, listen) is pinned by a safe sysctl,
so the NetworkPolicy (:mod:`distml.k8s.network`) admits exactly these ports, from the same cluster's pods only.
"""

from __future__ import annotations

from typing import Any

from distml.k8s.core import Obj, config_mount_path, serve_settings
from distml.k8s.plan import CONTAINER_SECURITY, POD_SECURITY, Plan, scratch_env, scratch_mount
from distml.k8s.tomlw import dumps_toml
from distml.k8s.training import _times

CLUSTER_NAME = "distml-ray"  # also the Secret KubeRay writes the token to (key auth_token)
RAY_VERSION = "2.60.0"  # what pyproject's ray extra pins: the image's Ray (KubeRay picks its health checks by it)
SERVICE_ACCOUNT = "distml-ray"  # the Ray pods' and the submitter's: no token mounted, no role
WORKER_GROUP = "workers"
COMPONENT = "ray"  # app.kubernetes.io/component of the cluster's pods
SUBMITTER_COMPONENT = "ray-submitter"  # ...and of the RayJob's submitter pod
OPERATOR_POD = {"app.kubernetes.io/name": "kuberay-operator"}  # the label KubeRay's Helm chart puts on its pod
# KubeRay's labels on every pod of a cluster (not overridable by the template), and on its head pod.
CLUSTER_PODS = {"ray.io/cluster": CLUSTER_NAME}
HEAD_PODS = {**CLUSTER_PODS, "ray.io/node-type": "head"}

# Every port a Ray node listens on, pinned (Ray would pick some at random).
GCS_PORT = 6379
DASHBOARD_PORT = 8265  # the dashboard and the job API: the submitter and KubeRay's operator use it
CLIENT_PORT = 10001
NODE_PORTS = {
    "node-manager-port": 6380,
    "object-manager-port": 6381,
    "dashboard-agent-grpc-port": 6382,
    "runtime-env-agent-port": 6383,
    "dashboard-agent-listen-port": 52365,  # KubeRay's health probes read /api/healthz here
    "metrics-export-port": 8080,
}
WORKER_PORTS = (10002, 19999)  # one per Ray worker process (Ray's own default range, now explicit)
# The kernel's ephemeral range inside each Ray pod (a namespaced, "safe" sysctl that the restricted Pod Security
# Standard allows): a port bound to 0 comes from here. Ray Train's rendezvous (MASTER_PORT) and gloo/NCCL's
# listeners are such ports, and cannot be pinned one by one.
EPHEMERAL_PORTS = (20000, 29999)
# Ray keeps session logs and spills objects under /tmp/ray: a larger scratch volume than the other pods'.
SCRATCH_SIZE = "16Gi"


def cluster_ports() -> list[Obj]:
    """The TCP ports the cluster's pods reach each other on (NetworkPolicy ports, ranges with ``endPort``)."""
    single = sorted({GCS_PORT, DASHBOARD_PORT, CLIENT_PORT, *NODE_PORTS.values()})
    ranges = [{"protocol": "TCP", "port": low, "endPort": high} for low, high in (WORKER_PORTS, EPHEMERAL_PORTS)]
    return [*({"protocol": "TCP", "port": p} for p in single), *ranges]


def entrypoint(plan: Plan) -> str:
    """The RayJob's command: the same ``distml run`` as on a laptop, against the cluster it runs in."""
    command = f"distml --config {config_mount_path('distml.toml')} run --ray auto"
    run = plan.k8s.ray_run
    return command + {"candidates": "", "search": " --search", "search+refit": " --search --refit"}[run]


def ray_cluster(plan: Plan) -> Obj:
    """The RayCluster: a head that runs the driver and no training, and the worker pods the jobs run on."""
    k = plan.k8s
    worker_cores = k.cpu_per_worker * k.procs_per_node
    worker_params = {"num-cpus": str(worker_cores)}
    if k.gpus_per_node:
        worker_params["num-gpus"] = str(k.gpus_per_node)
    head_params = {
        "port": str(GCS_PORT),
        "dashboard-host": "0.0.0.0",  # noqa: S104 (the submitter and the operator reach the job API)
        "dashboard-port": str(DASHBOARD_PORT),
        "ray-client-server-port": str(CLIENT_PORT),
        # The driver (ingest, select, register) and the candidate processes run here; training does not.
        "num-cpus": "0",
    }
    head_resources = {"cpu": k.ray_head_cpu, "memory": k.ray_head_memory}
    memory = _times(k.memory_per_worker, k.procs_per_node)
    worker_resources: Obj = {
        "requests": {"cpu": str(worker_cores), "memory": memory},
        "limits": {"cpu": str(worker_cores), "memory": memory},
    }
    if k.gpus_per_node:
        worker_resources["limits"]["nvidia.com/gpu"] = str(k.gpus_per_node)
    head_ports = [
        {"name": "gcs-server", "containerPort": GCS_PORT},
        {"name": "dashboard", "containerPort": DASHBOARD_PORT},
        {"name": "client", "containerPort": CLIENT_PORT},
    ]
    head = {
        "rayStartParams": {**head_params, **_node_params()},
        "template": _pod(plan, "ray-head", {"requests": head_resources, "limits": head_resources}, head_ports),
    }
    replicas = plan.ray_pods
    worker = {
        "groupName": WORKER_GROUP,
        "replicas": replicas,
        "minReplicas": replicas,
        "maxReplicas": replicas,
        "rayStartParams": {**worker_params, **_node_params()},
        "template": _pod(plan, "ray-worker", worker_resources, []),
    }
    spec = {
        "rayVersion": RAY_VERSION,
        "authOptions": {"mode": "token"},
        "enableInTreeAutoscaling": False,  # a fixed size: the autoscaler would need a Kubernetes token
        "headGroupSpec": head,
        "workerGroupSpecs": [worker],
    }
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": plan.meta(CLUSTER_NAME, COMPONENT),
        "spec": spec,
    }


def _node_params() -> dict[str, str]:
    """``rayStartParams`` of every node: the pinned ports (KubeRay adds the address, --block and the like)."""
    params = {name: str(port) for name, port in NODE_PORTS.items()}
    return params | {"min-worker-port": str(WORKER_PORTS[0]), "max-worker-port": str(WORKER_PORTS[1])}


def _pod(plan: Plan, container: str, resources: Obj, ports: list[Obj]) -> Obj:
    """A Ray node's pod template: restricted, the workspace and config volumes, the pinned ephemeral ports.

    KubeRay writes the ``ray start`` command, adds /dev/shm for the object store (sized by the memory), the
    token's variables and, on workers, an init container that waits for the head (with this container's
    security context, environment and mounts).
    """
    env = [*plan.env(), {"name": "RAY_USAGE_STATS_ENABLED", "value": "0"}]  # no usage report (egress is denied)
    spec = {
        "serviceAccountName": SERVICE_ACCOUNT,
        "automountServiceAccountToken": False,
        "securityContext": {**POD_SECURITY, "sysctls": [_ephemeral_ports()]},
        "containers": [
            {
                "name": container,
                "image": plan.k8s.image,
                "env": env,
                **({"ports": ports} if ports else {}),
                "resources": resources,
                "volumeMounts": plan.mounts(),
                "securityContext": CONTAINER_SECURITY,
            }
        ],
        "volumes": [
            *(v for v in plan.volumes() if v["name"] != "scratch"),
            {"name": "scratch", "emptyDir": {"sizeLimit": SCRATCH_SIZE}},
        ],
    }
    return {"metadata": {"labels": plan.labels(COMPONENT)}, "spec": spec}


def _ephemeral_ports() -> dict[str, str]:
    return {"name": "net.ipv4.ip_local_port_range", "value": f"{EPHEMERAL_PORTS[0]} {EPHEMERAL_PORTS[1]}"}


def ray_job(plan: Plan) -> Obj:
    """One run: ``distml run --ray auto`` submitted to the RayCluster (``kubectl create -f``: a new name each time).

    KubeRay's submitter pod runs ``ray job submit`` against the head's job API (8265) with the cluster's token
    and follows the logs; the job fails after ``[k8s] train_deadline_hours``.
    """
    submitter = {
        "name": "ray-job-submitter",
        "image": plan.k8s.image,  # KubeRay writes its command (ray job submit ... -- ENTRYPOINT)
        "env": scratch_env(),
        "resources": {"requests": {"cpu": "500m", "memory": "256Mi"}, "limits": {"cpu": "1", "memory": "1Gi"}},
        "volumeMounts": [scratch_mount()],
        "securityContext": CONTAINER_SECURITY,
    }
    template = {
        "metadata": {"labels": plan.labels(SUBMITTER_COMPONENT)},  # what the NetworkPolicies select it by
        "spec": {
            "restartPolicy": "Never",
            "serviceAccountName": SERVICE_ACCOUNT,
            "automountServiceAccountToken": False,
            "securityContext": POD_SECURITY,
            "containers": [submitter],
            "volumes": [{"name": "scratch", "emptyDir": {"sizeLimit": "1Gi"}}],
        },
    }
    spec = {
        "clusterSelector": CLUSTER_PODS,
        "entrypoint": entrypoint(plan),
        "submissionMode": "K8sJobMode",
        "activeDeadlineSeconds": int(plan.k8s.train_deadline_hours * 3600),
        "submitterPodTemplate": template,
    }
    meta = {"generateName": "distml-run-", "namespace": plan.namespace, "labels": plan.labels(COMPONENT)}
    return {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": meta, "spec": spec}


def service_accounts(plan: Plan) -> list[Obj]:
    """The Ray pods' account and the predictor's, neither with a token (nothing here calls the Kubernetes API)."""
    return [
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": plan.meta(name, component),
            "automountServiceAccountToken": False,
        }
        for name, component in ((SERVICE_ACCOUNT, COMPONENT), ("distml-serve", "serve"))
    ]


def config_map(plan: Plan) -> Obj:
    """``distml.toml``: everything the RayJob's ``distml run`` reads (and the predictor's ``distml serve``).

    ``[train]`` and each ``[[candidates]]`` table as ``distml run`` would resolve them here, each worker sized
    to the cores its pod offers (``threads_per_worker = cpu_per_worker``: the Ray resources it asks for);
    ``[search]`` with its space when the job runs a search.
    """
    c, k = plan.config, plan.k8s
    pipeline = c.pipeline.model_dump(mode="json") | {"source": k.source}  # the cluster's copy, as the Argo render
    serve = serve_settings(plan)
    train = c.train.model_dump(mode="json")
    train["threads_per_worker"] = c.train.threads_per_worker or k.cpu_per_worker
    sections: dict[str, dict[str, Any]] = {
        "data": c.data.model_dump(mode="json"),
        "pipeline": pipeline,
        "serve": serve,
        "train": train,
    }
    candidates: list[dict[str, Any]] = []
    if k.ray_run == "candidates":
        for cand in plan.candidates:  # only what differs from [train] (the model always, for the reader)
            table = cand.config.model_dump(mode="json")
            candidates.append({"model": table["model"]} | {n: v for n, v in table.items() if v != train.get(n)})
    else:
        sections["search"] = c.search.model_dump(mode="json")
    header = f"distml settings for 'distml run' on the RayCluster (rendered by distml k8s --engine ray): {k.ray_run}"
    files = {"distml.toml": dumps_toml(sections, arrays={"candidates": candidates}, header=header)}
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": plan.meta("distml-config", "config"), "data": files}
