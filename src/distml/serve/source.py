"""Where a served model comes from: a folder, or a registry reference the server may follow.

``distml serve models:/NAME@ALIAS`` resolves (and verifies) the alias once before the server starts; the server
keeps the reference so that it can follow the alias when it moves (a hot swap, see :mod:`distml.serve.app`). A
folder, or a pinned ``models:/NAME/VERSION``, is served as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelSource:
    """The verified folder served at start, and the registry reference and workspace it was resolved from."""

    path: Path
    ref: str | None = None  # models:/NAME@ALIAS or models:/NAME/VERSION; None for a folder
    workspace: Path | None = None  # the workspace whose registry ``ref`` names

    @property
    def alias(self) -> str | None:
        """The alias the reference follows (``champion`` in ``models:/NAME@champion``), None when it has none."""
        if self.ref is None or "@" not in self.ref:
            return None
        return self.ref.rsplit("@", 1)[1]


def resolve_source(ref: str | Path, workspace: Path) -> ModelSource:
    """Resolve ``ref`` (a folder or a ``models:/`` reference) and verify it, as ``distml serve`` does at start."""
    from distml.registry.registry import resolve_model
    from distml.workspace import Workspace

    artifact = resolve_model(ref, Workspace(workspace))
    if str(ref).startswith("models:/"):
        return ModelSource(artifact.path, str(ref), workspace)
    return ModelSource(artifact.path)
