"""Moved to :mod:`distml.model_names` (a leaf the pipeline's shape and ``distml k8s`` import without loading
``distml.train``); kept so that the training code's imports of it keep working."""

from distml.model_names import MODEL_NAMES, check_model_name

__all__ = ["MODEL_NAMES", "check_model_name"]
