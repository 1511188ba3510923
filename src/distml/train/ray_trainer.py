"""Ray Train's ``TorchTrainer`` without the two helpers that cost a distml job start-up time and serve it nothing.

Imported only when a job runs on Ray (it imports Ray Train at the top), by :mod:`distml.train.ray_launch` and,
through pickling, by Ray Train's controller: the scaling policy below travels to the controller by reference, so
every node imports this module (distml is installed on every node).

1. **The autoscaling request.** Ray Train's fixed-size policy asks Ray Data's ``AutoscalingCoordinator`` (a
   detached actor it creates on first use, importing Ray Data) to reserve the job's resources, and waits up to 5 s
   for the answer. On the clusters distml runs on (a fixed set of nodes, or KubeRay with its autoscaler off) that
   request changes nothing; the first job on a fresh cluster waited the whole 5 s while the actor started and
   printed a traceback ("Failed to send resource request") into distml's output. An autoscaling cluster still
   grows for the job: Ray's autoscaler reads the pending placement group itself.
2. **The placement-group cleaner.** Each job starts a detached ``PlacementGroupCleaner`` actor (one more Python
   process that imports Ray Train) that asks the state API once a second whether the controller is alive, to
   remove the job's placement group if the controller dies while the driver lives on. distml's driver is one
   process per job that ends when the controller does, and Ray removes a job's placement groups when its driver
   ends; without the dashboard's state API the cleaner logged a warning every second into distml's output.

Both are private hooks of Ray Train (``_create_default_callbacks``, ``_initialize_and_run_controller``): Ray is
pinned exactly in the ``ray`` extra, and tests/test_ray_train.py runs real jobs through this class.
"""

from __future__ import annotations

from typing import Any

from ray.train import Result
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
from ray.train.v2._internal.execution.context import TrainRunContext
from ray.train.v2._internal.execution.scaling_policy import FixedScalingPolicy
from ray.train.v2.api.callback import RayTrainCallback
from ray.train.v2.torch.torch_trainer import TorchTrainer


class FixedSizePolicy(FixedScalingPolicy):
    """Ray Train's fixed-size policy, minus the resource requests to Ray Data's autoscaling coordinator."""

    def after_controller_start(self, train_run_context: TrainRunContext) -> None:
        """Nothing to register: the job's placement group is its resource request."""

    def _maybe_send_resource_request(self) -> None:
        """Never sent (see the module's docstring)."""

    def _send_resource_request(self) -> None:
        """Never sent (see the module's docstring)."""


class DistmlTorchTrainer(TorchTrainer):
    """``TorchTrainer`` with :class:`FixedSizePolicy` and no placement-group cleaner actor."""

    def _create_default_callbacks(self) -> list[RayTrainCallback]:
        callbacks: list[RayTrainCallback] = super()._create_default_callbacks()
        return [cb for cb in callbacks if not isinstance(cb, PlacementGroupCleanerCallback)]

    def _initialize_and_run_controller(self, **controller_init_kwargs: Any) -> Result:
        built = controller_init_kwargs["scaling_policy"]  # Ray's own, from this trainer's ScalingConfig
        controller_init_kwargs["scaling_policy"] = FixedSizePolicy(built.scaling_config)
        return super()._initialize_and_run_controller(**controller_init_kwargs)
