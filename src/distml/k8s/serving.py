"""Serving on Kubernetes: the KServe ``InferenceService`` running ``distml serve``, and its monitoring.

The predictor is a custom container: the same server as ``distml serve`` on a laptop (KServe V1 and V2 on one
HTTP port, dynamic batching, ``/metrics``), loading the registry's champion from the MLflow server. KServe adds
autoscaling and its request logger (CloudEvents to a sink). Prometheus scrapes the pods through a
``ServiceMonitor``; alerts on the error rate and p99 latency are a ``PrometheusRule``; a Grafana dashboard
charts the same metrics.

gRPC (``[serve] grpc_port`` set). KServe's predictor runs on Knative, which gives a revision exactly one port
(its validation refuses a second one across all containers) and names its protocol: ``http1`` or ``h2c``. With
gRPC on, that port is the server's gRPC port named ``h2c`` (as KServe's own gRPC examples expose theirs), so
Knative and the ingress carry HTTP/2 end to end; REST stays on :data:`SERVE_PORT` inside the pod, where the
readiness probe (Knative's queue-proxy probes the port a probe names), Prometheus and ``kubectl port-forward``
reach it. The liveness probe becomes a gRPC health check: Knative rewrites an HTTP liveness probe's port to
the serving port, where HTTP/1 would get no answer.

Canary (``[serve] canary`` set). KServe's rollout is by revision: an InferenceService applied with
``canaryTrafficPercent: P`` sends P% of requests to its new revision and the rest to the last one rolled out.
``inference-service-canary.yaml`` is that step: the predictor serving the canary's model, the champion's
revision keeping the rest; re-applying ``inference-service.yaml`` rolls back, dropping the field promotes.
"""

from __future__ import annotations

import json
from typing import Any

from distml.k8s.core import Obj, _service, config_mount_path
from distml.k8s.plan import (
    CONTAINER_SECURITY,
    GRPC_PORT,
    SERVE_PORT,
    WORKSPACE_MOUNT,
    Plan,
    scratch_mount,
    scratch_volume,
)

ISVC_NAME = "distml"
PREDICTOR_PODS = {"serving.kserve.io/inferenceservice": ISVC_NAME}  # KServe labels the predictor's pods so


def inference_service(plan: Plan, *, ref: str, version: str, canary_percent: int | None = None) -> Obj:
    """The InferenceService serving ``ref``; with ``canary_percent``, the rollout step that gives its revision
    that share of the requests (KServe's ``canaryTrafficPercent``) and the previous revision the rest."""
    k = plan.k8s
    grpc = plan.config.serve.grpc_port is not None
    probe = {
        "httpGet": {"path": "/v2/health/ready", "port": SERVE_PORT},
        "periodSeconds": 5,
        "timeoutSeconds": 2,
        "failureThreshold": 3,
    }
    args = ["--config", config_mount_path("distml.toml"), "serve", ref,
            "--host", "0.0.0.0", "--port", str(SERVE_PORT), "--drain-s", "5"]  # fmt: skip  # noqa: S104
    if grpc:
        args += ["--grpc-port", str(GRPC_PORT)]
    # Knative allows one port per revision (see the module docstring): gRPC's when it is on.
    port = {"name": "h2c", "containerPort": GRPC_PORT} if grpc else {"name": "http1", "containerPort": SERVE_PORT}
    liveness: Obj = (
        {"grpc": {"port": GRPC_PORT}} if grpc else {"httpGet": {"path": "/v2/health/live", "port": SERVE_PORT}}
    )
    container = {
        "name": "kserve-container",
        "image": k.image,
        "command": ["distml"],
        # --drain-s: after SIGTERM answer not-ready while the endpoints drop the pod, then finish what is in flight.
        "args": args,
        "env": plan.env(),
        "ports": [{**port, "protocol": "TCP"}],
        "readinessProbe": probe,
        "livenessProbe": {
            **liveness,
            "periodSeconds": 10,
            "timeoutSeconds": 2,
            "initialDelaySeconds": 10,
        },
        "resources": {
            "requests": {"cpu": k.serve_cpu, "memory": k.serve_memory},
            "limits": {"cpu": k.serve_cpu, "memory": k.serve_memory},
        },
        # The champion is downloaded from MLflow into a pod-local workspace: replicas share no volume.
        "volumeMounts": [
            {"name": "workspace", "mountPath": WORKSPACE_MOUNT},
            {"name": "config", "mountPath": "/etc/distml", "readOnly": True},
            scratch_mount(),
        ],
        # All in the container's own context: Knative refuses most pod-level security fields (fsGroup, seccomp)
        # unless its feature flags allow them, so the container is restricted by itself.
        "securityContext": {**CONTAINER_SECURITY, "runAsUser": 1000, "runAsGroup": 1000},
    }
    predictor: Obj = {
        "serviceAccountName": "distml-serve",
        **({} if canary_percent is None else {"canaryTrafficPercent": canary_percent}),
        "minReplicas": k.serve_min_replicas,
        "maxReplicas": k.serve_max_replicas,
        "scaleMetric": k.serve_scale_metric,
        "scaleTarget": k.serve_scale_target,
        "annotations": {"distml.io/model-version": version},  # a new champion version rolls a new revision
        "logger": {"mode": plan.config.serve.log_mode, "url": plan.logger_url},
        "containers": [container],
        "volumes": [
            {"name": "workspace", "emptyDir": {"sizeLimit": "2Gi"}},
            {"name": "config", "configMap": {"name": "distml-config"}},
            scratch_volume(),
        ],
    }
    annotations = {
        "distml.io/model": ref,
        # Knative's autoscaler reads these (KServe's scaleMetric/scaleTarget set the same in its own API).
        "autoscaling.knative.dev/metric": k.serve_scale_metric,
        "autoscaling.knative.dev/target": str(k.serve_scale_target),
    }
    if k.serve_scale_metric == "cpu":  # Knative's own autoscaler knows concurrency and rps; cpu is the HPA's
        annotations["autoscaling.knative.dev/class"] = "hpa.autoscaling.knative.dev"
    meta = plan.meta(ISVC_NAME, "serve", annotations=annotations)
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": meta,
        "spec": {"predictor": predictor},
    }


def metrics_service(plan: Plan) -> Obj:
    """A Service over the predictor pods' own port, for Prometheus (KServe's routes go through Knative)."""
    return _service(
        plan, "distml-serve-metrics", "serve", SERVE_PORT, SERVE_PORT, selector=PREDICTOR_PODS, port_name="metrics"
    )


def service_monitor(plan: Plan) -> Obj:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": plan.meta("distml-serve", "serve"),
        "spec": {
            "selector": {"matchLabels": plan.labels("serve")},
            "namespaceSelector": {"matchNames": [plan.namespace]},
            "endpoints": [{"port": "metrics", "path": "/metrics", "interval": "15s", "scrapeTimeout": "10s"}],
        },
    }


ERROR_RATIO = (
    'sum(rate(distml_requests_total{status=~"5.."}[5m])) / clamp_min(sum(rate(distml_requests_total[5m])), 1e-9)'
)
P99 = 'histogram_quantile(0.99, sum by (le) (rate(distml_request_seconds_bucket{stage="total"}[5m])))'


def prometheus_rule(plan: Plan, *, max_error_ratio: float = 0.01, max_p99_s: float = 0.25) -> Obj:
    rules = [
        {
            "alert": "DistmlHighErrorRate",
            "expr": f"{ERROR_RATIO} > {max_error_ratio}",
            "for": "5m",
            "labels": {"severity": "page"},
            "annotations": {
                "summary": f"distml: more than {max_error_ratio:.0%} of requests fail (5xx)",
                "description": "{{ $value | humanizePercentage }} of requests answered 5xx over 5 minutes.",
            },
        },
        {
            "alert": "DistmlHighP99Latency",
            "expr": f"{P99} > {max_p99_s}",
            "for": "10m",
            "labels": {"severity": "warn"},
            "annotations": {
                "summary": f"distml: p99 inference latency above {max_p99_s * 1000:.0f} ms",
                "description": 'p99 of distml_request_seconds{stage="total"} is {{ $value }} s.',
            },
        },
        {
            "alert": "DistmlRequestLogDropping",
            "expr": 'increase(distml_log_events_total{outcome="dropped"}[15m]) > 0',
            "labels": {"severity": "warn"},
            "annotations": {"summary": "distml: request-log events are being dropped"},
        },
    ]
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": plan.meta("distml-serve", "serve"),
        "spec": {"groups": [{"name": "distml-serve", "rules": rules}]},
    }


def dashboard() -> dict[str, Any]:
    """A Grafana dashboard of the server's metrics (Prometheus datasource picked when imported)."""
    ds = {"type": "prometheus", "uid": "${datasource}"}

    def panel(i: int, title: str, exprs: list[tuple[str, str]], unit: str) -> dict[str, Any]:
        return {
            "id": i + 1,
            "type": "timeseries",
            "title": title,
            "datasource": ds,
            "gridPos": {"h": 8, "w": 12, "x": (i % 2) * 12, "y": (i // 2) * 8},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "targets": [
                {"refId": chr(65 + j), "datasource": ds, "expr": e, "legendFormat": legend}
                for j, (e, legend) in enumerate(exprs)
            ],
        }

    panels = [
        panel(
            0,
            "Requests per second by status",
            [("sum by (status) (rate(distml_requests_total[1m]))", "{{status}}")],
            "reqps",
        ),
        panel(1, "Error ratio (5xx)", [(ERROR_RATIO, "errors")], "percentunit"),
        panel(2, "Latency p50 / p99 (total)", [(P99.replace("0.99", "0.5"), "p50"), (P99, "p99")], "s"),
        panel(
            3,
            "p99 latency by stage",
            [("histogram_quantile(0.99, sum by (le, stage) (rate(distml_request_seconds_bucket[5m])))", "{{stage}}")],
            "s",
        ),
        panel(
            4,
            "Mean batch size",
            [
                (
                    "sum(rate(distml_batch_size_sum[5m])) / clamp_min(sum(rate(distml_batch_size_count[5m])), 1e-9)",
                    "images per model run",
                )
            ],
            "short",
        ),
        panel(
            5,
            "Queue depth and request-log drops",
            [
                ("sum(distml_queue_depth)", "queue"),
                ('sum(increase(distml_log_events_total{outcome="dropped"}[5m]))', "log events dropped"),
            ],
            "short",
        ),
    ]
    return {
        "title": "distml model server",
        "uid": "distml-serve",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "30s",
        "templating": {
            "list": [{"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus"}]
        },
        "panels": panels,
    }


def dashboard_config_map(plan: Plan) -> Obj:
    """The dashboard for Grafana's sidecar, which loads ConfigMaps labelled ``grafana_dashboard``."""
    meta = plan.meta("distml-grafana-dashboard", "monitoring")
    meta["labels"]["grafana_dashboard"] = "1"
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": meta,
        "data": {"distml-serve.json": json.dumps(dashboard(), indent=2) + "\n"},
    }
