"""The training stage: synchronous data-parallel training (DDP) of one model under torchrun.

``distml train`` (:func:`train`) validates the request, writes ``<home>/runs/<name>/job.json`` and starts
W workers through torchrun; each worker (:mod:`distml.train.worker`) runs :func:`distml.train.loop.run`.
"""

from distml.train.launch import Rendezvous, TrainResult, train
from distml.train.models import MODELS, ModelSpec, build_model

__all__ = ["MODELS", "ModelSpec", "Rendezvous", "TrainResult", "build_model", "train"]
