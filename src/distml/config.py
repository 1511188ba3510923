"""The typed config tree, validated once.

One :class:`DistmlConfig` holds a typed section per component. It is built explicitly by
:func:`load_config` from (lowest to highest precedence) defaults, an optional TOML file, the ``DISTML_HOME``
environment variable and command-line overrides. Nothing here runs at import time. Validation errors become a
:class:`~distml.errors.ConfigError` that names the field and what it accepts.

Runtime objects (devices, process groups, open stores) never live in config; they are built from it.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from distml.errors import ConfigError

DEFAULT_HOME = Path(".distml")
HOME_ENV = "DISTML_HOME"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WorkspaceConfig(_Section):
    """Where everything distml writes lives (datasets, downloads; later runs, the MLflow store)."""

    home: Path = DEFAULT_HOME


class DataConfig(_Section):
    """Dataset ingest and store settings."""

    shard_bytes: int = Field(default=16 * 1024 * 1024, ge=1024, description="target bytes of one image shard")
    max_image_pixels: int = Field(
        default=40_000_000, ge=1, description="decoded pixels above which an image is a decompression bomb"
    )
    max_image_file_bytes: int = Field(default=64 * 1024 * 1024, ge=1)
    on_bad_file: Literal["fail", "skip"] = "fail"
    download_timeout_s: float = Field(default=60.0, gt=0)


class TrainConfig(_Section):
    """One training job: W replicas of one model under torchrun, in lock-step (DDP).

    ``batch_size`` is the global batch; each replica gets ``batch_size / workers``.
    """

    dataset: str = "fashion-mnist"
    model: str = "cnn"
    workers: int = Field(default=2, ge=1, le=1024)
    epochs: int = Field(default=5, ge=1, le=10_000)
    batch_size: int = Field(default=64, ge=1)
    lr: float = Field(default=2e-3, gt=0)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    weight_decay: float = Field(default=5e-4, ge=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    schedule: Literal["constant", "step", "cosine", "onecycle"] = "onecycle"
    warmup_epochs: float = Field(default=0.0, ge=0)
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    augment: Literal["none", "crop", "crop+flip"] = "none"  # the seed CNNs reach 91% faster without it
    seed: int = 0
    checkpoint_every_steps: int = Field(default=0, ge=0, description="0: only at the end of each epoch")
    threads_per_worker: int = Field(default=0, ge=0, description="0: cores / workers")
    allow_oversubscribe: bool = False
    compile: bool = False
    max_restarts: int = Field(default=0, ge=0)
    bucket_cap_mb: float = Field(default=25.0, gt=0, description="DDP gradient bucket size (MB)")
    cpu_allreduce: Literal["shm", "gloo"] = Field(
        default="shm", description="shm: through shared memory when every CPU worker is on this host; else gloo"
    )
    log_every_steps: int = Field(default=50, ge=1)


class ServeConfig(_Section):
    """The model server (``distml serve``): where it listens, how it batches, its limits and request logging."""

    model: str | None = Field(default=None, description="path or models:/NAME@ALIAS; None: the dataset's champion")
    host: str = "127.0.0.1"  # loopback unless asked: a model server on all interfaces is a choice, not a default
    port: int = Field(default=8080, ge=0, le=65535)
    workers: int = Field(default=1, ge=1, le=64)
    threads: int = Field(default=1, ge=1, le=256, description="ONNX Runtime intra-op threads per worker")
    max_batch_size: int = Field(default=32, ge=1, le=4096)
    max_batch_delay_ms: float = Field(default=2.0, ge=0, le=10_000)
    max_queue: int = Field(default=64, ge=1, description="requests admitted and waiting for the model")
    max_queue_wait_ms: float = Field(
        default=100.0, ge=0, le=60_000, description="when the queue is full, how long a request waits for a place"
    )
    max_loop_lag_ms: float = Field(
        default=50.0, gt=0, le=60_000, description="refuse new requests while the event loop runs this late"
    )
    refusal_delay_ms: float = Field(
        default=1000.0, ge=0, le=60_000, description="a request refused for a full queue gets its 503 this late"
    )
    request_timeout_s: float = Field(default=30.0, gt=0)
    max_body_bytes: int = Field(default=16 << 20, ge=1024)
    max_instances: int = Field(default=256, ge=1, description="images per request")
    max_image_side: int = Field(default=4096, ge=1, description="pixels, either side of an encoded image")
    max_image_pixels: int = Field(default=4096 * 4096, ge=1, description="width x height of an encoded image")
    max_request_pixels: int = Field(
        default=2 * 4096 * 4096, ge=1, description="decoded pixels per request, summed from the image headers"
    )
    decode_timeout_s: float = Field(default=5.0, gt=0, description="longest the images of one request may decode")
    max_response_bytes: int = Field(default=64 << 20, ge=1024, description="largest answer body (500 past it)")
    max_inflight_bytes: int = Field(
        default=256 << 20, ge=1024, description="bodies being read or queued, all requests together, before 503"
    )
    max_header_bytes: int = Field(default=64 << 10, ge=1024, description="request line + headers (431 past it)")
    header_timeout_s: float = Field(default=5.0, gt=0, description="a request's headers must arrive within this")
    body_timeout_s: float = Field(default=15.0, gt=0, description="its body must arrive within this (408)")
    idle_timeout_s: float = Field(default=5.0, gt=0, description="an idle keep-alive connection is closed after")
    log_url: str | None = Field(default=None, description="send CloudEvents of requests/responses here (HTTP)")
    log_file: Path | None = Field(default=None, description="or append them to this JSON-lines file")
    log_mode: Literal["all", "request", "response"] = "all"
    log_buffer: int = Field(default=10_000, ge=1, description="events held for the sink before dropping")
    log_buffer_bytes: int = Field(default=64 << 20, ge=1024, description="and their bodies' bytes, at most")
    drain_s: float = Field(default=0.0, ge=0, description="after SIGTERM: answer not-ready this long, then stop")
    graceful_timeout_s: float = Field(default=10.0, ge=0, description="then wait this long for requests in flight")
    access_log: bool = False

    @model_validator(mode="after")
    def _one_sink(self) -> ServeConfig:
        if self.log_url and self.log_file:
            raise ValueError("log_url and log_file are alternatives: set one")
        if self.log_url and not self.log_url.startswith(("http://", "https://")):
            raise ValueError(f"log_url must be an http:// or https:// URL, not {self.log_url!r}")
        return self


class PipelineConfig(_Section):
    """``distml run``: the dataset it ingests, the candidates it trains (with ``[train]``) and how it chooses."""

    dataset: Literal["fashion-mnist", "cifar10", "folder"] = "fashion-mnist"
    source: str | None = Field(
        default=None, description="a local folder or mirror URL of the dataset's files; for 'folder' the images"
    )
    name: str | None = Field(default=None, description="the dataset's name in the store (default: its kind)")
    image_size: tuple[int, int] = Field(default=(32, 32), description="folder datasets: height, width")
    mode: Literal["L", "RGB"] = "RGB"
    test_fraction: float = Field(default=0.2, gt=0, lt=1)
    candidates: tuple[str, ...] = Field(
        default=("cnn", "cnn-dropout", "cnn-batchnorm"),
        min_length=1,
        description="models to train, each with [train]; [[candidates]] tables replace this list when present",
    )
    metric: str = "test_accuracy"
    direction: Literal["max", "min"] = "max"
    max_latency_ms: float | None = Field(default=None, gt=0)
    max_params: int | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _source_for_folder(self) -> PipelineConfig:
        if self.dataset == "folder" and not self.source:
            raise ValueError("dataset 'folder' needs source = the image folder (ROOT/<class>/<image>)")
        return self


class K8sConfig(_Section):
    """``distml k8s render``: how the pipeline runs on Kubernetes (Argo Workflows, Kubeflow Trainer, KServe)."""

    image: str = Field(default="distml:0.1.0", description="the image built from the repo's Dockerfile")
    namespace: str = Field(default="distml", pattern=r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
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


class DistmlConfig(_Section):
    """The root of the config tree; later stages add their sections here."""

    workspace: WorkspaceConfig = WorkspaceConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    serve: ServeConfig = ServeConfig()
    pipeline: PipelineConfig = PipelineConfig()
    k8s: K8sConfig = K8sConfig()
    # [[candidates]] tables: each overrides some [train] settings for one candidate of ``distml train
    # --candidates`` (e.g. ``model = "resnet-small"`` with its own ``lr``).
    candidates: tuple[dict[str, Any], ...] = ()

    @model_validator(mode="after")
    def _check_candidates(self) -> DistmlConfig:
        self.candidate_configs()  # every candidate must make a valid TrainConfig
        return self

    def candidate_configs(
        self, tables: Sequence[Mapping[str, Any]] | None = None, overrides: Mapping[str, Any] | None = None
    ) -> list[TrainConfig]:
        """One TrainConfig per candidate: ``[train]``, then the candidate's table, then ``overrides`` (the CLI).

        ``tables`` defaults to the ``[[candidates]]`` of this config.
        """
        configs = []
        for i, table in enumerate(self.candidates if tables is None else tables):
            unknown = sorted(set(table) - set(TrainConfig.model_fields))
            if unknown:
                near = difflib.get_close_matches(unknown[0], list(TrainConfig.model_fields), n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                raise ValueError(f"candidates[{i}] has an unknown key {unknown[0]!r}{hint}")
            configs.append(TrainConfig.model_validate({**self.train.model_dump(), **table, **(overrides or {})}))
        return configs


def load_config(
    path: Path | None = None,
    *,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> DistmlConfig:
    """Build the validated config.

    ``overrides`` are dotted keys (``{"workspace.home": "/data"}``) from the command line; ``None`` values are
    ignored so that unset CLI options do not clobber the file.
    """
    env = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_toml(path)
    if env.get(HOME_ENV):
        _set_dotted(raw, "workspace.home", env[HOME_ENV])
    for key, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(raw, key, value)
    try:
        return DistmlConfig.model_validate(raw)
    except ValidationError as exc:
        raise _config_error(exc, source=str(path) if path else "command line") from None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist", hint="check the --config path") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from None


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = raw
    for i, part in enumerate(parents):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            section = ".".join(parents[: i + 1])
            raise ConfigError(f"config key {section} must be a table ([{section}]), not {node!r}")
    node[leaf] = value


def _config_error(exc: ValidationError, *, source: str) -> ConfigError:
    first = exc.errors()[0]
    field = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        return ConfigError(f"unknown config key {field} in {source}" + _nearest_key(first["loc"]))
    if first["type"] == "value_error":  # a cross-field rule of a section: its message says it all
        return ConfigError(f"invalid config [{field}] in {source}: {first['msg'].removeprefix('Value error, ')}")
    given = first.get("input")
    return ConfigError(f"invalid config value {field}={given!r} in {source}: {first['msg']}")


def _nearest_key(loc: tuple[int | str, ...]) -> str:
    """`` (did you mean 'epochs'?)`` for an unknown key at ``loc``, when a valid key of that table is close."""
    model: Any = DistmlConfig
    for part in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return ""
        model = field.annotation
    valid = list(getattr(model, "model_fields", {}))
    near = difflib.get_close_matches(str(loc[-1]), valid, n=1)
    return f" (did you mean {near[0]!r}?)" if near else f" (valid keys: {', '.join(valid)})"
