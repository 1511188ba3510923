"""``distml run``: the whole pipeline, once, under the workspace's lock; what it made champion, or why not."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distml.config import DistmlConfig
from distml.errors import PipelineError, UsageError
from distml.pipeline import dag, record
from distml.pipeline.lock import workspace_lock
from distml.pipeline.runner import Log, Runner
from distml.workspace import Workspace


@dataclass(frozen=True)
class PipelineRun:
    """A finished run: its id, how long it took, and the register step's outputs (name, version, ref)."""

    id: str
    seconds: float
    champion: dict[str, Any]


def run_pipeline(
    workspace: Workspace,
    config: DistmlConfig,
    *,
    models: list[str] | None = None,
    train_overrides: Mapping[str, Any] | None = None,
    force: Iterable[str] = (),
    no_cache: bool = False,
    search: bool = False,
    refit: bool = False,
    log: Log = print,
) -> PipelineRun:
    """Build the steps and run them (cached); raises :class:`PipelineError` naming the first step that failed.

    ``models`` replaces the candidates of ``config``; ``train_overrides`` apply to every candidate, over its
    ``[[candidates]]`` table; ``force`` names steps (``train`` or ``train[cnn]``) to run even on a hit.
    ``search`` runs the ``[search]`` study over ``[train]`` (with the overrides) in place of the candidates;
    ``refit`` then retrains the chosen trial on all of train and registers that.
    """
    from distml.train.resources import count_resources

    force = set(force)
    workspace.ensure()
    # This host's cores and GPUs, or with [cluster] engine = "ray" the cluster's: the training steps (and the
    # search's trials) are sized and started within them; nothing else, and no cache key, depends on the engine.
    res = count_resources(config.cluster)
    cores, gpus = res.cores, res.gpus
    with workspace_lock(workspace.home):
        steps = dag.build(
            workspace,
            config,
            models=models,
            train_overrides=dict(train_overrides or {}),
            cores=cores,
            gpus=gpus,
            node_cores=res.node_cores,
            search=search,
            refit=refit,
            log=lambda m: log(f"  ingest: {m.strip()}"),
        )
        names = [s.name for s in steps]
        unknown = sorted(f for f in force if f not in names and f not in {n.split("[")[0] for n in names})
        if unknown:
            raise UsageError(f"--force {unknown[0]}: no such step", hint=f"steps: {', '.join(names)}")
        runner = Runner(steps, home=workspace.home, config=config.model_dump(mode="json"), force=force,
                        no_cache=no_cache, cores=cores, gpus=gpus)  # fmt: skip
        started = time.perf_counter()
        log(f"pipeline run {runner.id}: {len(steps)} steps, workspace {workspace.home}, {res.describe()}")
        try:
            outcomes = runner.execute()
        except KeyboardInterrupt:
            log(f"\ninterrupted; run the same command again to resume (record: {_record(runner.dir)})")
            raise
        took = time.perf_counter() - started
    log("")
    log("\n".join(record.summary_table(runner.record["steps"])))
    unfinished = [n for n, o in outcomes.items() if o.status != "done"]
    if unfinished:  # the champion exists only if every step finished: name the first that failed
        name = next((n for n in unfinished if outcomes[n].status == "failed"), unfinished[0])
        first = outcomes[name]
        raise PipelineError(
            f"step {name} {first.status} after {took:.1f} s: {first.error or first.why}",
            hint=(f"log: {first.log}; " if first.log else "") + f"record: {_record(runner.dir)}",
        )
    return PipelineRun(runner.id, took, dict(outcomes["register"].outputs))


def _record(run_dir: Path) -> Path:
    return run_dir / "run.json"


def listing(home: Path) -> list[str]:
    """``distml runs list``: one row per pipeline run of the workspace at ``home``, oldest first (none: [])."""
    docs = record.list_records(home)
    if not docs:
        return []
    lines = [f"{'RUN':<24} {'STATUS':<12} {'TOOK':>8}  {'RAN':>3} {'HIT':>3}  CHAMPION"]
    for d in docs:
        steps = d.get("steps", {})
        ran = sum(s.get("cache") == "ran" and s.get("status") == "done" for s in steps.values())
        hit = sum(s.get("cache") == "hit" for s in steps.values())
        took = (d.get("ended") or time.time()) - d["started"]
        model = (d.get("lineage") or {}).get("model")
        champion = f"{model['name']} v{model['version']}" if model else "-"
        lines.append(f"{d['id']:<24} {d['status']:<12} {took:>7.1f}s  {ran:>3} {hit:>3}  {champion}")
    return lines
