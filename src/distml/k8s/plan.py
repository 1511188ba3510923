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
WORKSPACE_MOUNT = "/workspace"  # the workspace volume, DISTML_HOME of every step
CONFIG_MOUNT = "/etc/distml"  # the distml-config ConfigMap: distml.toml and train-<label>.toml
OUTPUTS_DIR = "/tmp/outputs"  # noqa: S108 (inside the step's container: where Argo reads output parameters)
SCRATCH_MOUNT = "/tmp"  # noqa: S108 (an emptyDir: the only writable place besides the volumes)
SERVE_PORT = 8080  # V1 and V2 share the server's one HTTP port
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
    shape = pipeline_shape(candidate_configs(config))
    candidates = []
    for label, cfg in shape.candidates.items():
        procs = min(k8s.procs_per_node, cfg.workers)
        if cfg.workers % procs:
            raise UsageError(
                f"candidate {label}: {cfg.workers} workers do not split into pods of {procs} (k8s.procs_per_node)",
                hint="make workers a multiple of procs_per_node",
            )
        if k8s.gpus_per_node and procs > k8s.gpus_per_node:
            raise UsageError(
                f"candidate {label}: {procs} workers per pod but {k8s.gpus_per_node} GPUs per pod",
                hint="NCCL runs one worker per GPU: procs_per_node <= gpus_per_node",
            )
        # Each worker gets the cores its pod asks for, so the job never oversubscribes the pod's CPU limit.
        sized = cfg.model_copy(update={"threads_per_worker": cfg.threads_per_worker or k8s.cpu_per_worker})
        candidates.append(Candidate(label, sized, cfg.workers // procs, procs))
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
        render_runtime=k8s.training == "trainjob" and k8s.runtime == DISTML_RUNTIME,
    )
