"""Prometheus metrics of the model server (``GET /metrics``).

- ``distml_requests_total{protocol, model, status}``: every request, health and metadata included;
- ``distml_request_seconds{protocol, stage}``: latency of inference requests by stage: ``decode`` (read the
  body, parse, decode images), ``queue`` (wait for a batch), ``infer`` (the batch's model run), ``encode``
  (build the response) and ``total``;
- ``distml_batch_size``: images per model run; ``distml_queue_depth``: requests waiting or on their way;
- ``distml_model_info{model, version, platform}``: 1 for the served model;
- ``distml_variant_info{variant, version}``: 1 for each variant the server routes to or shadows (``champion``,
  ``canary``, ``shadow``) and the version it serves; a hot swap moves the champion's series to the new version;
- ``distml_variant_requests_total{variant, version, status}``: inference requests by the variant that took them;
- ``distml_swaps_total{outcome}``: hot swaps of the champion, ``swapped`` or ``refused`` (failed verification);
- ``distml_canary_percent``: the canary's share of sticky keys now (0 once rolled back);
  ``distml_rollbacks_total``: automatic canary rollbacks;
- ``distml_shadow_requests_total{outcome}``: shadow runs ``compared``, ``dropped`` (the shadow fell behind) or
  ``failed``; ``distml_shadow_images_total{outcome}``: the images compared, ``agree`` or ``disagree`` on the
  top-1 class with the answer sent (agreement = agree / (agree + disagree));
- ``distml_log_events_total{outcome}``: request-log CloudEvents ``sent`` or ``dropped``;
- ``distml_log_dropped_total{reason}``: the dropped ones by why: ``buffer_full`` (events or bytes), ``sink_error``
  (unreachable after retries), ``encode_error`` (an event that cannot be written), ``internal_error``, ``shutdown``
  (still unsent at the end).

With ``--workers N`` every worker process writes to a shared folder (prometheus-client's multiprocess mode,
switched on by ``PROMETHEUS_MULTIPROC_DIR`` before the workers start) and any worker's ``/metrics`` reports the
sum over all of them.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PROTOCOLS = ("v1", "v2", "grpc")
STAGES = ("decode", "queue", "infer", "encode", "total")
# Seconds: a batch-1 inference is ~30 us and a whole request ~200 us on an idle machine; the tail reaches seconds.
LATENCY_BUCKETS = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    """The server's metrics, in a registry of their own (so two servers in one process do not collide)."""

    def __init__(self, model: str, version: str) -> None:
        # The *_created series would double the output, and nothing reads them.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry(auto_describe=True)
        self._multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        r = self.registry
        self.model = model
        self.requests = Counter("distml_requests", "Requests by protocol, model and status.",
                                ["protocol", "model", "status"], registry=r)  # fmt: skip
        self.latency = Histogram("distml_request_seconds", "Inference request latency by stage.",
                                 ["protocol", "stage"], buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.batch_size = Histogram("distml_batch_size", "Images per model run.", buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("distml_queue_depth", "Requests waiting for the model or on their way to it.",
                                 registry=r, multiprocess_mode="livesum")  # fmt: skip
        self.model_info = Gauge("distml_model_info", "The served model.", ["model", "version", "platform"],
                                registry=r, multiprocess_mode="liveall")  # fmt: skip
        self.log_events = Counter("distml_log_events", "Request-log events by outcome.", ["outcome"], registry=r)
        self.log_dropped = Counter("distml_log_dropped", "Request-log events dropped, by reason.", ["reason"],
                                   registry=r)  # fmt: skip
        self.variant_info = Gauge(
            "distml_variant_info",
            "The served variants and their versions.",
            ["variant", "version"],
            registry=r,
            multiprocess_mode="liveall",
        )
        self.variant_requests = Counter(
            "distml_variant_requests",
            "Inference requests by variant, version, status.",
            ["variant", "version", "status"],
            registry=r,
        )
        self.swaps = Counter("distml_swaps", "Hot swaps of the champion by outcome.", ["outcome"], registry=r)
        self.canary_percent = Gauge(
            "distml_canary_percent",
            "The canary's share of requests now, in percent.",
            registry=r,
            multiprocess_mode="liveall",
        )
        self.rollbacks = Counter("distml_rollbacks", "Automatic canary rollbacks.", registry=r)
        self.shadow_requests = Counter("distml_shadow_requests", "Shadow runs by outcome.", ["outcome"], registry=r)
        self.shadow_images = Counter(
            "distml_shadow_images", "Images the shadow compared, by top-1 agreement.", ["outcome"], registry=r
        )
        self.model_info.labels(model, version, "onnxruntime").set(1)
        self.variant_info.labels("champion", version).set(1)
        for outcome in ("swapped", "refused"):
            self.swaps.labels(outcome)
        for outcome in ("sent", "dropped"):
            self.log_events.labels(outcome)  # present at 0 from the start, so a reconciliation can read it
        self._stage = {(p, s): self.latency.labels(p, s) for p in PROTOCOLS for s in STAGES}
        self._counts: dict[tuple[str, str, int], Counter] = {}
        self._variant_pending: dict[tuple[str, str, int], int] = {}

    def request(self, protocol: str, model: str, status: int) -> None:
        key = (protocol, model, status)
        child = self._counts.get(key)
        if child is None:
            child = self._counts[key] = self.requests.labels(protocol, model, str(status))
        child.inc()

    def variant_request(self, variant: str, version: str, status: int) -> None:
        """Count one inference request of ``variant``: a dict increment here, added to the counter by
        :meth:`flush` (at every scrape, and every second by the app) so the request path pays no counter lock."""
        key = (variant, version, status)
        pending = self._variant_pending
        pending[key] = pending.get(key, 0) + 1

    def flush(self) -> None:
        """Move the counts :meth:`variant_request` gathered into ``distml_variant_requests_total``."""
        pending, self._variant_pending = self._variant_pending, {}
        for (variant, version, status), n in pending.items():
            self.variant_requests.labels(variant, version, str(status)).inc(n)

    def variant(self, role: str, version: str | None, was: str | None = None) -> None:
        """``role`` now serves ``version`` (None: no longer served); ``was``: the version it served before."""
        if was is not None and was != version:
            self._unset(self.variant_info, role, was)
            if role == "champion":
                self._unset(self.model_info, self.model, was, "onnxruntime")
        if version is not None:
            self.variant_info.labels(role, version).set(1)
            if role == "champion":
                self.model_info.labels(self.model, version, "onnxruntime").set(1)

    def _unset(self, gauge: Gauge, *labels: str) -> None:
        # A series gone from one process stays in the multiprocess files, so there it reads 0 instead
        if self._multiprocess:
            gauge.labels(*labels).set(0)
        else:
            gauge.remove(*labels)

    def stage(self, protocol: str, stage: str, seconds: float) -> None:
        self._stage[protocol, stage].observe(seconds)

    def batch(self, size: int, depth: int) -> None:
        self.batch_size.observe(size)
        self.queue_depth.set(depth)

    def render(self) -> bytes:
        self.flush()
        if self._multiprocess:
            merged = CollectorRegistry()
            MultiProcessCollector(merged)  # type: ignore[no-untyped-call]
            return generate_latest(merged)
        return generate_latest(self.registry)
