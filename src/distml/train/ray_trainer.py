"""Ray Train's ``TorchTrainer`` without the parts that cost a distml job start-up time and serve it nothing.

Imported only when a job runs on Ray (it imports Ray Train at the top), by :mod:`distml.train.ray_launch`; the
workers import it too (the scaling policy travels by reference), and distml is installed on every node.

1. **The controller runs in the driver.** Ray Train starts its controller as one more actor, a process that
   imports Ray Train and torch again (~6 CPU-s, on the critical path: the worker group waited for it). A distml
   job has a driver process of its own that waits for the controller anyway and has Ray Train imported already,
   so the same controller runs there, on the same node Ray would have put it (the driver's). What the
   separate actor buys, a controller that outlives its driver, serves nothing here: a distml job ends with its
   driver, and Ray ends the job's actors with it.
2. **The autoscaling request.** Ray Train's fixed-size policy asks Ray Data's ``AutoscalingCoordinator`` (a
   detached actor it creates on first use) to reserve the job's resources, and waits up to 5 s for the answer. On
   the clusters distml runs on (a fixed set of nodes, or KubeRay with its autoscaler off) that request changes
   nothing; the first job on a fresh cluster waited the whole 5 s and printed a traceback ("Failed to send
   resource request") into distml's output. An autoscaling cluster still grows for the job: Ray's autoscaler
   reads the pending placement group itself.
3. **The placement-group cleaner.** A detached actor per job that polls the state API once a second to remove the
   job's placement group if the controller dies while the driver lives on: here they are one process, and Ray
   removes a job's placement groups when its driver ends. Without the dashboard it logged a warning a second.
4. **The datasets callback.** It starts a ``DatasetManager`` actor (one more process, ~3 CPU-s) for the Ray
   Datasets a trainer is given; distml's workers read the dataset store themselves and are given none.
5. **torch in the driver.** ``TorchTrainer``'s backend (``TorchConfig``) creates the process group from the
   driver, and its module imports torch there (~1.8 CPU-s of every job, in a process that never trains). Here
   the backend (:class:`TorchrunVariables`) only gives each rank torchrun's variables, and the ranks join the
   process group themselves as under torchrun (:func:`distml.train.dist.init_distributed`, whose store listens
   on the rank-0 node's address alone, where ``TorchConfig``'s listened on every interface).

The first four are private parts of Ray Train 2.60 (``TrainController``, ``WorkerGroup``,
``_create_default_callbacks``, ``_initialize_and_run_controller``), the fifth its developer API (``Backend``,
``BackendConfig``) and one internal helper (``get_address_and_port``): Ray is pinned exactly in the ``ray`` extra,
and tests/test_ray_train.py runs real jobs, restarts and failures through this class.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import ray
from ray.actor import ActorHandle
from ray.train import Result
from ray.train._internal.utils import get_address_and_port
from ray.train.backend import Backend, BackendConfig
from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
from ray.train.v2._internal.execution.context import TrainRunContext
from ray.train.v2._internal.execution.controller import TrainController
from ray.train.v2._internal.execution.scaling_policy import FixedScalingPolicy
from ray.train.v2._internal.execution.worker_group.worker import Worker
from ray.train.v2._internal.execution.worker_group.worker_group import WorkerGroup
from ray.train.v2._internal.util import TrainingFramework
from ray.train.v2.api.callback import RayTrainCallback
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer


class TorchrunVariables(BackendConfig):
    """A distml job's backend: each rank gets torchrun's variables, then joins the process group itself."""

    @property
    def backend_cls(self) -> type[Backend]:
        return _TorchrunVariablesBackend

    @property
    def framework(self) -> TrainingFramework:
        return TrainingFramework.TORCH  # what Ray's state API reports for the run


class _TorchrunVariablesBackend(Backend):
    # As Ray's torch backend: a node's ranks all see the node's GPUs given to the job, and pick one by local rank.
    share_cuda_visible_devices = True

    def on_start(self, worker_group: Any, backend_config: BackendConfig) -> None:
        """Rank 0's node address and a free port there, as MASTER_ADDR and MASTER_PORT of every rank."""
        addr, port = worker_group.execute_single(0, get_address_and_port)
        worker_group.execute(set_torchrun_variables, addr=addr, port=port)


def set_torchrun_variables(addr: str, port: int) -> None:
    """In a worker: the variables torchrun sets, from Ray Train's context (its ranks, numbered by node).

    It also imports torch, here in the worker's main thread, before Ray Train starts the thread that runs the
    training function: imported first in that thread, the same 2-worker job trained at ~4,300 img/s instead of
    ~6,200 (``bench/on_ray.py --only train``, three rounds each on the 2-core machine; the cause is not known).
    """
    import torch  # noqa: F401  (see above)

    context = ray.train.get_context()
    os.environ.update(
        {
            "MASTER_ADDR": addr,
            "MASTER_PORT": str(port),
            "RANK": str(context.get_world_rank()),
            "WORLD_SIZE": str(context.get_world_size()),
            "LOCAL_RANK": str(context.get_local_rank()),
            "LOCAL_WORLD_SIZE": str(context.get_local_world_size()),
            "NODE_RANK": str(context.get_node_rank()),
        }
    )


class FixedSizePolicy(FixedScalingPolicy):
    """Ray Train's fixed-size policy, minus the resource requests to Ray Data's autoscaling coordinator."""

    def after_controller_start(self, train_run_context: TrainRunContext) -> None:
        """Nothing to register: the job's placement group is its resource request."""

    def _maybe_send_resource_request(self) -> None:
        """Never sent (see the module's docstring)."""

    def _send_resource_request(self) -> None:
        """Never sent (see the module's docstring)."""


class DriverWorkerGroup(WorkerGroup):
    """Ray Train's worker group, driven from the driver process instead of a controller actor."""

    def _init_train_context_on_workers(
        self, workers: list[Worker], sync_actor: ActorHandle[Any], train_context_args: dict[str, list[Any]]
    ) -> None:
        # Ray's own method but for ``controller_actor``: Ray's passes the calling actor's handle, and a driver is no
        # actor. A worker uses it only in ray.train.get_all_reported_checkpoints(), which distml never calls.
        tasks = [
            worker.actor.init_train_context.remote(
                train_run_context=self._train_run_context,
                distributed_context=worker.distributed_context,
                synchronization_actor=sync_actor,
                storage_context=self._storage_context,
                worker_callbacks=self._worker_callbacks_to_propagate,
                controller_actor=None,
                **{arg: values[i] for arg, values in train_context_args.items()},
            )
            for i, worker in enumerate(workers)
        ]
        ray.get(tasks)
        self._decorate_worker_log_file_paths(workers)


class DriverController(TrainController):
    """Ray Train's controller, run in the driver process (see the module's docstring)."""

    worker_group_cls = DriverWorkerGroup


class DistmlTorchTrainer(DataParallelTrainer):
    """Ray Train's trainer for torch, with :class:`TorchrunVariables` as its backend, its controller in the driver,
    :class:`FixedSizePolicy`, no placement-group cleaner and no datasets callback."""

    def __init__(self, train_loop_per_worker: Any, **kwargs: Any) -> None:
        super().__init__(train_loop_per_worker, backend_config=TorchrunVariables(), **kwargs)

    def _create_default_callbacks(self) -> list[RayTrainCallback]:
        callbacks: list[RayTrainCallback] = super()._create_default_callbacks()
        unused: tuple[type, ...] = (PlacementGroupCleanerCallback,) + (() if self.datasets else (DatasetsCallback,))
        return [cb for cb in callbacks if not isinstance(cb, unused)]

    def _initialize_and_run_controller(self, **controller_init_kwargs: Any) -> Result:
        built = controller_init_kwargs["scaling_policy"]  # Ray's own, from this trainer's ScalingConfig
        controller_init_kwargs["scaling_policy"] = FixedSizePolicy(built.scaling_config)
        controller = DriverController(**controller_init_kwargs)
        try:
            asyncio.run(controller.run())  # type: ignore[no-untyped-call]
        except BaseException:
            # Interrupted (Ctrl-C, or SIGTERM turned into KeyboardInterrupt by a candidate's process): stop the
            # workers now rather than when Ray notices that the driver has gone.
            group = controller._worker_group
            if group is not None and group.has_started():
                group.abort()  # type: ignore[no-untyped-call]
            raise
        return controller.get_result()
