"""The CPUs and GPUs that concurrent training jobs share: this host's, or a Ray cluster's.

The candidate scheduler (:mod:`distml.train.candidates`), the tuner's executor (:mod:`distml.search.executor`) and
the pipeline runner size and start jobs within a :class:`Resources`. Locally that is the cores this process may
run on and the visible GPUs; with ``[cluster] engine = "ray"`` it is the sum over the cluster's alive nodes
(``cluster.nodes()``), and the largest node's CPUs bound one worker, since Ray places each worker on one node.
Only the counting differs: the jobs, their run folders and their results are the same.
"""

from __future__ import annotations

from dataclasses import dataclass

from distml.config import ClusterConfig
from distml.errors import UsageError
from distml.train.dist import gpu_count, usable_cores


@dataclass(frozen=True)
class Resources:
    """What concurrent jobs share: this host's cores and GPUs, or a Ray cluster's CPUs and GPUs (all nodes')."""

    cores: int
    gpus: int
    node_cores: int | None = None  # the most CPUs one worker can hold: the largest Ray node's (None: this host)
    cluster: ClusterConfig | None = None  # the Ray cluster the jobs' workers run on; None: this host
    nodes: int = 1

    @property
    def where(self) -> str:
        """How messages name the place: ``here``, or ``on the Ray cluster``."""
        return "on the Ray cluster" if self.cluster is not None else "here"

    def describe(self) -> str:
        """``2 cores`` / ``1 GPU(s)`` here, ``2 CPUs, 0 GPUs on 2 Ray nodes at 127.0.0.1:6379`` on a cluster."""
        if self.cluster is None:
            return f"{self.gpus} GPU(s)" if self.gpus else f"{self.cores} cores"
        return f"{self.cores} CPUs, {self.gpus} GPUs on {self.nodes} Ray node(s) at {self.cluster.address or 'auto'}"


def on_ray(cluster: ClusterConfig | None) -> bool:
    """Whether ``cluster`` sends the jobs' workers to a Ray cluster (not this host's torchrun)."""
    return cluster is not None and cluster.engine == "ray"


def count_resources(cluster: ClusterConfig | None = None) -> Resources:
    """The cores and GPUs the jobs may share: this host's, or (``cluster.engine == "ray"``) the Ray cluster's.

    On Ray this connects to the cluster (a one-line ClusterError when it cannot) and adds up its alive nodes'
    CPUs and GPUs; the largest node's CPUs bound one worker's threads, since a worker runs on one node.
    """
    if cluster is None or not on_ray(cluster):
        return Resources(usable_cores(), gpu_count())
    from distml.cluster import connect, nodes  # only a Ray cluster needs it

    address = cluster.address or "auto"
    connect(address)
    alive = nodes()
    cores = int(sum(n.cpus for n in alive))
    if cores < 1:
        raise UsageError(f"the Ray cluster at {address} has no CPUs", hint="start its nodes with --num-cpus 1 or more")
    return Resources(
        cores,
        int(sum(n.gpus for n in alive)),
        node_cores=max(int(n.cpus) for n in alive),
        cluster=cluster,
        nodes=len(alive),
    )
