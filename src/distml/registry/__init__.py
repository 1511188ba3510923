"""The registry stage: export a trained run to ONNX (with a parity check), register it, resolve it.

- :mod:`distml.registry.artifact`: opening and verifying an artifact folder (all that serving needs).
- :mod:`distml.registry.export`: a finished run -> a model artifact folder (``model.onnx`` + ``model.json``).
- :mod:`distml.registry.registry`: MLflow model registry, the ``champion`` alias, ``models:/NAME@ALIAS``.

The names below are loaded from their submodule on first use. Code inside ``distml`` imports the submodule
itself, so that the server, which reads artifacts, loads neither the exporter (the training stage, torch) nor
MLflow.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from distml.registry.artifact import ModelArtifact, open_artifact
    from distml.registry.export import export_run, find_run
    from distml.registry.registry import CHAMPION, Registry, Version, resolve_model

__all__ = [
    "CHAMPION",
    "ModelArtifact",
    "Registry",
    "Version",
    "export_run",
    "find_run",
    "open_artifact",
    "resolve_model",
]
_FROM = {
    "ModelArtifact": "artifact",
    "open_artifact": "artifact",
    "export_run": "export",
    "find_run": "export",
    "CHAMPION": "registry",
    "Registry": "registry",
    "Version": "registry",
    "resolve_model": "registry",
}


def __getattr__(name: str) -> object:
    """A public name, imported from its submodule when first asked for."""
    if name not in _FROM:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_FROM[name]}"), name)
