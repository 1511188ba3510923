"""The model registry: MLflow's, in the same store as training (``<home>/mlflow.db`` or ``MLFLOW_TRACKING_URI``).

A registered model per dataset task (``fashion-mnist-classifier``). Registering an exported artifact logs its
folder to the training run's MLflow run (``model/<onnx sha256 prefix>``) and creates a version whose source is
that folder. The alias ``champion`` names the version to serve; promoting moves it there and points
``previous`` at the one it left. A registered-model tag keeps the order of champions, so ``rollback`` can walk
back more than one step. Every version stays resolvable: ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``.

Resolving downloads a version once into ``<home>/models/NAME/VERSION/`` and verifies ``model.onnx`` against the
hash in ``model.json`` every time it is opened. Nothing is unpickled: the graph is ONNX, the card is JSON.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distml.errors import NotFoundError, RegistryError
from distml.registry.artifact import CARD_FILE, ONNX_FILE, ModelArtifact, open_artifact
from distml.train import tracking
from distml.workspace import Workspace

CHAMPION = "champion"
PREVIOUS = "previous"
_HISTORY_TAG = "distml.champion_history"
_REF = re.compile(r"^models:/(?P<name>[A-Za-z0-9._-]+)(?:@(?P<alias>[A-Za-z0-9_-]+)|/(?P<version>\d+))$")


@dataclass(frozen=True)
class Version:
    name: str
    version: str
    aliases: list[str]
    run_id: str | None
    source: str
    tags: dict[str, str]

    @property
    def test_accuracy(self) -> float | None:
        value = self.tags.get("distml.test_accuracy")
        return float(value) if value else None


class Registry:
    """Registry operations against one tracking store."""

    def __init__(self, workspace: Workspace) -> None:
        self.workspace = workspace
        self.uri = tracking.tracking_uri(workspace.home)
        self.client = tracking.mlflow_client(self.uri)

    # -- writing -------------------------------------------------------------------------------------------
    def register(self, artifact: ModelArtifact, *, promote: bool = True) -> Version:
        """Add ``artifact`` as a new version of its model; make it champion unless ``promote`` is False."""
        card = artifact.card
        name = artifact.name
        run_id = card["lineage"].get("mlflow_run_id") or self._holding_run(card)
        sha = card["files"][ONNX_FILE]["sha256"]
        path = f"model/{sha[:16]}"
        self.client.log_artifacts(run_id, str(artifact.path), artifact_path=path)
        self._ensure_model(name, card)
        tags = {
            "distml.onnx_sha256": sha,
            "distml.parity": "passed" if card["parity"]["top1_agreement"] == 1.0 else "failed",
            "distml.parity_max_abs_diff": f"{card['parity']['max_abs_diff_probabilities']:.3e}",
            "distml.test_accuracy": str(card["metrics"].get("test_accuracy")),
            "distml.dataset_digest": card["lineage"]["dataset_digest"],
            "distml.training_run": card["lineage"]["training_run"],
        }
        mv = self.client.create_model_version(name, source=f"runs:/{run_id}/{path}", run_id=run_id, tags=tags)
        if promote:
            self.promote(name, str(mv.version))
        return self.version(name, str(mv.version))

    def promote(self, name: str, version: str) -> Version:
        """Move ``champion`` to ``version`` (which must have passed parity); ``previous`` to the old champion."""
        target = self.version(name, version)
        if target.tags.get("distml.parity") != "passed":
            raise RegistryError(f"{name} version {version} did not pass the ONNX parity check; it cannot be champion")
        current = self._alias(name, CHAMPION)
        if current is not None and current.version == target.version:
            return target
        self.client.set_registered_model_alias(name, CHAMPION, target.version)
        if current is not None:
            self.client.set_registered_model_alias(name, PREVIOUS, current.version)
        history = self._history(name)
        history.append(target.version)
        self.client.set_registered_model_tag(name, _HISTORY_TAG, json.dumps(history))
        return self.version(name, target.version)

    def rollback(self, name: str) -> Version:
        """Make the champion before the current one champion again."""
        history = self._history(name)
        current = self._alias(name, CHAMPION)
        if current is None:
            raise RegistryError(f"{name} has no champion to roll back from")
        while history and history[-1] == current.version:
            history.pop()
        if not history:
            raise RegistryError(f"{name} has no earlier champion than version {current.version}")
        back = history[-1]
        self.client.set_registered_model_alias(name, CHAMPION, back)
        if len(history) > 1:
            self.client.set_registered_model_alias(name, PREVIOUS, history[-2])
        else:
            self.client.delete_registered_model_alias(name, PREVIOUS)
        self.client.set_registered_model_tag(name, _HISTORY_TAG, json.dumps(history))
        return self.version(name, back)

    # -- reading -------------------------------------------------------------------------------------------
    def models(self) -> list[dict[str, Any]]:
        rows = []
        for rm in sorted(self.client.search_registered_models(), key=lambda m: m.name):
            champion = self._alias(rm.name, CHAMPION)
            versions = self.client.search_model_versions(f"name='{rm.name}'")
            rows.append(
                {
                    "name": rm.name,
                    "versions": len(versions),
                    "champion": champion.version if champion else None,
                    "champion_test_accuracy": champion.test_accuracy if champion else None,
                }
            )
        return rows

    def versions(self, name: str) -> list[Version]:
        self._require_model(name)
        found = self.client.search_model_versions(f"name='{name}'")
        # search_model_versions leaves the aliases out; get_model_version fills them in.
        full = (self._to_version(self.client.get_model_version(name, str(mv.version))) for mv in found)
        return sorted(full, key=lambda v: int(v.version))

    def version(self, name: str, version: str) -> Version:
        self._require_model(name)
        try:
            return self._to_version(self.client.get_model_version(name, version))
        except Exception:
            raise NotFoundError(f"{name} has no version {version}", hint=f"see 'distml models show {name}'") from None

    def lookup(self, ref: str) -> Version:
        """``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` -> the version it names."""
        match = _REF.match(ref)
        if not match:
            raise NotFoundError(f"{ref!r} is not a model reference", hint="use models:/NAME@ALIAS or models:/NAME/N")
        name = match["name"]
        if match["version"]:
            return self.version(name, match["version"])
        self._require_model(name)
        found = self._alias(name, match["alias"])
        if found is None:
            raise NotFoundError(f"{name} has no alias {match['alias']!r}", hint=f"see 'distml models show {name}'")
        return found

    def fetch(self, version: Version) -> ModelArtifact:
        """The version's artifact folder in the workspace cache (downloaded once), verified."""
        folder = self.workspace.home / "models" / version.name / version.version
        if not (folder / CARD_FILE).is_file():
            if not version.run_id or not version.source.startswith(f"runs:/{version.run_id}/"):
                raise RegistryError(
                    f"{version.name} version {version.version} has an unexpected source {version.source}"
                )
            path = version.source.removeprefix(f"runs:/{version.run_id}/")
            folder.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{version.version}.", dir=folder.parent))
            try:
                downloaded = Path(self.client.download_artifacts(version.run_id, path, str(tmp)))
                card = json.loads((downloaded / CARD_FILE).read_text())
                card["version"] = version.version
                (downloaded / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
                shutil.rmtree(folder, ignore_errors=True)
                downloaded.rename(folder)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return open_artifact(folder)

    # -- helpers -------------------------------------------------------------------------------------------
    def _holding_run(self, card: dict[str, Any]) -> str:
        """An MLflow run to hold an artifact whose training run was not tracked."""
        _, run_id = tracking.open_run(
            home=self.workspace.home,
            experiment=f"distml-{card['lineage']['dataset']}",
            run_name=f"register-{card['name']}",
            existing_id=None,
            params={},
            tags={"distml.kind": "registration"},
        )
        self.client.set_terminated(run_id)
        return run_id

    def _ensure_model(self, name: str, card: dict[str, Any]) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(
                name, description=f"distml image classifier for {card['lineage']['dataset']}"
            )
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise

    def _require_model(self, name: str) -> None:
        try:
            self.client.get_registered_model(name)
        except Exception:
            known = ", ".join(m.name for m in self.client.search_registered_models()) or "none yet"
            raise NotFoundError(f"no registered model {name!r}", hint=f"registered: {known}") from None

    def _alias(self, name: str, alias: str) -> Version | None:
        try:
            return self._to_version(self.client.get_model_version_by_alias(name, alias))
        except Exception:
            return None

    def _history(self, name: str) -> list[str]:
        tags = self.client.get_registered_model(name).tags
        try:
            return [str(v) for v in json.loads(tags.get(_HISTORY_TAG, "[]"))]
        except ValueError:
            return []

    @staticmethod
    def _to_version(mv: Any) -> Version:
        return Version(
            name=mv.name,
            version=str(mv.version),
            aliases=list(mv.aliases or []),
            run_id=mv.run_id,
            source=mv.source,
            tags=dict(mv.tags or {}),
        )


def resolve_model(ref: str | Path, workspace: Workspace) -> ModelArtifact:
    """A model from a folder path or a registry reference (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``)."""
    if str(ref).startswith("models:/"):
        registry = Registry(workspace)
        return registry.fetch(registry.lookup(str(ref)))
    return open_artifact(Path(ref))
