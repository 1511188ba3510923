"""Prometheus metrics of the model server (``GET /metrics``).

- ``distml_requests_total{protocol, model, status}``: every request, health and metadata included;
- ``distml_request_seconds{protocol, stage}``: latency of inference requests by stage: ``decode`` (read the
  body, parse, decode images), ``queue`` (wait for a batch), ``infer`` (the batch's model run), ``encode``
  (build the response) and ``total``;
- ``distml_batch_size``: images per model run; ``distml_queue_depth``: requests waiting or on their way;
- ``distml_model_info{model, version, platform}``: 1 for the served model;
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
        self.model_info.labels(model, version, "onnxruntime").set(1)
        for outcome in ("sent", "dropped"):
            self.log_events.labels(outcome)  # present at 0 from the start, so a reconciliation can read it
        self._stage = {(p, s): self.latency.labels(p, s) for p in ("v1", "v2") for s in STAGES}
        self._counts: dict[tuple[str, str, int], Counter] = {}

    def request(self, protocol: str, model: str, status: int) -> None:
        key = (protocol, model, status)
        child = self._counts.get(key)
        if child is None:
            child = self._counts[key] = self.requests.labels(protocol, model, str(status))
        child.inc()

    def stage(self, protocol: str, stage: str, seconds: float) -> None:
        self._stage[protocol, stage].observe(seconds)

    def batch(self, size: int, depth: int) -> None:
        self.batch_size.observe(size)
        self.queue_depth.set(depth)

    def render(self) -> bytes:
        if self._multiprocess:
            merged = CollectorRegistry()
            MultiProcessCollector(merged)  # type: ignore[no-untyped-call]
            return generate_latest(merged)
        return generate_latest(self.registry)
