"""Per-step and per-epoch metrics of a training job to TensorBoard, from rank 0 only.

On other ranks the tracker does nothing, so the loop never branches on rank. MLflow gets the per-epoch metrics from
the launcher, which reads the ``history.json`` rank 0 writes (:class:`distml.train.job_run.JobTracking`): no
worker imports MLflow or opens its store.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from distml.train.dist import DistContext

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter


class RankTracker:
    """Per-step and per-epoch metrics to TensorBoard from rank 0; a no-op elsewhere."""

    def __init__(self, ctx: DistContext, *, tensorboard_dir: Path) -> None:
        self.enabled = ctx.is_main
        self._tb: SummaryWriter | None = None
        if self.enabled:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(tensorboard_dir))

    def epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        if self._tb is None:  # not rank 0
            return
        for key, value in metrics.items():
            self._tb.add_scalar(key, value, epoch)
        self._tb.flush()

    def step(self, step: int, loss: float, lr: float) -> None:
        if self._tb is not None:
            self._tb.add_scalar("step/loss", loss, step)
            self._tb.add_scalar("step/lr", lr, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
