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
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from distml.errors import ConfigError
from distml.k8s.config import K8sConfig as K8sConfig  # re-exported: the [k8s] section lives beside its renderer
from distml.model_names import MODEL_NAMES, check_model_name
from distml.search.config import SearchConfig
from distml.selection_rule import test_metric_problem

DEFAULT_HOME = Path(".distml")
HOME_ENV = "DISTML_HOME"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WorkspaceConfig(_Section):
    """Where everything distml writes lives (datasets, downloads, runs, the pipeline cache, the MLflow store)."""

    home: Path = Field(
        default=DEFAULT_HOME, description="Workspace folder for datasets, runs and models (env: DISTML_HOME)"
    )


class DataConfig(_Section):
    """Dataset ingest and store settings."""

    shard_bytes: int = Field(default=16 * 1024 * 1024, ge=1024, description="target bytes of one image shard")
    max_image_pixels: int = Field(
        default=40_000_000, ge=1, description="decoded pixels above which an image is a decompression bomb"
    )
    max_image_file_bytes: int = Field(default=64 * 1024 * 1024, ge=1)
    on_bad_file: Literal["fail", "skip"] = Field(
        default="fail", description="Folder datasets: fail on an unreadable image, or skip and list it"
    )
    download_timeout_s: float = Field(default=60.0, gt=0)


class TrainConfig(_Section):
    """One training job: W replicas of one model under torchrun, in lock-step (DDP).

    ``batch_size`` is the global batch; each replica gets ``batch_size / workers``.
    """

    dataset: str = Field(default="fashion-mnist", description="Dataset name or digest prefix")
    model: str = Field(default="cnn", description=f"The network: {', '.join(MODEL_NAMES)}")
    workers: int = Field(default=2, ge=1, le=1024, description="Worker processes (DDP replicas) on this host")
    epochs: int = Field(default=5, ge=1, le=10_000, description="Passes over the training split")
    batch_size: int = Field(default=64, ge=1, description="The global batch; each worker gets batch / workers")
    lr: float = Field(default=2e-3, gt=0, description="Peak learning rate")
    optimizer: Literal["adamw", "sgd"] = "adamw"
    weight_decay: float = Field(default=5e-4, ge=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    schedule: Literal["constant", "step", "cosine", "onecycle"] = Field(
        default="onecycle", description="Learning-rate schedule"
    )
    warmup_epochs: float = Field(default=0.0, ge=0)
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    # "none" by default: the seed CNNs reach 91% faster without it.
    augment: Literal["none", "crop", "crop+flip"] = Field(
        default="none", description="Random crop (pad 2) and horizontal flip; helps longer runs of bigger nets"
    )
    # Off by default: it doubles the cost of every prediction (evaluation and serving) for about +0.3 points.
    tta: Literal["none", "flip"] = Field(
        default="none",
        description="Test-time augmentation: flip averages the softmax of each image and its mirror image, in "
        "evaluation and in the exported model",
    )
    # The test split only reports (choices are made on validation), so a run that needs only its final test figure
    # can skip the per-epoch pass: 10,000 Fashion-MNIST images, ~10 s of each ~80 s resnet-fast epoch on 2 cores.
    eval_test: Literal["epoch", "end"] = Field(
        default="epoch", description="Evaluate the test split after every epoch, or only after the last (faster)"
    )
    seed: int = Field(default=0, description="Seeds weights, data order, augmentation and dropout")
    # The validation split is carved from train by its own seed, not ``seed``: every candidate and trial of a
    # search is then compared on the same images, whatever its training seed.
    val_fraction: float = Field(
        default=0.1, ge=0, lt=1, description="Share of the train split held out for validation (0: train on all)"
    )
    val_seed: int = Field(default=0, description="Seeds which train images form the validation split")
    width: float = Field(default=1.0, gt=0, le=8, description="Channel width multiplier, for models that have one")
    dropout: float | None = Field(default=None, ge=0, lt=1, description="Dropout rate (None: the model's own)")
    checkpoint_every_steps: int = Field(
        default=0, ge=0, description="Also checkpoint every N steps (0: only at the end of each epoch)"
    )
    threads_per_worker: int = Field(default=0, ge=0, description="Intra-op threads per worker (0: cores / workers)")
    allow_oversubscribe: bool = Field(default=False, description="Allow workers x threads > cores")
    compile: bool = Field(default=False, description="torch.compile the model (GPU)")
    max_restarts: int = Field(
        default=0, ge=0, description="torchrun restarts after a worker dies (each resumes from the checkpoint)"
    )
    bucket_cap_mb: float = Field(default=25.0, gt=0, description="DDP gradient bucket size (MB)")
    cpu_allreduce: Literal["shm", "gloo"] = Field(
        default="shm", description="shm: through shared memory when every CPU worker is on this host; else gloo"
    )
    log_every_steps: int = Field(default=50, ge=1)

    @field_validator("model")
    @classmethod
    def _known_model(cls, name: str) -> str:
        # check_model_name raises the project's UsageError, which pydantic lets through unchanged: an unknown
        # model reads the same from the command line, a config file, a [[candidates]] table or code.
        return check_model_name(name)


class ServeConfig(_Section):
    """The model server (``distml serve``): where it listens, how it batches, its limits and request logging."""

    model: str | None = Field(default=None, description="path or models:/NAME@ALIAS; None: the dataset's champion")
    # Loopback unless asked: a model server on all interfaces is a choice, not a default.
    host: str = Field(default="127.0.0.1", description="Interface to listen on; 0.0.0.0 for all")
    port: int = Field(default=8080, ge=0, le=65535, description="Port to listen on (0 picks a free one)")
    workers: int = Field(default=1, ge=1, le=64, description="Server processes sharing the port")
    threads: int = Field(default=1, ge=1, le=256, description="ONNX Runtime intra-op threads per worker")
    max_batch_size: int = Field(default=32, ge=1, le=4096, description="Images per model run, across requests")
    max_batch_delay_ms: float = Field(
        default=2.0,
        ge=0,
        le=10_000,
        description="Longest a batch waits for requests already on their way (never when none are)",
    )
    max_queue: int = Field(default=64, ge=1, description="Places for requests admitted and waiting for the model")
    max_queue_wait_ms: float = Field(
        default=100.0,
        ge=0,
        le=60_000,
        description="With the queue full, a request may still get a place this long after it came",
    )
    max_loop_lag_ms: float = Field(
        default=35.0,
        gt=0,
        le=60_000,
        description="With more requests in than max_queue, refuse new ones while the event loop runs this late",
    )
    refusal_delay_ms: float = Field(
        default=2000.0, ge=0, le=60_000, description="A refused request gets its 503 this late, give or take half"
    )
    request_timeout_s: float = Field(default=30.0, gt=0, description="Longest a request waits for its answer (503)")
    max_body_bytes: int = Field(default=16 << 20, ge=1024, description="Request body limit (413)")
    max_instances: int = Field(default=256, ge=1, description="Images per request (413)")
    max_image_side: int = Field(default=4096, ge=1, description="Pixels, either side of an encoded image")
    max_image_pixels: int = Field(default=4096 * 4096, ge=1, description="Width x height of an encoded image")
    max_request_pixels: int = Field(
        default=2 * 4096 * 4096, ge=1, description="Decoded pixels per request, summed from the image headers (413)"
    )
    decode_timeout_s: float = Field(default=5.0, gt=0, description="Longest one request's images may decode (503)")
    max_response_bytes: int = Field(default=64 << 20, ge=1024, description="Largest answer body (500 past it)")
    max_inflight_bytes: int = Field(
        default=256 << 20, ge=1024, description="Bodies being read or queued, all requests together (503)"
    )
    max_header_bytes: int = Field(default=64 << 10, ge=1024, description="Request line + headers (431)")
    header_timeout_s: float = Field(default=5.0, gt=0, description="Headers must arrive within this (408)")
    body_timeout_s: float = Field(default=15.0, gt=0, description="The body must arrive within this (408)")
    idle_timeout_s: float = Field(default=5.0, gt=0, description="Close an idle keep-alive connection after this")
    log_url: str | None = Field(
        default=None, description="Send each request and response as a CloudEvent to this HTTP endpoint"
    )
    log_file: Path | None = Field(default=None, description="...or append them to this JSON-lines file")
    log_mode: Literal["all", "request", "response"] = Field(default="all", description="Which events to log")
    log_buffer: int = Field(default=10_000, ge=1, description="Events held for the sink before dropping")
    log_buffer_bytes: int = Field(default=64 << 20, ge=1024, description="And their bodies' bytes, at most")
    drain_s: float = Field(default=0.0, ge=0, description="After SIGTERM, answer not-ready this long before stopping")
    graceful_timeout_s: float = Field(default=10.0, ge=0, description="Then wait this long for requests in flight")
    access_log: bool = Field(default=False, description="One log line per request (costs throughput)")
    # gRPC: the Open Inference Protocol's GRPCInferenceService, on the same batcher and limits as REST. Off unless
    # asked, like every listener; the message limits are max_body_bytes (in) and max_response_bytes (out).
    grpc_port: int | None = Field(
        default=None, ge=0, le=65535, description="Also serve gRPC V2 on this port (0 picks a free one); off if unset"
    )
    # Rollout: a server on models:/NAME@ALIAS follows the alias; a canary and a shadow are second models.
    follow_s: float = Field(
        default=5.0, ge=0, description="A models:/NAME@ALIAS server checks the alias this often and swaps; 0: never"
    )
    canary: str | None = Field(default=None, description="A second model (models:/NAME@ALIAS or a folder) for a share")
    canary_percent: float = Field(default=10.0, ge=0, le=100, description="Percent of requests the canary answers")
    route_header: str = Field(
        default="x-route-key", description="Header whose value keeps a client on one variant (else the request id)"
    )
    shadow: str | None = Field(
        default=None, description="A model run on every request off the answer path, its agreement recorded"
    )
    rollback_window_s: float = Field(default=30.0, gt=0, description="The canary is judged over this sliding window")
    rollback_min_requests: int = Field(default=20, ge=1, description="Canary requests in the window before judging")
    rollback_error_margin: float = Field(
        default=0.05, ge=0, le=1, description="Roll back when the canary's error rate exceeds the champion's by this"
    )
    rollback_latency_ratio: float = Field(
        default=2.0, ge=1, description="...or its p99 latency exceeds this times the champion's"
    )
    rollback_latency_floor_ms: float = Field(
        default=10.0,
        ge=0,
        le=60_000,
        description="...and by at least this many ms (a ratio of sub-millisecond latencies is scheduling noise)",
    )
    rollback_alias: str | None = Field(
        default=None, description="On rollback, also move this registry alias back to the champion's version"
    )

    @model_validator(mode="after")
    def _one_sink(self) -> ServeConfig:
        if self.log_url and self.log_file:
            raise ValueError("log_url and log_file are alternatives: set one")
        if self.log_url and not self.log_url.startswith(("http://", "https://")):
            raise ValueError(f"log_url must be an http:// or https:// URL, not {self.log_url!r}")
        return self


class PipelineConfig(_Section):
    """``distml run``: the dataset it ingests, the candidates it trains (with ``[train]``) and how it chooses."""

    dataset: Literal["fashion-mnist", "cifar10", "folder"] = Field(
        default="fashion-mnist", description="What to ingest"
    )
    source: str | None = Field(
        default=None, description="A local folder or mirror URL of the dataset's files; for 'folder' the images"
    )
    name: str | None = Field(
        default=None, description="The dataset's name in the store (default: its own name, or the folder's)"
    )
    image_size: tuple[int, int] = Field(default=(32, 32), description="folder datasets: height, width")
    mode: Literal["L", "RGB"] = Field(default="RGB", description="folder datasets: grey (L) or colour (RGB)")
    test_fraction: float = Field(
        default=0.2,
        gt=0,
        lt=1,
        description="folder datasets: share of images (by hash of their path) put in the test split when there is "
        "no train/ and test/",
    )
    candidates: tuple[str, ...] = Field(
        default=("cnn", "cnn-dropout", "cnn-batchnorm"),
        min_length=1,
        description="Models to train (comma-separated), each with [train]; [[candidates]] tables replace this list",
    )
    # Chosen on the validation split carved from train ([train] val_fraction): test metrics only report.
    metric: str = Field(
        default="val_accuracy", description="What picks the winner, on validation: val_accuracy, val_loss..."
    )
    direction: Literal["max", "min"] = Field(default="max", description="Whether the largest or smallest wins")
    max_latency_ms: float | None = Field(
        default=None, gt=0, description="Only candidates whose batch-1 latency is at most this"
    )
    max_params: int | None = Field(default=None, gt=0, description="Only candidates with at most this many parameters")

    @field_validator("metric")
    @classmethod
    def _not_a_test_metric(cls, metric: str) -> str:
        problem = test_metric_problem(metric)
        if problem:
            raise ValueError(problem)
        return metric

    @model_validator(mode="after")
    def _source_for_folder(self) -> PipelineConfig:
        if self.dataset == "folder" and not self.source:
            raise ValueError("dataset 'folder' needs source = the image folder (ROOT/<class>/<image>)")
        return self


class ClusterConfig(_Section):
    """Where jobs run: this host's processes (local) or a Ray cluster."""

    engine: Literal["local", "ray"] = Field(
        default="local", description="local: this host's processes; ray: the Ray cluster at address"
    )
    address: str | None = Field(
        default=None,
        description="The Ray cluster: auto (one started with `ray start` on this host) or HOST:PORT of its head",
    )
    placement: Literal["pack", "spread"] = Field(
        default="pack", description="Ray: a job's workers on as few nodes as fit (pack) or one per node (spread)"
    )

    @field_validator("address")
    @classmethod
    def _address_form(cls, address: str | None) -> str | None:
        if address is None or address == "auto":
            return address
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{address!r} is not auto or HOST:PORT (the head node's GCS port, e.g. 10.0.0.1:6379)")
        return address

    @model_validator(mode="after")
    def _ray_needs_address(self) -> ClusterConfig:
        if self.engine == "ray" and self.address is None:
            raise ValueError("engine 'ray' needs an address: auto, or HOST:PORT of the cluster's head (--ray ADDRESS)")
        return self


class DistmlConfig(_Section):
    """The root of the config tree; later stages add their sections here."""

    workspace: WorkspaceConfig = WorkspaceConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    serve: ServeConfig = ServeConfig()
    pipeline: PipelineConfig = PipelineConfig()
    k8s: K8sConfig = K8sConfig()
    search: SearchConfig = SearchConfig()
    # Where jobs run. In no cache key or study name: the engine does not change results (tests/test_ray_train.py).
    cluster: ClusterConfig = ClusterConfig()
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
                raise ConfigError(f"candidates[{i}] has an unknown key {unknown[0]!r}{hint}")
            merged = {**self.train.model_dump(), **table, **(overrides or {})}
            try:
                configs.append(TrainConfig.model_validate(merged))
            except ValidationError as exc:
                raise config_error(exc, source=f"candidates[{i}]") from None
        return configs


def load_config(
    path: Path | None = None,
    *,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> DistmlConfig:
    """Build the validated config: the one place where settings are merged and checked.

    ``overrides`` are dotted keys (``{"workspace.home": "/data"}``) from the command line; ``None`` values are
    ignored so that unset CLI options do not clobber the file. An invalid value is a :class:`ConfigError`
    that names where it came from: the file, or the command line (then by the option's name).
    """
    env = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_toml(path)
    if env.get(HOME_ENV):
        _set_dotted(raw, "workspace.home", env[HOME_ENV])
    given = {key: value for key, value in (overrides or {}).items() if value is not None}
    for key, value in given.items():
        _set_dotted(raw, key, value)
    try:
        return DistmlConfig.model_validate(raw)
    except ValidationError as exc:
        raise config_error(exc, source=str(path) if path else "command line", given=given) from None


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


def config_error(exc: ValidationError, *, source: str | None = None, given: Iterable[str] = ()) -> ConfigError:
    """The first problem of ``exc`` as one line naming the field, what it accepts and where it came from.

    A value set on the command line (a dotted key in ``given``) is named as the option was (``port=99999 in
    command line``); one from ``source`` by its full key (``train.epochs='many' in distml.toml``).
    """
    first = exc.errors()[0]
    loc = tuple(str(p) for p in first["loc"])
    field = ".".join(loc)
    dotted = tuple(given)
    if loc and any(key == field or key.startswith(f"{field}.") for key in dotted):
        source = "command line"
        field = loc[-1] if field in dotted else field
    where = f" in {source}" if source else ""
    if first["type"] == "extra_forbidden":
        return ConfigError(f"unknown config key {field}{where}" + _nearest_key(first["loc"]))
    if first["type"] == "value_error":  # a cross-field rule of a section: its message says it all
        section = f" [{field}]" if field else ""
        return ConfigError(f"invalid config{section}{where}: {first['msg'].removeprefix('Value error, ')}")
    given_value = first.get("input")
    return ConfigError(f"invalid config value {field}={given_value!r}{where}: {first['msg']}")


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
