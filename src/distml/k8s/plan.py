"""What a render is made of: the config, resolved into the values every manifest builder reads.

:func:`make_plan` checks everything that can be wrong before a file is written (a candidate whose workers do
not split into whole pods, a missing source for a folder dataset...), so a render either succeeds whole or says
what to fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distml.card import model_name_for
from distml.config import DistmlConfig, K8sConfig, TrainConfig
from distml.errors import UsageError
from distml.pipeline.shape import Shape, candidate_configs, pipeline_shape

APP = "distml"
CPU_IMAGE = "distml"  # the repository name Dockerfile builds (torch's CPU wheel); Dockerfile.cuda's is distml-cuda
WORKSPACE_MOUNT = "/workspace"  # the workspace volume, DISTML_HOME of every step
CONFIG_MOUNT = "/etc/distml"  # the distml-config ConfigMap: distml.toml and train-<label>.toml
OUTPUTS_DIR = "/tmp/outputs"  # noqa: S108 (inside the step's container: where Argo reads output parameters)
SCRATCH_MOUNT = "/tmp"  # noqa: S108 (an emptyDir: the only writable place besides the volumes)
SERVE_PORT = 8080  # V1 and V2 share the server's one HTTP port
GRPC_PORT = 8081  # the gRPC V2 port with [serve] grpc_port set (KServe's own servers use 8081 for gRPC)
MLFLOW_PORT = 5000
# The Secret the user creates (docs/kubernetes.md): username, password, flask-secret-key. Only its name is here.
MLFLOW_AUTH_SECRET = "distml-mlflow-auth"  # noqa: S105
DISTML_RUNTIME = "distml-torch-distributed"  # the ClusterTrainingRuntime the render writes (restricted pods)
# The image's user (uid 1000); fsGroup makes the volumes it mounts writable to it (chown only when needed).
# With CONTAINER_SECURITY, what Kubernetes' "restricted" Pod Security Standard asks for.
SECCOMP = {"type": "RuntimeDefault"}
POD_SECURITY = {
    "runAsNonRoot": True,
    "runAsUser": 1000,
    "runAsGroup": 1000,
    "fsGroup": 1000,
    "fsGroupChangePolicy": "OnRootMismatch",
    "seccompProfile": SECCOMP,
}
# Complete on its own (non-root, seccomp), so that a container whose pod-level context is not ours (KServe's
# predictor under Knative, which refuses most pod-level fields) is still restricted. The root filesystem is
# read-only: what a process writes goes to the volumes or to the scratch emptyDir at /tmp.
CONTAINER_SECURITY = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "seccompProfile": SECCOMP,
}


@dataclass(frozen=True)
class Candidate:
    """One candidate as a distributed job: ``nodes`` pods of ``procs`` DDP workers each."""

    label: str
    config: TrainConfig
    nodes: int
    procs: int

    @property
    def config_file(self) -> str:
        return f"train-{self.label}.toml"


@dataclass(frozen=True)
class Plan:
    config: DistmlConfig
    k8s: K8sConfig
    shape: Shape  # the pipeline's DAG, which the workflow renders
    candidates: tuple[Candidate, ...]  # its training nodes as cluster jobs, in the same order
    model_name: str  # the registered model the pipeline makes champion
    mlflow_uri: str
    logger_url: str
    render_mlflow: bool
    render_logsink: bool
    render_runtime: bool  # the TrainJob runs on the runtime this render writes
    ray_pods: int = 0  # engine ray: the RayCluster's worker pods (0: an Argo render)

    @property
    def namespace(self) -> str:
        return self.k8s.namespace

    def candidate(self, label: str) -> Candidate:
        """The cluster job of the pipeline's training node ``label``."""
        return next(c for c in self.candidates if c.label == label)

    @property
    def model_ref(self) -> str:
        return f"models:/{self.model_name}@champion"

    def labels(self, component: str) -> dict[str, str]:
        return {
            "app.kubernetes.io/name": APP,
            "app.kubernetes.io/component": component,
            "app.kubernetes.io/part-of": APP,
        }

    def meta(self, name: str, component: str, **extra: Any) -> dict[str, Any]:
        return {"name": name, "namespace": self.namespace, "labels": self.labels(component), **extra}

    def env(self) -> list[dict[str, Any]]:
        """What every distml container needs: the workspace, the tracking server and its credentials, scratch."""
        return [
            {"name": "DISTML_HOME", "value": WORKSPACE_MOUNT},
            {"name": "MLFLOW_TRACKING_URI", "value": self.mlflow_uri},
            *self.mlflow_credentials(),
            {"name": "PYTHONUNBUFFERED", "value": "1"},
            *scratch_env(),
        ]

    def mlflow_credentials(self) -> list[dict[str, Any]]:
        """MLflow's client reads these for HTTP basic auth. The rendered server cannot start without the Secret;
        an existing server (``mlflow_uri``) may have no auth, so there the Secret is optional."""
        optional = not self.render_mlflow
        return [
            {
                "name": f"MLFLOW_TRACKING_{key.upper()}",
                "valueFrom": {"secretKeyRef": {"name": MLFLOW_AUTH_SECRET, "key": key, "optional": optional}},
            }
            for key in ("username", "password")
        ]

    def mounts(self) -> list[dict[str, Any]]:
        return [
            {"name": "workspace", "mountPath": WORKSPACE_MOUNT},
            {"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True},
            scratch_mount(),
        ]

    def volumes(self) -> list[dict[str, Any]]:
        return [
            {"name": "workspace", "persistentVolumeClaim": {"claimName": "distml-workspace"}},
            {"name": "config", "configMap": {"name": "distml-config"}},
            scratch_volume(),
        ]


def scratch_volume() -> dict[str, Any]:
    # Temporary files, torch's compile caches, MLflow's downloads: a read-only root filesystem sends them here.
    return {"name": "scratch", "emptyDir": {"sizeLimit": "2Gi"}}


def scratch_mount() -> dict[str, Any]:
    return {"name": "scratch", "mountPath": SCRATCH_MOUNT}


def scratch_env() -> list[dict[str, str]]:
    """Where libraries write without being asked (caches, config dirs under $HOME): all on the scratch volume."""
    return [
        {"name": "HOME", "value": SCRATCH_MOUNT},
        {"name": "XDG_CACHE_HOME", "value": f"{SCRATCH_MOUNT}/.cache"},
        {"name": "MPLCONFIGDIR", "value": f"{SCRATCH_MOUNT}/matplotlib"},
    ]


def make_plan(config: DistmlConfig) -> Plan:
    """Resolve ``config`` (validated, command-line options included) into a plan."""
    k8s = config.k8s
    p = config.pipeline
    if p.dataset == "folder" and not k8s.source:
        raise UsageError(
            "a folder dataset needs [k8s] source: where the images are inside the cluster",
            hint=f'copy {p.source} onto the workspace volume and set source = "{WORKSPACE_MOUNT}/sources/..."',
        )
    if k8s.gpus_per_node and image_repository(k8s.image) == CPU_IMAGE:
        raise UsageError(
            f"[k8s] gpus_per_node = {k8s.gpus_per_node} needs the CUDA image, but {k8s.image} is the CPU build "
            "(Dockerfile: torch without CUDA or NCCL)",
            hint="build Dockerfile.cuda (distml-cuda:TAG) and set [k8s] image to it, or gpus_per_node = 0",
        )
    _check_canary(config)
    shape = pipeline_shape(candidate_configs(config))
    # A RayJob that runs a search trains no candidates: its trials are jobs of [train] workers (checked below).
    searching = k8s.engine == "ray" and k8s.ray_run != "candidates"
    candidates = [] if searching else [_job(k8s, f"candidate {n}", n, cfg) for n, cfg in shape.candidates.items()]
    if k8s.logger_url is None and k8s.log_sink_image is None:
        raise UsageError(
            "the request-log sink needs [k8s] log_sink_image pinned by tag and digest (REPO:TAG@sha256:DIGEST)",
            hint="e.g. crane digest gcr.io/knative-releases/knative.dev/eventing/cmd/event_display:<release>, "
            "or point [k8s] logger_url at an existing sink",
        )
    dataset = p.name or (Path(p.source).name if p.dataset == "folder" and p.source else p.dataset)
    mlflow_uri = k8s.mlflow_uri or f"http://distml-mlflow.{k8s.namespace}.svc.cluster.local:{MLFLOW_PORT}"
    logger_url = k8s.logger_url or f"http://distml-request-log.{k8s.namespace}.svc.cluster.local"
    return Plan(
        config,
        k8s,
        shape,
        tuple(candidates),
        model_name_for(dataset),
        mlflow_uri,
        logger_url,
        render_mlflow=k8s.mlflow_uri is None,
        render_logsink=k8s.logger_url is None,
        render_runtime=k8s.engine == "argo" and k8s.training == "trainjob" and k8s.runtime == DISTML_RUNTIME,
        ray_pods=_ray_pods(config, candidates) if k8s.engine == "ray" else 0,
    )


def _check_canary(config: DistmlConfig) -> None:
    """A canary the cluster can serve: a registry reference (a folder here is not in the pods) and a whole
    percent (KServe's canaryTrafficPercent is an integer)."""
    serve = config.serve
    if serve.canary is None:
        return
    if not serve.canary.startswith("models:/"):
        raise UsageError(
            f"[serve] canary = {serve.canary!r} is a folder on this machine; the cluster's pods load models from "
            "the registry",
            hint='register it and set canary = "models:/NAME@ALIAS" (e.g. @challenger)',
        )
    if serve.canary_percent != int(serve.canary_percent):
        raise UsageError(
            f"[serve] canary_percent = {serve.canary_percent:g}: KServe splits traffic by whole percents "
            "(canaryTrafficPercent)",
            hint=f"use {int(serve.canary_percent)} or {int(serve.canary_percent) + 1}",
        )


def image_repository(image: str) -> str:
    """The last part of an image's repository: ``distml`` for ``registry.example.com/ml/distml:0.1@sha256:...``."""
    name = image.split("@", 1)[0].rsplit("/", 1)[-1]
    return name.split(":", 1)[0]


def _job(k8s: K8sConfig, what: str, label: str, cfg: TrainConfig) -> Candidate:
    """A training job of ``cfg.workers`` workers as pods of ``procs_per_node`` workers (or fewer: a smaller job);
    ``what`` names it in an error (``candidate cnn``)."""
    procs = min(k8s.procs_per_node, cfg.workers)
    if cfg.workers % procs:
        raise UsageError(
            f"{what}: {cfg.workers} workers do not split into pods of {procs} (k8s.procs_per_node)",
            hint="make workers a multiple of procs_per_node",
        )
    if k8s.gpus_per_node and procs > k8s.gpus_per_node:
        raise UsageError(
            f"{what}: {procs} workers per pod but {k8s.gpus_per_node} GPUs per pod",
            hint="NCCL runs one worker per GPU: procs_per_node <= gpus_per_node",
        )
    # Each worker gets the cores its pod asks for, so the job never oversubscribes the pod's CPU limit.
    sized = cfg.model_copy(update={"threads_per_worker": cfg.threads_per_worker or k8s.cpu_per_worker})
    return Candidate(label, sized, cfg.workers // procs, procs)


def _ray_pods(config: DistmlConfig, candidates: list[Candidate]) -> int:
    """The RayCluster's worker pods: ``[k8s] ray_worker_pods``, or room for every job at once (as the Argo
    render runs the candidates side by side; a search runs ``max_concurrent`` trials of ``[train] workers``).

    Ray places a job's workers by the cores each asks for (``threads_per_worker``, sized to ``cpu_per_worker``),
    and a worker pod offers ``procs_per_node`` workers' cores: a job needs as many pods as the Argo render gives
    it. A cluster smaller than the largest job could never place it.
    """
    k8s = config.k8s
    if k8s.ray_run == "candidates":
        largest = max(candidates, key=lambda c: c.nodes)
        what, needed = f"candidate {largest.label}", sum(c.nodes for c in candidates)
    else:  # every trial is a job of [train] workers (workers is not searchable)
        what = "a search trial ([train] workers)"
        largest = _job(k8s, what, "trial", config.train)
        needed = largest.nodes * config.search.max_concurrent
    pods = k8s.ray_worker_pods or needed
    if pods < largest.nodes:
        raise UsageError(
            f"{what}: a job of {largest.nodes} pod(s) x {largest.procs} worker(s) cannot fit on {pods} Ray worker "
            "pod(s) ([k8s] ray_worker_pods)",
            hint=f"set ray_worker_pods to at least {largest.nodes}, or fewer workers per job",
        )
    return pods
