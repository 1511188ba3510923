"""The model names ``distml train --model`` accepts, in a leaf module that imports nothing of distml's stages.

The pipeline's shape (and so ``distml k8s render``) checks candidate names with it without loading
``distml.train``; :mod:`distml.train.models` holds the builders and checks at import that the two lists agree.
"""

from __future__ import annotations

from distml.errors import UsageError

MODEL_NAMES = ("cnn", "cnn-dropout", "cnn-batchnorm", "resnet", "resnet-small", "resnet-fast")


def check_model_name(name: str) -> str:
    if name not in MODEL_NAMES:
        raise UsageError(f"unknown model {name!r}", hint=f"choose one of {', '.join(MODEL_NAMES)}")
    return name
