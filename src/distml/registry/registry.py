"""The model registry: MLflow's, in the same store as training (``<home>/mlflow.db`` or ``MLFLOW_TRACKING_URI``).

A registered model per dataset task (``fashion-mnist-classifier``). Registering an exported artifact logs its
folder to the training run's MLflow run (``model/<onnx sha256 prefix>``) and creates a version whose source is
that folder; the version's own tags record the sha256 of ``model.onnx`` and of ``model.json`` and whether the
export passed the ONNX parity check. The alias ``champion`` names the version to serve; promoting moves it there
and points ``previous`` at the one it left. A registered-model tag keeps the order of champions, so ``rollback``
can walk back more than one step. Every version stays resolvable: ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``.

Only a version that passed parity becomes champion, whichever command moves the alias (promote, rollback,
register, the pipeline's register step). The two aliases cannot be set in one MLflow call, so a move is first
recorded as one registered-model tag (a single write) and then applied; readers see the recorded pair, and the
next move finishes one that a crash interrupted.

Resolving downloads a version once into ``<home>/models/NAME/VERSION/`` (into a temp folder renamed into place,
so processes fetching at once never see half a copy) and checks it against the version's recorded hashes every
time it is opened: an artifact changed in the store after registration is refused, whatever its folder's own
``model.json`` says. Nothing is unpickled: the graph is ONNX, the card is JSON.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

from distml import tracking
from distml.card import CARD_FILE, ONNX_FILE, ModelCard
from distml.errors import DistmlError, ModelError, NotFoundError, RegistryError
from distml.files import sha256_file, write_atomic
from distml.registry.artifact import ModelArtifact, open_artifact
from distml.text import clip
from distml.workspace import Workspace

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion, RegisteredModel

CHAMPION = "champion"
PREVIOUS = "previous"
ONNX_SHA_TAG = "distml.onnx_sha256"
CARD_SHA_TAG = "distml.card_sha256"
PARITY_TAG = "distml.parity"
_HISTORY_TAG = "distml.champion_history"
_MOVE_TAG = "distml.champion_move"  # a champion/previous move recorded before its alias writes
_REF = re.compile(r"^models:/(?P<name>[A-Za-z0-9._-]+)(?:@(?P<alias>[A-Za-z0-9_-]+)|/(?P<version>\d+))$")


class ModelRow(TypedDict):
    """One registered model as :meth:`Registry.models` lists it."""

    name: str
    versions: int
    champion: str | None
    champion_test_accuracy: float | None


# A champion move as recorded before its alias writes ("from" is the champion it moves away from).
_Move = TypedDict("_Move", {"champion": str, "previous": str | None, "history": list[str], "from": str | None})


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

    @property
    def label(self) -> str:
        return f"{self.name} version {self.version}"


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
        run_id = card.lineage.mlflow_run_id or self._holding_run(card)
        sha = card.onnx_sha256  # open_artifact checked it against the file
        path = f"model/{sha[:16]}"
        self.client.log_artifacts(run_id, str(artifact.path), artifact_path=path)
        self._ensure_model(name, card)
        tags = {
            # What resolving checks the stored copy against, whatever that copy's own model.json says.
            ONNX_SHA_TAG: sha,
            CARD_SHA_TAG: card.digest(),
            PARITY_TAG: "passed" if card.parity.ok else "failed",
            "distml.parity_max_abs_diff": f"{card.parity.max_abs_diff_probabilities:.3e}",
            "distml.test_accuracy": str(card.metrics.test_accuracy),
            "distml.dataset_digest": card.lineage.dataset_digest,
            "distml.training_run": card.lineage.training_run,
        }
        mv = self.client.create_model_version(name, source=f"runs:/{run_id}/{path}", run_id=run_id, tags=tags)
        if promote:
            self.promote(name, str(mv.version))
        return self.version(name, str(mv.version))

    def promote(self, name: str, version: str) -> Version:
        """Move ``champion`` to ``version`` (which must have passed parity); ``previous`` to the old champion."""
        target = self.version(name, version)
        refusal = _parity_refusal(target)
        if refusal:
            raise RegistryError(f"{refusal}; it cannot be champion")
        self._finish_move(name)
        current = self._alias(name, CHAMPION)
        if current is not None and current.version == target.version:
            return target
        history = self._history(name)
        if not history or history[-1] != target.version:
            history.append(target.version)
        was = current.version if current is not None else None
        self._move(name, champion=target.version, previous=was, history=history, was=was)
        return self.version(name, target.version)

    def rollback(self, name: str) -> Version:
        """Make the champion before the current one champion again (it must have passed parity too)."""
        self._require_model(name)
        self._finish_move(name)
        history = self._history(name)
        current = self._alias(name, CHAMPION)
        if current is None:
            raise RegistryError(f"{name} has no champion to roll back from")
        while history and history[-1] == current.version:
            history.pop()
        if not history:
            raise RegistryError(f"{name} has no earlier champion than version {current.version}")
        back = self.version(name, history[-1])
        refusal = _parity_refusal(back)
        if refusal:
            raise RegistryError(f"cannot roll back: {refusal}; it cannot be champion again")
        previous = history[-2] if len(history) > 1 else None
        self._move(name, champion=back.version, previous=previous, history=history, was=current.version)
        return self.version(name, back.version)

    # -- reading -------------------------------------------------------------------------------------------
    def models(self) -> list[ModelRow]:
        """Every registered model with its version count and champion."""
        rows: list[ModelRow] = []
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
        """Every version of ``name``, oldest first."""
        aliases = _aliases(self._require_model(name))
        found = self.client.search_model_versions(f"name='{name}'")
        return sorted((_to_version(mv, aliases) for mv in found), key=lambda v: int(v.version))

    def version(self, name: str, version: str) -> Version:
        """One version of ``name``."""
        aliases = _aliases(self._require_model(name))
        try:
            return _to_version(self.client.get_model_version(name, version), aliases)
        except Exception:
            raise NotFoundError(
                f"{name} has no version {clip(version, quote=False)}", hint=f"see 'distml models show {name}'"
            ) from None

    def lookup(self, ref: str) -> Version:
        """``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` -> the version it names."""
        match = _REF.match(ref)
        if not match:
            raise NotFoundError(
                f"{clip(ref)} is not a model reference", hint="use models:/NAME@ALIAS or models:/NAME/N"
            )
        name = match["name"]
        if match["version"]:
            return self.version(name, match["version"])
        found = _aliases(self._require_model(name)).get(match["alias"])
        if found is None:
            raise NotFoundError(f"{name} has no alias {clip(match['alias'])}", hint=f"see 'distml models show {name}'")
        return self.version(name, found)

    def resolve(self, ref: str) -> ModelArtifact:
        """The artifact ``ref`` names, fetched and verified, from a version that passed the ONNX parity check.

        What ``serve``, ``predict`` and ``evaluate`` load: the check runs here, before anything starts.
        """
        version = self.lookup(ref)
        refusal = _parity_refusal(version)
        if refusal:
            raise ModelError(f"{refusal}; refusing to load it")
        artifact = self.fetch(version)
        if not artifact.card.parity.ok:
            raise ModelError(f"{version.label}: its model card records a failed ONNX parity check; refusing to load it")
        return artifact

    def fetch(self, version: Version) -> ModelArtifact:
        """The version's artifact folder in the workspace cache (downloaded once), verified against the registry.

        ``model.onnx`` must have the sha256 the version recorded when it was registered (and ``model.json`` the
        card's), not only the hash in its own folder's card. A local copy that fails is fetched again; a copy in
        the registry's store that fails is refused (:class:`ModelError` naming the version). Safe when several
        processes fetch at once: each downloads into a temp folder and renames it into place, and one that loses
        that race uses the winner's copy.
        """
        _recorded_sha(version)  # before touching any local copy: without it nothing can be verified
        folder = self.workspace.home / "models" / version.name / version.version
        for _ in range(3):  # each round returns, or replaces a bad local copy; more means something keeps breaking it
            if folder.exists():
                try:
                    return self._verified(version, folder, where=f"the local copy {folder}")
                except DistmlError:
                    _move_aside(folder)  # damaged or altered: a fresh download replaces it below
            tmp, downloaded = self._download(version, folder.parent)
            try:
                _publish(downloaded, folder)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return self._verified(version, folder, where=f"the local copy {folder}")

    # -- helpers -------------------------------------------------------------------------------------------
    def _download(self, version: Version, parent: Path) -> tuple[Path, Path]:
        """Download the version into a new temp folder under ``parent`` and verify it: (temp folder, artifact)."""
        if not version.run_id or not version.source.startswith(f"runs:/{version.run_id}/"):
            raise RegistryError(f"{version.label} has an unexpected source {version.source}")
        path = version.source.removeprefix(f"runs:/{version.run_id}/")
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{version.version}.", dir=parent))
        try:
            try:
                downloaded = Path(self.client.download_artifacts(version.run_id, path, str(tmp)))
            except Exception as exc:  # MLflow raises its own types, or OSError from a file store
                first = (str(exc).splitlines() or [type(exc).__name__])[0]
                raise ModelError(f"{version.label}: cannot download {version.source}: {first[:200]}") from None
            card_file = downloaded / CARD_FILE
            try:
                card = ModelCard.read(card_file).model_copy(update={"version": version.version})
                write_atomic(card_file, card.dumps().encode())
            except DistmlError:
                pass  # no valid card: the check below says so
            self._verified(version, downloaded, where="the registry's artifact store")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return tmp, downloaded

    @staticmethod
    def _verified(version: Version, folder: Path, *, where: str) -> ModelArtifact:
        """Open ``folder`` if it holds exactly what ``version`` registered (its recorded hashes), else refuse."""
        expected = _recorded_sha(version)
        refuse = "refusing to load it (changed after registration: promote another version or register it again)"
        onnx = folder / ONNX_FILE
        actual = sha256_file(onnx) if onnx.is_file() else None
        if actual != expected:
            found = f"has sha256 {actual[:12]}" if actual else "is missing"
            raise ModelError(
                f"{version.label}: {ONNX_FILE} in {where} {found}, the registry recorded {expected[:12]}; {refuse}"
            )
        try:
            artifact = open_artifact(folder)
        except DistmlError as exc:
            raise ModelError(f"{version.label}: {where} is not a valid artifact: {exc.message}") from None
        recorded = version.tags.get(CARD_SHA_TAG)  # absent on versions registered before it was recorded
        if recorded and artifact.card.digest() != recorded:
            raise ModelError(f"{version.label}: {CARD_FILE} in {where} is not the card registered; {refuse}")
        return artifact

    def _move(self, name: str, *, champion: str, previous: str | None, history: list[str], was: str | None) -> None:
        """Point ``champion`` and ``previous`` at a new pair, so that a crash at any point leaves a consistent pair.

        The move is recorded first, in one tag write; readers (:func:`_aliases`) see the recorded pair from then
        on, and the next promote or rollback finishes a move that was cut short (:meth:`_finish_move`).
        """
        move: _Move = {"champion": champion, "previous": previous, "history": history, "from": was}
        self.client.set_registered_model_tag(name, _MOVE_TAG, json.dumps(move))
        self._apply(name, move)

    def _apply(self, name: str, move: _Move) -> None:
        # previous before champion: MLflow's own readers, who do not know the recorded move, then see the old
        # champion until the very last alias write instead of a new champion with a stale previous.
        if move["previous"] is None:
            self.client.delete_registered_model_alias(name, PREVIOUS)
        else:
            self.client.set_registered_model_alias(name, PREVIOUS, move["previous"])
        self.client.set_registered_model_alias(name, CHAMPION, move["champion"])
        self.client.set_registered_model_tag(name, _HISTORY_TAG, json.dumps(move["history"]))
        self.client.delete_registered_model_tag(name, _MOVE_TAG)

    def _finish_move(self, name: str) -> None:
        """Complete a move that a crash interrupted, or forget it if the alias was moved by other means since."""
        rm = self.client.get_registered_model(name)
        move = _recorded_move(rm)
        if move is None:
            if _MOVE_TAG in (rm.tags or {}):
                self.client.delete_registered_model_tag(name, _MOVE_TAG)
            return
        self._apply(name, move)

    def _holding_run(self, card: ModelCard) -> str:
        """An MLflow run to hold an artifact whose training run was not tracked."""
        _, run_id = tracking.open_run(
            home=self.workspace.home,
            experiment=f"distml-{card.lineage.dataset}",
            run_name=f"register-{card.name}",
            existing_id=None,
            params={},
            tags={"distml.kind": "registration"},
        )
        self.client.set_terminated(run_id)
        return run_id

    def _ensure_model(self, name: str, card: ModelCard) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(name, description=f"distml image classifier for {card.lineage.dataset}")
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise

    def _require_model(self, name: str) -> RegisteredModel:
        """The registered model ``name`` (MLflow's object), or a :class:`NotFoundError` listing the known ones."""
        try:
            model: RegisteredModel = self.client.get_registered_model(name)
        except Exception:
            names = sorted(m.name for m in self.client.search_registered_models())
            known = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
            raise NotFoundError(
                f"no registered model {clip(name)}", hint=f"registered: {known or 'none yet'}"
            ) from None
        return model

    def _alias(self, name: str, alias: str) -> Version | None:
        try:
            found = _aliases(self.client.get_registered_model(name)).get(alias)
        except Exception:
            return None
        return self.version(name, found) if found is not None else None

    def _history(self, name: str) -> list[str]:
        tags = self.client.get_registered_model(name).tags
        try:
            return [str(v) for v in json.loads(tags.get(_HISTORY_TAG, "[]"))]
        except ValueError:
            return []


def _recorded_move(rm: RegisteredModel) -> _Move | None:
    """The move recorded on registered model ``rm`` and not yet applied, if it still applies.

    It applies while the champion alias is where the move left it or where it takes it; anything else means the
    alias was moved by other means after the crash, and that move wins.
    """
    text = (rm.tags or {}).get(_MOVE_TAG)
    if not text:
        return None
    try:
        move = json.loads(text)
        champion, previous, was = move["champion"], move["previous"], move["from"]
        history = [str(v) for v in move["history"]]
    except (ValueError, KeyError, TypeError):
        return None
    now = (rm.aliases or {}).get(CHAMPION)
    if (str(now) if now is not None else None) not in (was, champion):
        return None
    previous = None if previous is None else str(previous)
    return {"champion": str(champion), "previous": previous, "history": history, "from": was}


def _aliases(rm: RegisteredModel) -> dict[str, str]:
    """Alias -> version of registered model ``rm``, with a recorded but unfinished champion move applied."""
    aliases = {str(a): str(v) for a, v in (rm.aliases or {}).items()}
    move = _recorded_move(rm)
    if move is not None:
        aliases[CHAMPION] = move["champion"]
        if move["previous"] is None:
            aliases.pop(PREVIOUS, None)
        else:
            aliases[PREVIOUS] = move["previous"]
    return aliases


def _to_version(mv: ModelVersion, aliases: dict[str, str]) -> Version:
    return Version(
        name=mv.name,
        version=str(mv.version),
        aliases=sorted(a for a, v in aliases.items() if v == str(mv.version)),
        run_id=mv.run_id,
        source=mv.source or "",  # none recorded: _download refuses it as an unexpected source
        tags=dict(mv.tags or {}),
    )


def _recorded_sha(version: Version) -> str:
    """The sha256 of ``model.onnx`` that ``version`` recorded when it was registered."""
    expected = version.tags.get(ONNX_SHA_TAG)
    if not expected:
        raise ModelError(
            f"{version.label} records no sha256 of {ONNX_FILE}, so its artifact cannot be verified",
            hint="register the run again",
        )
    return expected


def _parity_refusal(version: Version) -> str | None:
    """Why ``version`` may not be champion or be loaded (its parity tag is not ``passed``), or None."""
    state = version.tags.get(PARITY_TAG)
    if state == "passed":
        return None
    return f"{version.label} did not pass the ONNX parity check (registry tag {PARITY_TAG}={clip(str(state))})"


def _publish(downloaded: Path, folder: Path) -> None:
    """Rename a verified download into place; if another process placed its copy first, keep theirs."""
    try:
        os.rename(downloaded, folder)  # atomic: readers see no folder or a whole one
    except OSError as exc:
        if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
        # Lost the race: the caller verifies what is there (and replaces it if it is not good).


def _move_aside(folder: Path) -> None:
    """Take a bad local copy out of the way in one rename (another process may be doing the same), then delete it."""
    aside = folder.with_name(f".{folder.name}.stale-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(folder, aside)
    except FileNotFoundError:
        return  # someone else moved it first
    shutil.rmtree(aside, ignore_errors=True)


def resolve_model(ref: str | Path, workspace: Workspace) -> ModelArtifact:
    """A model from a folder path or a registry reference (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``).

    A registry reference is verified against what its version recorded when it was registered (see
    :meth:`Registry.resolve`).
    """
    if str(ref).startswith("models:/"):
        return Registry(workspace).resolve(str(ref))
    return open_artifact(Path(ref))
