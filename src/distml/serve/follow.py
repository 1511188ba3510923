"""The server's links to the registry: following the champion's alias (hot swap), loading a canary or a shadow,
moving an alias back after a rollback.

A server started on ``models:/NAME@ALIAS`` checks the alias every ``follow_s`` seconds (:class:`Follower`). When
it names another version (a promote, a rollback, a pipeline that registered a new champion), that version is
resolved through the registry, which verifies its files against the hashes recorded at registration and refuses a
version that did not pass the ONNX parity check, then loaded and put through a warm-up inference
(:func:`~distml.serve.model.warm_up`), all in a worker thread, off the event loop. Only then is it handed to the
app, which swaps it in. A version that fails any of it is not served: one log line, ``distml_swaps_total
{outcome="refused"}``, and the current champion keeps serving; it is not tried again until the alias moves on.

MLflow is imported here only inside functions: importing the server loads none of it.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable, Collection
from pathlib import Path
from typing import TYPE_CHECKING

from distml.config import ServeConfig
from distml.errors import DistmlError
from distml.serve.model import ServedModel, load_configured, warm_up
from distml.serve.source import ModelSource

if TYPE_CHECKING:
    from distml.registry.registry import Registry

log = logging.getLogger("distml.serve")
_ALIAS_REF = re.compile(r"^models:/(?P<name>[A-Za-z0-9._-]+)@(?P<alias>[A-Za-z0-9_-]+)$")
WARN_EVERY_S = 60.0


def follows(source: ModelSource | None, config: ServeConfig) -> bool:
    """Whether a server on ``source`` follows an alias: a ``models:/NAME@ALIAS`` reference and ``follow_s`` > 0."""
    return bool(source and source.ref and source.workspace and _ALIAS_REF.match(source.ref) and config.follow_s > 0)


def load_ref(ref: str, config: ServeConfig, workspace: Path | None) -> ServedModel:
    """Resolve ``ref`` (a folder or a ``models:/`` reference, verified), load it and warm it up: a canary or shadow."""
    from distml.registry.registry import resolve_model
    from distml.workspace import Workspace

    if ref.startswith("models:/") and workspace is None:
        raise DistmlError(f"{ref} is a registry reference, and this server has no workspace to resolve it in")
    artifact = resolve_model(ref, Workspace(workspace or Path.cwd()))
    model = load_configured(artifact.path, config)
    warm_up(model)
    return model


def move_alias(workspace: Path, name: str, alias: str, version: str) -> None:
    """Point registry alias ``alias`` of ``name`` at ``version`` (``champion``: through the registry's promote,
    which keeps its history and refuses a version that failed parity)."""
    from distml.registry.registry import CHAMPION, Registry
    from distml.workspace import Workspace

    registry = Registry(Workspace(workspace))
    if alias == CHAMPION:
        registry.promote(name, version)
    else:
        registry.version(name, version)  # NotFoundError naming the version if it is not there
        registry.client.set_registered_model_alias(name, alias, version)


class Follower:
    """Follows ``source``'s alias and hands each newly named, verified version to ``swap``."""

    def __init__(
        self,
        source: ModelSource,
        config: ServeConfig,
        *,
        current: Callable[[], str],
        swap: Callable[[ServedModel], Awaitable[None]],
        refused: Callable[[str, str], None],
    ) -> None:
        match = _ALIAS_REF.match(source.ref or "")
        if match is None or source.workspace is None:
            raise ValueError(f"{source.ref} is not a models:/NAME@ALIAS reference in a workspace")
        self.name, self.alias = match["name"], match["alias"]
        self.workspace = source.workspace
        self.config = config
        self.interval_s = config.follow_s
        self._current, self._swap, self._refused_cb = current, swap, refused
        self._registry: Registry | None = None  # built once, in the worker thread (it opens the tracking store)
        self.refused: str | None = None  # the last version refused: not tried again until the alias moves on
        self._warned: dict[str, float] = {}

    async def run(self) -> None:
        """Check every ``follow_s`` seconds until cancelled; a failed check is logged, never fatal."""
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.check()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug: logged with its traceback, and the next tick tries again
                log.exception("hot swap: checking %s@%s failed", self.name, self.alias)

    async def check(self) -> str:
        """One check: ``same``, ``swapped``, ``refused`` (this time or before) or ``unreachable``."""
        try:
            version = await asyncio.to_thread(self._lookup)
        except DistmlError as exc:
            self._warn("lookup", f"hot swap: cannot read {self.name}@{self.alias}: {exc.message}")
            return "unreachable"
        if version == self._current():
            self.refused = None  # the alias is back where it was: a later move to that version is tried again
            return "same"
        if version == self.refused:
            return "refused"
        try:
            model = await asyncio.to_thread(self._load, version)
        except DistmlError as exc:
            self.refused = version
            self._refused_cb(version, exc.message)
            return "refused"
        if model.name != self.name:  # the registry names models; a version of another model is never served here
            self.refused = version
            self._refused_cb(version, f"it is a version of {model.name}, not {self.name}")
            return "refused"
        await self._swap(model)
        return "swapped"

    def _registry_client(self) -> Registry:
        if self._registry is None:
            from distml.registry.registry import Registry
            from distml.workspace import Workspace

            self._registry = Registry(Workspace(self.workspace))
        return self._registry

    def _lookup(self) -> str:
        return self._registry_client().lookup(f"models:/{self.name}@{self.alias}").version

    def _load(self, version: str) -> ServedModel:
        # By version, not alias: what was looked up is what is verified and loaded, even if the alias moves again
        artifact = self._registry_client().resolve(f"models:/{self.name}/{version}")
        model = load_configured(artifact.path, self.config)
        warm_up(model)
        return model

    def _warn(self, key: str, message: str) -> None:
        now = time.monotonic()
        if now - self._warned.get(key, -WARN_EVERY_S) >= WARN_EVERY_S:
            self._warned[key] = now
            log.warning("%s", message)


ROLLOUT_FIELDS = (
    "canary_percent",
    "rollback_window_s",
    "rollback_min_requests",
    "rollback_error_margin",
    "rollback_latency_ratio",
    "rollback_latency_floor_ms",
    "rollback_alias",
)


def check_rollout(config: ServeConfig, source: ModelSource, given: Collection[str]) -> list[str]:
    """Before the server starts: the canary and shadow resolve, are versions of the same model and take the same
    input as the champion; rollout settings come with a canary. Returns the lines that describe the variants for
    the announcement; raises :class:`~distml.errors.UsageError` or the resolver's one-line error otherwise."""
    from distml.errors import UsageError
    from distml.registry.artifact import open_artifact
    from distml.registry.registry import resolve_model
    from distml.workspace import Workspace

    stray = [f"--{name.replace('_', '-')}" for name in ROLLOUT_FIELDS if name in given]
    if config.canary is None and stray:
        raise UsageError(f"{', '.join(stray)} set without --canary", hint="add --canary MODEL, the model they are for")
    if config.rollback_alias is not None and (source.ref is None or source.workspace is None):
        raise UsageError("--rollback-alias moves a registry alias: serve a models:/NAME@ALIAS champion to use it")
    champion = open_artifact(source.path).card
    lines = []
    if follows(source, config):
        lines.append(f"  follows {source.ref}: checked every {config.follow_s:g} s, a new version is swapped in")
    for role, ref in (("canary", config.canary), ("shadow", config.shadow)):
        if ref is None:
            continue
        card = resolve_model(ref, Workspace(source.workspace or Path.cwd())).card
        if card.name != champion.name:
            raise UsageError(f"--{role} {ref} is a version of {card.name}, not of the champion's model {champion.name}")
        if tuple(card.image_shape) != tuple(champion.image_shape) or list(card.class_names) != list(
            champion.class_names
        ):
            raise UsageError(
                f"--{role} {ref} takes {list(card.image_shape)} images into {len(card.class_names)} classes; the "
                f"champion takes {list(champion.image_shape)} into {len(champion.class_names)}: they must match"
            )
        what = f"  {role}: {card.name} version {card.version or '1'} ({ref})"
        if role == "canary":
            what += (
                f", {config.canary_percent:g}% of requests by {config.route_header} (else the request id); rolled "
                f"back when worse over {config.rollback_window_s:g} s"
            )
        else:
            what += ", on every request off the answer path"
        lines.append(what)
    return lines
