"""The training stage: synchronous data-parallel training (DDP) of one model under torchrun.

``distml train`` (:func:`train`) validates the request, writes ``<home>/runs/<name>/job.json`` and starts
W workers through torchrun; each worker (:mod:`distml.train.worker`) runs :func:`distml.train.loop.run`.

The names below are loaded from their submodule on first use, so that importing a light submodule
(``distml.train.job``, for example) does not import torch: about 1 s of every such command's start-up.
Code inside ``distml`` imports the submodule itself, which also keeps a pipeline step's code version
(:mod:`distml.pipeline.codever`) to the modules the step really uses.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from distml.train.launch import Rendezvous, TrainResult, train
    from distml.train.models import MODELS, ModelSpec, build_model

__all__ = ["MODELS", "ModelSpec", "Rendezvous", "TrainResult", "build_model", "train"]
_FROM = {
    "Rendezvous": "launch",
    "TrainResult": "launch",
    "train": "launch",
    "MODELS": "models",
    "ModelSpec": "models",
    "build_model": "models",
}


def __getattr__(name: str) -> object:
    """A public name, imported from its submodule when first asked for."""
    if name not in _FROM:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_FROM[name]}"), name)
