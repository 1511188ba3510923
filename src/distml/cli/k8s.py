"""``distml k8s``: render the pipeline for Kubernetes and validate what was rendered."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from distml.cli.options import AppContext, config_options, pass_app
from distml.errors import DistmlError

if TYPE_CHECKING:
    from distml.k8s.plan import Plan


@click.group("k8s")
def k8s() -> None:
    """Kubernetes: the pipeline as Argo Workflows + Kubeflow Trainer (or KubeRay) + KServe manifests.

    \b
      distml k8s render --out deploy/           # a Kustomize folder from distml.toml ([k8s] and the rest)
      distml k8s validate deploy/               # against the upstream CRDs and the Kubernetes schemas
      kubectl apply -k deploy/ && kubectl create -f deploy/workflow.yaml
      distml k8s render --engine ray --out deploy/   # a RayCluster + RayJob ('kubectl create -f deploy/ray-job.yaml')
    See docs/kubernetes.md for a cluster from scratch.
    """


@k8s.command("render")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="The folder to write (replaced).")
@config_options("k8s", "image", "namespace", "training", "engine")
@pass_app
def render_cmd(app: AppContext, out: Path) -> None:
    """Write the pipeline as a Kustomize folder: workflow, training jobs, InferenceService, monitoring.

    The settings come from the config (--config on 'distml'): [pipeline] and [[candidates]] as for 'distml
    run', [serve] for the server and [k8s] for the cluster (image, storage, pods per job, autoscaling).
    With --engine ray: a KubeRay RayCluster and a RayJob running 'distml run --ray auto' in place of the
    workflow and its jobs ([k8s] ray_run, ray_worker_pods, ray_head_cpu, ray_head_memory).
    """
    from distml.k8s.plan import MLFLOW_AUTH_SECRET
    from distml.k8s.render import render

    plan, written = render(app.config, out)
    for path in written:
        click.echo(f"  {path}")
    what = f"rendered {len(written)} files to {out}: namespace {plan.namespace}, image {plan.k8s.image}"
    if plan.k8s.engine == "ray":
        _ray_summary(plan, what)
    else:
        jobs = ", ".join(f"{c.label} ({c.nodes}x{c.procs})" for c in plan.candidates)
        kind = "TrainJob" if plan.k8s.training == "trainjob" else "PyTorchJob"
        click.echo(f"{what}, {kind}s {jobs}")
    if plan.k8s.access_mode == "ReadWriteOnce" and (plan.ray_pods or any(c.nodes > 1 for c in plan.candidates)):
        click.echo(
            "note: the workspace volume is ReadWriteOnce, so every pod that mounts it must run on one node; on a "
            'multi-node cluster set [k8s] access_mode = "ReadWriteMany" (an RWX storage class)'
        )
    if plan.render_mlflow:
        # The MLflow credentials are never rendered (the folder is meant to be committed); the user makes them once.
        click.echo(
            f"MLflow needs its admin credentials in the Secret {MLFLOW_AUTH_SECRET} (once per namespace): "
            f"kubectl -n {plan.namespace} create secret generic {MLFLOW_AUTH_SECRET} --from-literal=username=admin "
            '--from-literal=password="$(openssl rand -base64 24)" '
            '--from-literal=flask-secret-key="$(openssl rand -hex 32)"'
        )
    run = "ray-job.yaml" if plan.k8s.engine == "ray" else "workflow.yaml"
    click.echo(f"next: distml k8s validate {out} && kubectl apply -k {out} && kubectl create -f {out}/{run}")
    if plan.config.serve.canary is not None:
        click.echo(
            f"then, once the champion serves: kubectl apply -f {out}/inference-service-canary.yaml (KServe sends "
            f"{plan.config.serve.canary_percent:g}% of requests to the canary; re-apply inference-service.yaml to "
            "roll back)"
        )


def _ray_summary(plan: Plan, what: str) -> None:
    """What the KubeRay render runs, and where its token is."""
    from distml.k8s.ray import CLUSTER_NAME, entrypoint

    k = plan.k8s
    pod = f"{k.cpu_per_worker * k.procs_per_node} cores" + (f" + {k.gpus_per_node} GPUs" if k.gpus_per_node else "")
    click.echo(
        f"{what}, RayCluster {CLUSTER_NAME} (head + {plan.ray_pods} worker pods of {pod}), RayJob: {entrypoint(plan)}"
    )
    click.echo(
        f"the cluster's token: KubeRay generates it into the Secret {CLUSTER_NAME} (key auth_token) and gives it "
        "to the Ray pods and the submitter; nothing secret is rendered"
    )


@k8s.command("validate")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option(
    "--crds",
    type=click.Path(path_type=Path, file_okay=False),
    help="Folder of upstream CRD YAML files. [default: $DISTML_K8S_CRDS, ../shared/k8s-crds]",
)
@click.option("--kubernetes-version", default="1.33", show_default=True, help="API version of the core schemas.")
@click.option("-v", "--verbose", is_flag=True, help="List every object checked.")
def validate_cmd(folder: Path, crds: Path | None, kubernetes_version: str, verbose: bool) -> None:
    """Validate every manifest in FOLDER: custom resources against their CRDs, core objects against the
    Kubernetes OpenAPI schemas. Exits 1 listing each problem with its object and field path.
    """
    from distml.k8s.validate import find_crds, validate_dir

    report = validate_dir(folder, find_crds(crds), kubernetes_version)
    if verbose or report.ok:
        for line in report.checked:
            click.echo(f"  ok  {line}")
    for problem in report.problems:
        click.echo(f"  error  {problem}", err=True)
    if not report.ok:
        raise DistmlError(f"{len(report.problems)} problem(s) in {folder}", hint="each is listed above")
    click.echo(f"{folder}: {len(report.checked)} objects valid")
