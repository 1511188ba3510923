"""The pipeline's DAG as an Argo ``WorkflowTemplate`` (and a ``Workflow`` that runs it).

The same steps as ``distml run``, each a real ``distml`` command over the shared workspace volume::

    ingest-key -> ingest (memoized on that key) -> train-<label> x N (parallel jobs) -> select -> register -> serve
                                   job-network-<label> ┘ (a multi-pod job: its NetworkPolicy first)

``ingest-key`` prints the cache key the local runner computes for the ingest step (``distml step key ingest``):
Argo's ``memoize`` skips the ingest when a workflow already ingested the same source with the same code.
Training steps are resource steps that create a Kubeflow job per candidate and wait for it; the last step
applies the InferenceService with the new champion's version, which rolls the predictor.

Only the resource steps hold a Kubernetes token that can create things (``distml-workflow-resources``), and
they run nothing but Argo's executor; the containers that run distml have no token at all, and Argo's own
init/wait containers report outputs with ``distml-workflow-executor``'s, which can do nothing else.
"""

from __future__ import annotations

from typing import assert_never

from distml.errors import UsageError
from distml.k8s.core import EXECUTOR_SA, RESOURCES_SA, WORKFLOW_SA, Obj, config_mount_path
from distml.k8s.network import job_policy
from distml.k8s.plan import CONTAINER_SECURITY, OUTPUTS_DIR, POD_SECURITY, Candidate, Plan
from distml.k8s.serving import inference_service
from distml.k8s.training import CONDITIONS, train_job
from distml.k8s.yamlio import dump
from distml.pipeline.shape import Node

TEMPLATE_NAME = "distml-pipeline"
MEMO_CACHE = "distml-memo-cache"  # the ConfigMap Argo keeps memoized outputs in (the controller creates it)
MEMO_MAX_AGE = "720h"


def run_name(label: str) -> str:
    """A candidate's run folder (and job name) in one workflow: unique per workflow, readable in both."""
    return f"{{{{workflow.name}}}}-{label}"


def _networked(plan: Plan) -> list[Candidate]:
    """The candidates whose job spans pods: their pods talk over the network, through their own policy."""
    return [c for c in plan.candidates if c.nodes > 1]


def task_name(node: Node) -> str:
    """A pipeline step's Argo task (and template) name: ``train[cnn]`` -> ``train-cnn`` (Argo names are DNS-like)."""
    return f"train-{node.label}" if node.kind == "train" else node.name


def workflow_template(plan: Plan) -> Obj:
    tasks = _tasks(plan)
    templates = [{"name": "pipeline", "dag": {"tasks": [task for task, _ in tasks]}}]
    templates += [template for _, template in tasks]
    spec = {
        "entrypoint": "pipeline",
        "serviceAccountName": WORKFLOW_SA,
        # No token in the step containers (they run distml); Argo mounts the executor's into its own containers.
        "automountServiceAccountToken": False,
        "executor": {"serviceAccountName": EXECUTOR_SA},
        "podMetadata": {"labels": plan.labels("workflow")},  # what the NetworkPolicies select the steps by
        "volumes": plan.volumes(),
        "securityContext": POD_SECURITY,
        "podGC": {"strategy": "OnWorkflowSuccess"},
        "ttlStrategy": {"secondsAfterSuccess": 7 * 24 * 3600},
        "templates": templates,
    }
    return {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "WorkflowTemplate",
        "metadata": plan.meta(TEMPLATE_NAME, "workflow"),
        "spec": spec,
    }


def workflow(plan: Plan) -> Obj:
    """One run of the template (``kubectl create -f``: each gets a fresh generated name)."""
    meta = {"generateName": "distml-", "namespace": plan.namespace, "labels": plan.labels("workflow")}
    return {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "Workflow",
        "metadata": meta,
        "spec": {"workflowTemplateRef": {"name": TEMPLATE_NAME}},
    }


Task = tuple[Obj, Obj]  # a DAG task and the template it runs (same name)


def _tasks(plan: Plan) -> list[Task]:
    """The pipeline's shape as Argo tasks: each step's own, plus the cluster's extras around them.

    A step runs its ``distml step`` subcommand (a training step: its candidate's job). The extras: ``ingest-key``
    before ingest (Argo memoizes the ingest on that key), a multi-pod job's NetworkPolicy before its training
    task, and ``serve`` after register (it rolls the InferenceService to the new champion).
    """
    shape = plan.shape
    names = {node.name: task_name(node) for node in shape.nodes}
    labels = {node.name: node.label for node in shape.nodes}
    first_train = shape.of("train")[0]
    tasks: list[Task] = []
    for node in shape.nodes:
        name, needs = names[node.name], [names[n] for n in node.needs]
        match node.kind:
            case "ingest":
                key = _ingest_key(plan, f"{name}-key")
                tasks.append(_task(key, needs))
                tasks.append(_task(_ingest(plan, name), [*needs, key["name"]], key=(key["name"], "key")))
            case "train":
                if node is first_train:  # the jobs' NetworkPolicies, listed together before the training tasks
                    tasks += [_task(_job_network(plan, c), []) for c in _networked(plan)]
                (ingest,) = needs
                cand = plan.candidate(node.label)
                if cand.nodes > 1:  # its pods talk to each other only once their policy admits it
                    needs.append(f"job-network-{cand.label}")
                tasks.append(_task(_train(plan, name, cand), needs, dataset=(ingest, "digest16")))
            case "select":
                runs = [run_name(labels[n]) for n in node.needs]
                tasks.append(_task(_select(plan, name, runs), needs))
            case "register":
                (select,) = needs
                tasks.append(_task(_register(plan, name), needs, artifact=(select, "artifact")))
                tasks.append(_task(_serve(plan), [name], ref=(name, "ref"), version=(name, "version")))
            case "search" | "refit":  # make_plan renders the candidates' shape only: a search runs locally
                raise UsageError(f"step {node.name}: 'distml k8s render' does not render a search yet")
            case _:  # a step added to the pipeline's shape without saying how it runs in the cluster
                assert_never(node.kind)
    return tasks


def _task(template: Obj, depends: list[str], **arguments: tuple[str, str]) -> Task:
    """A DAG task running ``template`` after ``depends``; each argument is (task, output parameter) it reads."""
    task: Obj = {"name": template["name"], "template": template["name"]}
    if depends:
        task["depends"] = " && ".join(depends)
    if arguments:
        task["arguments"] = {
            "parameters": [
                {"name": name, "value": f"{{{{tasks.{t}.outputs.parameters.{o}}}}}"}
                for name, (t, o) in arguments.items()
            ]
        }
    return task, template


def _container_step(plan: Plan, name: str, args: list[str], outputs: list[str], inputs: tuple[str, ...] = ()) -> Obj:
    container = {
        "image": plan.k8s.image,
        "command": ["distml"],
        "args": ["--config", config_mount_path("distml.toml"), "step", *args, "--outputs", OUTPUTS_DIR],
        "env": plan.env(),
        "volumeMounts": plan.mounts(),
        "resources": {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "8Gi"}},
        "securityContext": CONTAINER_SECURITY,
    }
    template: Obj = {"name": name, "metadata": {"labels": {"distml.io/step": name}}}
    if inputs:
        template["inputs"] = {"parameters": [{"name": i} for i in inputs]}
    template["outputs"] = {"parameters": [{"name": o, "valueFrom": {"path": f"{OUTPUTS_DIR}/{o}"}} for o in outputs]}
    template["container"] = container
    return template


def _ingest_key(plan: Plan, name: str) -> Obj:
    return _container_step(plan, name, ["key", "ingest"], ["key"])


def _ingest(plan: Plan, name: str) -> Obj:
    template = _container_step(plan, name, ["ingest"], ["digest16", "dataset"], inputs=("key",))
    template["memoize"] = {
        "key": "ingest-{{inputs.parameters.key}}",
        "maxAge": MEMO_MAX_AGE,
        "cache": {"configMap": {"name": MEMO_CACHE}},
    }
    return template


def _resource_step(name: str) -> Obj:
    """A resource step's template head: it runs as the one account that may create things, with its token."""
    return {
        "name": name,
        "serviceAccountName": RESOURCES_SA,
        "automountServiceAccountToken": True,
        "executor": {"serviceAccountName": RESOURCES_SA},
    }


def _job_network(plan: Plan, cand: Candidate) -> Obj:
    """Create the NetworkPolicy of the candidate's job (same name), owned by the workflow like the job."""
    manifest = job_policy(plan, cand, run_name(cand.label))
    return {
        **_resource_step(f"job-network-{cand.label}"),
        "resource": {"action": "create", "setOwnerReference": True, "manifest": dump(manifest)},
    }


def _train(plan: Plan, name: str, cand: Candidate) -> Obj:
    manifest = train_job(plan, cand, "{{inputs.parameters.dataset}}", run_name(cand.label))
    success, failure = CONDITIONS[plan.k8s.training]
    return {
        **_resource_step(name),
        "inputs": {"parameters": [{"name": "dataset"}]},
        # A job that never finishes (unschedulable pods, a hung rendezvous) fails the step instead of the DAG
        # waiting forever; deleting the step's job goes with it (owner reference).
        "activeDeadlineSeconds": int(plan.k8s.train_deadline_hours * 3600),
        "resource": {
            "action": "create",
            "setOwnerReference": True,  # deleting the workflow deletes its jobs
            "successCondition": success,
            "failureCondition": failure,
            "manifest": dump(manifest),
        },
    }


def _select(plan: Plan, name: str, runs: list[str]) -> Obj:
    return _container_step(plan, name, ["select", *runs], ["winner", "artifact", "value"])


def _register(plan: Plan, name: str) -> Obj:
    return _container_step(
        plan, name, ["register", "{{inputs.parameters.artifact}}"], ["name", "version", "ref"], inputs=("artifact",)
    )


def _serve(plan: Plan) -> Obj:
    manifest = inference_service(plan, ref="{{inputs.parameters.ref}}", version="{{inputs.parameters.version}}")
    return {
        **_resource_step("serve"),
        "inputs": {"parameters": [{"name": "ref"}, {"name": "version"}]},
        # apply: create the InferenceService, or patch it; the new version annotation rolls out a new revision.
        "resource": {"action": "apply", "manifest": dump(manifest)},
    }
