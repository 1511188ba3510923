"""The registry stage: export a trained run to ONNX (with a parity check), register it, resolve it.

- :mod:`distml.registry.export`: a finished run -> a model artifact folder (``model.onnx`` + ``model.json``).
- :mod:`distml.registry.registry`: MLflow model registry, the ``champion`` alias, ``models:/NAME@ALIAS``.
- :mod:`distml.registry.artifact`: opening and verifying an artifact folder.
"""

from distml.registry.artifact import ModelArtifact, open_artifact
from distml.registry.export import Parity, export_run, find_run, model_name_for
from distml.registry.registry import CHAMPION, Registry, Version, resolve_model

__all__ = [
    "CHAMPION",
    "ModelArtifact",
    "Parity",
    "Registry",
    "Version",
    "export_run",
    "find_run",
    "model_name_for",
    "open_artifact",
    "resolve_model",
]
