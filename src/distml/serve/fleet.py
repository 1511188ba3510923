"""The variants one server runs, and what changes them while it serves.

- the champion, and its **hot swap**: a server on ``models:/NAME@ALIAS`` follows the alias
  (:mod:`~distml.serve.follow`); a new version, verified and warmed up in a worker thread, becomes the champion
  in one assignment (:meth:`Fleet.swap`), and the old one is retired once its requests are done;
- the canary (``--canary``), its share of sticky keys (:class:`~distml.serve.variants.Router`) and its
  **automatic rollback** (:mod:`~distml.serve.rollout`), optionally moving a registry alias back;
- the shadow (``--shadow``, :mod:`~distml.serve.shadow`).

Each change is a log line, a metric and, with a request log, an ``io.distml.serve.*`` event.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from distml.config import ServeConfig
from distml.errors import DistmlError
from distml.serve.batcher import Batcher
from distml.serve.metrics import Metrics
from distml.serve.model import ServedModel
from distml.serve.reqlog import RequestLogger
from distml.serve.rollout import Rollout, Verdict
from distml.serve.shadow import Shadow
from distml.serve.source import ModelSource
from distml.serve.variants import Router, Variant

log = logging.getLogger("distml.serve")


class Fleet:
    """A server's variants (see the module docstring); ``on_change`` is called after the champion changes."""

    def __init__(
        self,
        model: ServedModel,
        config: ServeConfig,
        source: ModelSource,
        metrics: Metrics,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self.config, self.source, self.metrics = config, source, metrics
        self.name = model.name
        self.router = Router(self.variant("champion", model))
        self.shadow: Shadow | None = None
        self.rollout: Rollout | None = None
        self.reqlog: RequestLogger | None = None  # the app's, once started
        self._on_change = on_change
        self._tasks: set[asyncio.Task[Any]] = set()  # the follower, retirements, alias moves: held until done
        self._retiring: list[Variant] = []
        if config.canary is not None or config.shadow is not None:
            self._load_extras()

    def variant(self, role: str, model: ServedModel) -> Variant:
        """``model`` in ``role``, with a batcher of its own (not started)."""
        c = self.config
        batcher = Batcher(
            model.predict,
            max_batch_size=c.max_batch_size,
            max_batch_delay_s=c.max_batch_delay_ms / 1000,
            max_queue=c.max_queue,
            max_queue_wait_s=c.max_queue_wait_ms / 1000,
            refusal_delay_s=c.refusal_delay_ms / 1000,
            on_batch=self.metrics.batch if role != "shadow" else None,  # the shadow's batches are not the server's
        )
        return Variant(role, model, batcher)

    def _load_extras(self) -> None:
        """Load the canary and the shadow the config names (resolved, verified and warmed up, as a hot swap is)."""
        from distml.serve.follow import load_ref

        c, workspace = self.config, self.source.workspace
        if c.canary is not None:
            canary = self.variant("canary", load_ref(c.canary, c, workspace))
            self.router = Router(self.router.champion, canary, c.canary_percent)
            self.rollout = Rollout(self.router, c, self._rolled_back)
            self.metrics.variant("canary", canary.version)
            self.metrics.canary_percent.set(self.router.canary_percent)
        if c.shadow is not None:
            shadow = self.variant("shadow", load_ref(c.shadow, c, workspace))
            self.shadow = Shadow(shadow, self.metrics, limit=c.max_queue, timeout_s=c.request_timeout_s)
            self.metrics.variant("shadow", shadow.version)

    def variants(self) -> list[Variant]:
        """Every variant: the routable ones (champion first), then the shadow."""
        return self.router.variants() + ([self.shadow.variant] if self.shadow is not None else [])

    # -- lifecycle -----------------------------------------------------------------------------------------
    def start(self) -> None:
        """On the event loop: start every batcher, and the follower when the source is an alias."""
        from distml.serve.follow import Follower, follows

        for variant in self.variants():
            variant.batcher.start()
        if follows(self.source, self.config):
            follower = Follower(
                self.source,
                self.config,
                current=lambda: self.router.champion.version,
                swap=self.swap,
                refused=self.swap_refused,
            )
            self._spawn(follower.run())

    async def stop(self) -> None:
        """Stop following, then finish what every batcher holds and close it."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=5)
        for variant in self.router.variants() + self._retiring:
            if not variant.closed:
                variant.closed = True
                await variant.batcher.close()
        if self.shadow is not None:
            await self.shadow.close()

    # -- hot swap ------------------------------------------------------------------------------------------
    async def swap(self, model: ServedModel) -> None:
        """Make ``model`` (loaded, verified, warmed up) the champion. Requests already admitted finish on the old
        one, whose batcher closes once they are done; new requests go to ``model`` from this call on."""
        new, old = self.variant("champion", model), self.router.champion
        new.batcher.start()
        self.router.champion = new  # one assignment on the loop: each request picks its variant once, in admit
        self._on_change()
        self.metrics.variant("champion", new.version, was=old.version)
        self.metrics.swaps.labels("swapped").inc()
        log.warning("hot swap: %s version %s now serves (was version %s)", model.name, new.version, old.version)
        if self.reqlog is not None:
            self.reqlog.note(
                "swap",
                {
                    "outcome": "swapped",
                    "variant": "champion",
                    "version": new.version,
                    "previous": old.version,
                    "path": str(model.path),
                },
            )
        self._retiring.append(old)
        self._spawn(self._retire(old))

    def swap_refused(self, version: str, reason: str) -> None:
        """A version the alias named failed verification: not served, logged and counted; the champion stays."""
        self.metrics.swaps.labels("refused").inc()
        serving = self.router.champion.version
        log.error("hot swap: %s version %s refused, version %s keeps serving: %s", self.name, version, serving, reason)
        if self.reqlog is not None:
            self.reqlog.note(
                "swap",
                {"outcome": "refused", "variant": "champion", "version": version, "serving": serving, "reason": reason},
            )

    async def _retire(self, variant: Variant) -> None:
        try:
            await variant.retire(self.config.request_timeout_s + self.config.max_queue_wait_ms / 1000 + 1)
        finally:
            self._retiring.remove(variant)

    # -- canary rollback -----------------------------------------------------------------------------------
    def _rolled_back(self, verdict: Verdict) -> None:
        """The rollout monitor took the canary's share away: count it, log it, and move the alias if asked."""
        canary, champion = self.router.canary, self.router.champion
        assert canary is not None
        self.metrics.rollbacks.inc()
        self.metrics.canary_percent.set(0)
        log.error(
            "canary rollback: %s version %s no longer answers (%s); version %s answers everything",
            self.name,
            canary.version,
            verdict.reason,
            champion.version,
        )
        if self.reqlog is not None:
            self.reqlog.note(
                "rollback",
                {"variant": "canary", "version": canary.version, "champion": champion.version, **verdict.as_dict()},
            )
        if self.config.rollback_alias is not None and self.source.workspace is not None:
            self._spawn(self._move_alias(self.config.rollback_alias, champion.version))

    async def _move_alias(self, alias: str, version: str) -> None:
        from distml.serve.follow import move_alias

        assert self.source.workspace is not None
        try:
            await asyncio.to_thread(move_alias, self.source.workspace, self.name, alias, version)
        except DistmlError as exc:
            log.error("canary rollback: moving %s@%s to version %s failed: %s", self.name, alias, version, exc)
            return
        log.warning("canary rollback: %s@%s now names version %s", self.name, alias, version)
        if self.reqlog is not None:
            self.reqlog.note("alias", {"alias": alias, "version": version})

    def _spawn(self, work: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
