"""A candidate's training job: a Kubeflow ``TrainJob`` (Trainer v2) or ``PyTorchJob`` (training operator v1).

Either way each pod runs ``distml train`` (the same command as on a laptop) as one torchrun agent with
``procs`` workers; with several pods the agents meet at the first pod over torchrun's c10d rendezvous, from the
variables the operator sets. The workflow waits on the job's status with the conditions below.
"""

from __future__ import annotations

from typing import Any

from distml.k8s.core import Obj, config_mount_path
from distml.k8s.plan import CONTAINER_SECURITY, DISTML_RUNTIME, POD_SECURITY, Candidate, Plan

# The operator's variables for the pod's place in the job (expanded by the kubelet in ``args``):
# Trainer v2's torch runtime sets torchrun's PET_* names; the v1 PyTorchJob sets MASTER_* and RANK (the pod).
_RENDEZVOUS = {
    "trainjob": ("$(PET_NODE_RANK)", "$(PET_MASTER_ADDR):$(PET_MASTER_PORT)"),
    "pytorchjob": ("$(RANK)", "$(MASTER_ADDR):$(MASTER_PORT)"),
}
# The torch-distributed runtime's job and container for the trainer nodes (podSpecOverrides target them).
TRAINJOB_NODE = "node"
# The label each operator puts on every pod of a job, with the job's name as its value (a TrainJob's pods are
# its JobSet's, named after it): what a job's NetworkPolicy selects its own pods by.
JOB_LABEL = {"trainjob": "jobset.sigs.k8s.io/jobset-name", "pytorchjob": "training.kubeflow.org/job-name"}

# Argo's resource step polls the job and ends on these (label-selector syntax over the job's JSON).
CONDITIONS = {
    # JobSet status of the runtime's one replicated job (the trainer nodes): succeeded/failed count its Jobs.
    "trainjob": ("status.jobsStatus.0.succeeded > 0", "status.jobsStatus.0.failed > 0"),
    # Pods restart Never, so a failed worker shows as failed (OnFailure restarts it in place until the operator
    # gives up and deletes the pods, and the counts never move). Failure requirements are OR-ed by Argo.
    "pytorchjob": (
        "status.replicaStatuses.Master.succeeded > 0",
        "status.replicaStatuses.Master.failed > 0, status.replicaStatuses.Worker.failed > 0",
    ),
}


def train_args(plan: Plan, cand: Candidate, dataset: str, run_name: str) -> list[str]:
    """``distml train`` for one pod of the candidate's job (``dataset``, ``run_name``: Argo parameters)."""
    args = ["--config", config_mount_path(cand.config_file), "train", "--dataset", dataset,
            "--run-name", run_name, "--workers", str(cand.procs)]  # fmt: skip
    if cand.nodes > 1:
        rank, endpoint = _RENDEZVOUS[plan.k8s.training]
        args += ["--nnodes", str(cand.nodes), "--node-rank", rank, "--rdzv-endpoint", endpoint]
    return args


def _resources(plan: Plan, cand: Candidate) -> Obj:
    k = plan.k8s
    cpu = str(k.cpu_per_worker * cand.procs)
    memory = _times(k.memory_per_worker, cand.procs)
    res: Obj = {"requests": {"cpu": cpu, "memory": memory}, "limits": {"cpu": cpu, "memory": memory}}
    if k.gpus_per_node:
        res["limits"]["nvidia.com/gpu"] = str(k.gpus_per_node)
    return res


def _times(quantity: str, n: int) -> str:
    digits = quantity.rstrip("KMGTi")
    return f"{int(digits) * n}{quantity[len(digits) :]}"


def _labels(plan: Plan, cand: Candidate) -> dict[str, str]:
    return {**plan.labels("train"), "distml.io/candidate": cand.label}


def train_job(plan: Plan, cand: Candidate, dataset: str, run_name: str) -> Obj:
    """The job manifest for ``cand`` (``run_name`` doubles as the job's name)."""
    if plan.k8s.training == "trainjob":
        return _trainjob(plan, cand, dataset, run_name)
    return _pytorchjob(plan, cand, dataset, run_name)


def _trainjob(plan: Plan, cand: Candidate, dataset: str, run_name: str) -> Obj:
    trainer: Obj = {
        "image": plan.k8s.image,
        "command": ["distml"],
        "args": train_args(plan, cand, dataset, run_name),
        "numNodes": cand.nodes,
        "numProcPerNode": cand.procs,
        "env": plan.env(),
        "resourcesPerNode": _resources(plan, cand),
    }
    override = {
        "targetJobs": [{"name": TRAINJOB_NODE}],
        "serviceAccountName": "distml-train",
        "volumes": [*plan.volumes(), _shm()],
        "containers": [{"name": TRAINJOB_NODE, "volumeMounts": [*plan.mounts(), _shm_mount()]}],
    }
    return {
        "apiVersion": "trainer.kubeflow.org/v1alpha1",
        "kind": "TrainJob",
        "metadata": {"name": run_name, "namespace": plan.namespace, "labels": _labels(plan, cand)},
        "spec": {
            "runtimeRef": {"name": plan.k8s.runtime},
            "trainer": trainer,
            "podSpecOverrides": [override],
        },
    }


def training_runtime(plan: Plan) -> Obj:
    """The ClusterTrainingRuntime the TrainJobs run on: upstream's ``torch-distributed``, with restricted pods.

    A TrainJob cannot set its pods' security context (``podSpecOverrides`` has no such field), and the upstream
    runtime sets none, so its pods would be refused by a restricted namespace; this runtime sets it, and labels
    the pods as distml's training pods (what the namespace's NetworkPolicies select). Cluster-scoped: one per
    cluster, the same for every namespace (the image is the TrainJob's to override).
    """
    pod = {
        "metadata": {"labels": plan.labels("train")},
        "spec": {
            "securityContext": POD_SECURITY,
            "automountServiceAccountToken": False,
            "containers": [{"name": TRAINJOB_NODE, "image": plan.k8s.image, "securityContext": CONTAINER_SECURITY}],
        },
    }
    node = {
        "name": TRAINJOB_NODE,
        # Trainer finds the replicated job that runs the trainer by this label (and by its name in older releases).
        "template": {
            "metadata": {"labels": {"trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}},
            "spec": {"template": pod},
        },
    }
    return {
        "apiVersion": "trainer.kubeflow.org/v1alpha1",
        "kind": "ClusterTrainingRuntime",
        "metadata": {"name": DISTML_RUNTIME, "labels": plan.labels("train")},
        "spec": {
            "mlPolicy": {"numNodes": 1, "torch": {"numProcPerNode": "auto"}},
            "template": {"spec": {"replicatedJobs": [node]}},
        },
    }


def _pytorchjob(plan: Plan, cand: Candidate, dataset: str, run_name: str) -> Obj:
    def replica(count: int) -> Obj:
        container = {
            "name": "pytorch",  # the training operator finds the trainer container by this name
            "image": plan.k8s.image,
            "command": ["distml"],
            "args": train_args(plan, cand, dataset, run_name),
            "env": plan.env(),
            "resources": _resources(plan, cand),
            "volumeMounts": [*plan.mounts(), _shm_mount()],
            "securityContext": CONTAINER_SECURITY,
        }
        pod = {
            "serviceAccountName": "distml-train",
            "automountServiceAccountToken": False,
            "securityContext": POD_SECURITY,
            "containers": [container],
            "volumes": [*plan.volumes(), _shm()],
        }
        return {
            "replicas": count,
            "restartPolicy": "Never",
            "template": {"metadata": {"labels": _labels(plan, cand)}, "spec": pod},
        }

    replicas: dict[str, Any] = {"Master": replica(1)}
    if cand.nodes > 1:
        replicas["Worker"] = replica(cand.nodes - 1)
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": run_name, "namespace": plan.namespace, "labels": _labels(plan, cand)},
        "spec": {
            "nprocPerNode": str(cand.procs),
            "runPolicy": {"cleanPodPolicy": "None"},
            "pytorchReplicaSpecs": replicas,
        },
    }


def _shm() -> Obj:
    # DDP workers on one pod exchange gradients through shared memory; the container default (64 MiB) is small.
    return {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}}


def _shm_mount() -> Obj:
    return {"name": "dshm", "mountPath": "/dev/shm"}  # noqa: S108 (the pod's shared memory, not a temp file)
