"""``[k8s]`` in distml.toml: how ``distml k8s render`` runs the pipeline on Kubernetes.

A leaf module (pydantic only): :mod:`distml.config` holds a :class:`K8sConfig` as its ``k8s`` section (and
re-exports it), as it holds :class:`~distml.search.config.SearchConfig`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class K8sConfig(BaseModel):
    """``distml k8s render``: how the pipeline runs on Kubernetes (Argo + Kubeflow Trainer, or KubeRay; KServe)."""

    model_config = ConfigDict(extra="forbid", frozen=True)  # as every section of distml.config

    image: str = Field(default="distml:0.1.0", description="The distml image the pods run (the repo's Dockerfile)")
    namespace: str = Field(
        default="distml", pattern=r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$", description="Namespace of every object"
    )
    training: Literal["trainjob", "pytorchjob"] = Field(
        default="trainjob", description="Kubeflow Trainer v2 TrainJob, or the v1 training operator's PyTorchJob"
    )
    runtime: str = Field(
        default="distml-torch-distributed",
        description="the TrainJob's ClusterTrainingRuntime; the default one is rendered (restricted pods)",
    )
    procs_per_node: int = Field(default=1, ge=1, le=64, description="DDP workers per pod; workers / this = pods")
    cpu_per_worker: int = Field(default=2, ge=1, le=256, description="cores requested per DDP worker")
    memory_per_worker: str = Field(default="4Gi", pattern=r"^[0-9]+(Ki|Mi|Gi|Ti)?$")
    gpus_per_node: int = Field(default=0, ge=0, le=16, description="> 0: NCCL on nvidia.com/gpu (Dockerfile.cuda)")
    storage_size: str = Field(default="20Gi", pattern=r"^[0-9]+(Mi|Gi|Ti)$")
    storage_class: str | None = Field(default=None, description="None: the cluster's default StorageClass")
    access_mode: Literal["ReadWriteOnce", "ReadWriteMany"] = Field(
        default="ReadWriteOnce", description="ReadWriteMany when training pods may land on several nodes"
    )
    source: str | None = Field(
        default=None, description="the dataset source inside the cluster (a mirror URL or a path on the volume)"
    )
    mlflow_uri: str | None = Field(default=None, description="an existing MLflow server; None: render one")
    serve_min_replicas: int = Field(default=1, ge=0, le=1000)
    serve_max_replicas: int = Field(default=4, ge=1, le=1000)
    serve_scale_metric: Literal["concurrency", "rps", "cpu"] = "concurrency"
    serve_scale_target: int = Field(default=16, ge=1, description="per replica, of serve_scale_metric")
    serve_cpu: str = Field(default="2", pattern=r"^[0-9]+(\.[0-9]+|m)?$")
    serve_memory: str = Field(default="2Gi", pattern=r"^[0-9]+(Ki|Mi|Gi|Ti)?$")
    logger_url: str | None = Field(
        default=None, description="KServe's request logger sink; None: render an event-display sink"
    )
    # No default: an image is pinned by a digest someone checked, and a stale one would be worse than none.
    log_sink_image: str | None = Field(
        default=None, description="the rendered sink's image as REPO:TAG@sha256:DIGEST (required unless logger_url)"
    )
    ingress_namespaces: tuple[str, ...] = Field(
        default=("istio-system", "knative-serving"),
        description="namespaces whose pods may reach the predictor (ingress gateway, Knative activator)",
    )
    prometheus_namespace: str = Field(default="monitoring", pattern=r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
    api_server_cidr: str = Field(
        default="0.0.0.0/0", description="where workflow pods may reach the Kubernetes API (TCP 443 and 6443)"
    )
    pod_security: Literal["restricted", "baseline"] = Field(
        default="restricted", description="the namespace's enforced Pod Security Standard"
    )
    train_deadline_hours: float = Field(default=24, gt=0, description="a training step fails after this long")
    argo_controller: str = Field(
        default="argo:argo", pattern=r"^[a-z0-9-]+:[a-z0-9-]+$",
        description="NAMESPACE:SERVICEACCOUNT of Argo's controller, which writes the memoize cache",
    )  # fmt: skip
    engine: Literal["argo", "ray"] = Field(
        default="argo",
        description="argo: Argo Workflows + Kubeflow Trainer jobs; ray: a RayJob running 'distml run --ray auto' "
        "on a KubeRay RayCluster",
    )
    ray_run: Literal["candidates", "search", "search+refit"] = Field(
        default="candidates",
        description="engine ray: the RayJob's 'distml run' trains the candidates, or runs --search (and --refit)",
    )
    ray_worker_pods: int | None = Field(
        default=None,
        ge=1,
        le=1000,
        description="engine ray: the RayCluster's worker pods (procs_per_node workers each); None: every job at once",
    )
    ray_head_cpu: str = Field(
        default="2", pattern=r"^[0-9]+(\.[0-9]+|m)?$", description="engine ray: the head pod's cores (no training)"
    )
    ray_head_memory: str = Field(default="8Gi", pattern=r"^[0-9]+(Ki|Mi|Gi|Ti)?$")
    ray_operator_namespace: str = Field(
        default="default",
        pattern=r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$",
        description="engine ray: the namespace of KubeRay's operator (it polls the head's job API)",
    )

    @model_validator(mode="after")
    def _replicas(self) -> K8sConfig:
        import ipaddress
        import re

        if self.serve_max_replicas < self.serve_min_replicas:
            raise ValueError("serve_max_replicas must be at least serve_min_replicas")
        pinned = r"[a-z0-9][a-z0-9._/:-]*:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}@sha256:[0-9a-f]{64}"
        if self.log_sink_image is not None and not re.fullmatch(pinned, self.log_sink_image):
            raise ValueError(f"log_sink_image {self.log_sink_image!r} is not REPO:TAG@sha256:<64 hex digits>")
        for ns in self.ingress_namespaces:
            if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", ns):
                raise ValueError(f"ingress_namespaces: {ns!r} is not a namespace name")
        try:
            ipaddress.ip_network(self.api_server_cidr)
        except ValueError:
            raise ValueError(f"api_server_cidr {self.api_server_cidr!r} is not a CIDR (e.g. 10.0.0.1/32)") from None
        return self
