"""The training stage: synchronous data-parallel training (DDP) of one model under torchrun.

``distml train`` (:func:`train`) validates the request, writes ``<home>/runs/<name>/job.json`` and starts
W workers through torchrun; each worker (:mod:`distml.train.worker`) runs :func:`distml.train.loop.run`.

The names below are loaded on first use, so that importing a light submodule (``distml.train.model_names``, for
example) does not import torch: about 1 s of every such command's start-up.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from distml.train.launch import Rendezvous, TrainResult, train
    from distml.train.models import MODELS, ModelSpec, build_model

__all__ = ["MODELS", "ModelSpec", "Rendezvous", "TrainResult", "build_model", "train"]
_FROM = {"Rendezvous": "launch", "TrainResult": "launch", "train": "launch",
         "MODELS": "models", "ModelSpec": "models", "build_model": "models"}  # fmt: skip


def __getattr__(name: str) -> Any:
    if name in _FROM:
        import importlib

        return getattr(importlib.import_module(f"distml.train.{_FROM[name]}"), name)
    raise AttributeError(f"module 'distml.train' has no attribute {name!r}")
