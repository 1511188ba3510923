"""NetworkPolicies: by default nothing in the namespace sends or receives anything; then only the pipeline's flows.

==========================  ==================================================================================
policy                      what it lets through
==========================  ==================================================================================
distml-default-deny         nothing, in or out, for every pod of the namespace (the rest are exceptions)
distml-dns                  every pod: DNS to the cluster's resolver (kube-system, ``k8s-app: kube-dns``, 53)
distml-workflow             workflow pods: the Kubernetes API (Argo's executor, the resource steps) and MLflow
distml-ingest               the ingest steps: the dataset's source (its mirrors over HTTPS), unless on the volume
distml-mlflow               MLflow: in from the workflow's pods (steps and training jobs) and the predictor only
distml-train                training pods: out to MLflow (to each other: the job's own policy, below)
distml-serve                predictor pods: in from the ingress/Knative namespaces and Prometheus; out to
                            MLflow (the champion) and the request-log sink
distml-request-log          the sink: in from the predictor pods only
<workflow>-<candidate>      made by the workflow for each multi-pod training job: that job's pods to and from
                            each other on any port, and no other pod. The c10d store that torchrun's rendezvous
                            serves has no authentication, and gloo/NCCL listen on ephemeral ports, so the
                            peers are pinned instead of the ports: only the same job's pods.
==========================  ==================================================================================

With ``[k8s] engine = "ray"`` the workflow's, ingest's and training pods' policies give way to the RayCluster's:

==========================  ==================================================================================
distml-ray                  the RayCluster's pods (KubeRay's ``ray.io/cluster`` label): to and from each other
                            on Ray's pinned ports (:func:`distml.k8s.ray.cluster_ports`: GCS 6379, dashboard
                            8265, client 10001, node/object manager, agents, metrics, workers 10002-19999, the
                            pods' ephemeral range 20000-29999 for torch's rendezvous and gloo/NCCL); out to MLflow
distml-ray-head             the head's job API (8265): in from the RayJob's submitter and KubeRay's operator;
                            out to the dataset's source (the driver ingests), unless on the volume
distml-ray-submitter        the submitter: out to the head's job API only
distml-mlflow               in from the Ray pods (and the predictor) instead of the workflow's
==========================  ==================================================================================

Pods are selected by the labels the render puts on them (``app.kubernetes.io/component``), KServe's
``serving.kserve.io/inferenceservice`` on the predictor, and the operator's job label on a job's pods.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from distml.k8s import ray
from distml.k8s.core import SINK_PORT, Obj
from distml.k8s.plan import APP, GRPC_PORT, MLFLOW_PORT, SERVE_PORT, Candidate, Plan
from distml.k8s.serving import PREDICTOR_PODS
from distml.k8s.training import JOB_LABEL

# Knative's queue-proxy ports on a predictor pod (HTTP/1, HTTP/2, HTTPS, admin, autoscaler and user metrics),
# what the activator, the ingress gateway and Knative's autoscaler connect to; the server's own port is what
# they reach in KServe's raw-deployment mode.
QUEUE_PROXY_PORTS = (8012, 8013, 8112, 8022, 9090, 9091)
INGEST_STEPS = ("ingest-key", "ingest")  # the steps that fetch the dataset's source


def _pods(component: str) -> dict[str, Any]:
    return {"matchLabels": {"app.kubernetes.io/name": APP, "app.kubernetes.io/component": component}}


def _ports(*ports: int, protocol: str = "TCP") -> list[Obj]:
    return [{"protocol": protocol, "port": p} for p in ports]


def _namespace(name: str) -> dict[str, Any]:
    return {"matchLabels": {"kubernetes.io/metadata.name": name}}


def _policy(
    plan: Plan,
    name: str,
    component: str,
    selector: dict[str, Any],
    *,
    ingress: list[Obj] | None = None,
    egress: list[Obj] | None = None,
) -> Obj:
    spec: Obj = {"podSelector": selector, "policyTypes": []}
    if ingress is not None:
        spec["policyTypes"].append("Ingress")
        spec["ingress"] = ingress
    if egress is not None:
        spec["policyTypes"].append("Egress")
        spec["egress"] = egress
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": plan.meta(name, component),
        "spec": spec,
    }


def url_port(url: str) -> int:
    """The TCP port a client of ``url`` connects to."""
    parts = urlsplit(url)
    return parts.port or (443 if parts.scheme == "https" else 80)


def _to_url(url: str) -> Obj:
    # A server outside the namespace, known only by URL: its address may be anything, so only the port is pinned.
    return {"ports": _ports(url_port(url))}


def _mlflow_egress(plan: Plan) -> Obj:
    if plan.render_mlflow:
        return {"to": [{"podSelector": _pods("mlflow")}], "ports": _ports(MLFLOW_PORT)}
    return _to_url(plan.mlflow_uri)


def _source_ports(source: str | None) -> tuple[int, ...]:
    """The ports the ingest fetches the dataset from: none for a path on the volume."""
    if source is None:
        return (443,)  # the dataset's download mirrors (HTTPS)
    if "://" not in source or source.startswith("file://"):
        return ()
    return (url_port(source),)


def policies(plan: Plan) -> list[Obj]:
    """The namespace's NetworkPolicies (the per-job ones are the workflow's: :func:`job_policy`)."""
    dns = {
        "to": [
            {"namespaceSelector": _namespace("kube-system"), "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}
        ],
        "ports": _ports(53, protocol="UDP") + _ports(53),
    }
    out = [
        _policy(plan, "distml-default-deny", "network", {}, ingress=[], egress=[]),
        _policy(plan, "distml-dns", "network", {}, egress=[dns]),
    ]
    out += _ray_policies(plan) if plan.k8s.engine == "ray" else _argo_policies(plan)
    return out + _serve_policies(plan)


def _argo_policies(plan: Plan) -> list[Obj]:
    """The workflow's steps, the ingest, MLflow (in from steps and training pods) and the training pods."""
    k = plan.k8s
    # Argo's executor reports outputs and the resource steps create jobs through the API server; its address is
    # outside any pod network, so [k8s] api_server_cidr (all by default) and its two usual ports pin it.
    api = {"to": [{"ipBlock": {"cidr": k.api_server_cidr}}], "ports": _ports(443, 6443)}
    out = [_policy(plan, "distml-workflow", "workflow", _pods("workflow"), egress=[api, _mlflow_egress(plan)])]
    ports = _source_ports(k.source)
    if ports:
        ingest = {
            "matchLabels": _pods("workflow")["matchLabels"],
            "matchExpressions": [{"key": "distml.io/step", "operator": "In", "values": list(INGEST_STEPS)}],
        }
        out.append(_policy(plan, "distml-ingest", "workflow", ingest, egress=[{"ports": _ports(*ports)}]))
    out += _mlflow_policy(plan, ["workflow", "train"])
    out.append(_policy(plan, "distml-train", "train", _pods("train"), egress=[_mlflow_egress(plan)]))
    return out


def _mlflow_policy(plan: Plan, clients: list[str]) -> list[Obj]:
    """MLflow (when rendered): in from the pods of ``clients`` (components) and the predictor, on its port."""
    if not plan.render_mlflow:
        return []
    selector = {
        "matchLabels": {"app.kubernetes.io/name": APP},
        "matchExpressions": [{"key": "app.kubernetes.io/component", "operator": "In", "values": clients}],
    }
    admitted = {
        "from": [{"podSelector": selector}, {"podSelector": {"matchLabels": PREDICTOR_PODS}}],
        "ports": _ports(MLFLOW_PORT),
    }
    return [_policy(plan, "distml-mlflow", "mlflow", _pods("mlflow"), ingress=[admitted])]


def _ray_policies(plan: Plan) -> list[Obj]:
    """The RayCluster's pods to and from each other on Ray's pinned ports only; its job API (the head's 8265) to
    the RayJob's submitter and KubeRay's operator; out to MLflow, and from the head (the driver: the ingest) to
    the dataset's source.

    Ray's token authenticates its RPCs and the job API, but not gloo/NCCL or torch's rendezvous store, which a
    Ray Train job opens on the ephemeral ports: those are admitted from the same cluster's pods only.
    """
    own = {"podSelector": {"matchLabels": ray.CLUSTER_PODS}}
    head = {"matchLabels": ray.HEAD_PODS}
    peers = {"from": [own], "ports": ray.cluster_ports()}
    out = _mlflow_policy(plan, [ray.COMPONENT])
    egress = [{"to": [own], "ports": ray.cluster_ports()}, _mlflow_egress(plan)]
    out.append(_policy(plan, "distml-ray", ray.COMPONENT, own["podSelector"], ingress=[peers], egress=egress))
    operator = {
        "namespaceSelector": _namespace(plan.k8s.ray_operator_namespace),
        "podSelector": {"matchLabels": ray.OPERATOR_POD},
    }
    job_api = {
        "from": [{"podSelector": _pods(ray.SUBMITTER_COMPONENT)}, operator],
        "ports": _ports(ray.DASHBOARD_PORT),
    }
    ports = _source_ports(plan.k8s.source)
    source = [{"ports": _ports(*ports)}] if ports else None
    out.append(_policy(plan, "distml-ray-head", ray.COMPONENT, head, ingress=[job_api], egress=source))
    to_api = {"to": [{"podSelector": head}], "ports": _ports(ray.DASHBOARD_PORT)}
    submitter = _pods(ray.SUBMITTER_COMPONENT)
    out.append(_policy(plan, "distml-ray-submitter", ray.SUBMITTER_COMPONENT, submitter, egress=[to_api]))
    return out


def _serve_policies(plan: Plan) -> list[Obj]:
    """The predictor: in from the ingress/Knative namespaces and Prometheus; out to MLflow and the sink."""
    k = plan.k8s
    out: list[Obj] = []
    serve_in: list[Obj] = []
    # In raw-deployment mode the ingress reaches the server's own ports; gRPC's only when it is on.
    own = (SERVE_PORT,) if plan.config.serve.grpc_port is None else (SERVE_PORT, GRPC_PORT)
    if k.ingress_namespaces:
        serve_in.append(
            {
                "from": [
                    {
                        "namespaceSelector": {
                            "matchExpressions": [
                                {
                                    "key": "kubernetes.io/metadata.name",
                                    "operator": "In",
                                    "values": list(k.ingress_namespaces),
                                }
                            ]
                        }
                    }
                ],
                "ports": _ports(*QUEUE_PROXY_PORTS, *own),
            }
        )
    serve_in.append(
        {  # Prometheus scrapes /metrics on the server's port
            "from": [
                {
                    "namespaceSelector": _namespace(k.prometheus_namespace),
                    "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
                }
            ],
            "ports": _ports(SERVE_PORT),
        }
    )
    sink = (
        {"to": [{"podSelector": _pods("request-log")}], "ports": _ports(SINK_PORT)}
        if plan.render_logsink
        else _to_url(plan.logger_url)
    )
    serve_sel = {"matchLabels": PREDICTOR_PODS}
    out.append(_policy(plan, "distml-serve", "serve", serve_sel, ingress=serve_in, egress=[_mlflow_egress(plan), sink]))
    if plan.render_logsink:
        from_predictor = {"from": [{"podSelector": serve_sel}], "ports": _ports(SINK_PORT)}
        out.append(_policy(plan, "distml-request-log", "request-log", _pods("request-log"), ingress=[from_predictor]))
    return out


def job_policy(plan: Plan, cand: Candidate, run_name: str) -> Obj:
    """A multi-pod job's pods to and from each other, and only them (``run_name``: the job's name)."""
    own = {"podSelector": {"matchLabels": {JOB_LABEL[plan.k8s.training]: run_name}}}
    meta = {
        "name": run_name,
        "namespace": plan.namespace,
        "labels": {**plan.labels("train"), "distml.io/candidate": cand.label},
    }
    spec = {
        "podSelector": own["podSelector"],
        "policyTypes": ["Ingress", "Egress"],
        "ingress": [{"from": [own]}],
        "egress": [{"to": [own]}],
    }
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": meta, "spec": spec}
