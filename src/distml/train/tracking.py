"""Per-epoch metrics of a training job to MLflow and TensorBoard, from rank 0 only.

On other ranks the tracker does nothing, so the loop never branches on rank. Opening and closing the job's MLflow run
(and the tracking URI) live in :mod:`distml.tracking`, shared with the registry.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from distml.tracking import mlflow_client
from distml.train.dist import DistContext

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter


class RankTracker:
    """Per-epoch metrics to MLflow and TensorBoard from rank 0; a no-op elsewhere (or with no run id)."""

    def __init__(self, ctx: DistContext, *, uri: str | None, run_id: str | None, tensorboard_dir: Path) -> None:
        self.enabled = ctx.is_main
        self._client = mlflow_client(uri) if self.enabled and uri and run_id else None
        self._run_id = run_id
        self._tb: SummaryWriter | None = None
        if self.enabled:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(tensorboard_dir))

    def epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        if self._tb is None:  # not rank 0
            return
        if self._client is not None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self._client.log_batch(self._run_id, metrics=[Metric(k, float(v), now, epoch) for k, v in metrics.items()])
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
