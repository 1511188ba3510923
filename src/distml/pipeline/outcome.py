"""What a pipeline run records: each step's :class:`Outcome` and the run's :class:`RunRecord` (``run.json``).

Plain types, read by the runner that writes them (:mod:`distml.pipeline.runner`) and by the code that reads
records back (:mod:`distml.pipeline.record`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, TypedDict

StepStatus = Literal["waiting", "running", "done", "failed", "skipped", "interrupted"]
CacheDecision = Literal["", "hit", "ran"]  # "": not decided yet (or skipped before it could be)
RunStatus = Literal["running", "done", "failed", "interrupted"]


class RunRecord(TypedDict):
    """``run.json``: what ``distml runs show`` reads back (:mod:`distml.pipeline.record`)."""

    id: str
    argv: list[str]
    pid: int
    started: float
    ended: float | None
    status: RunStatus
    config: dict[str, Any]  # the resolved config, as JSON
    dag: dict[str, list[str]]  # step -> the steps it needs
    steps: dict[str, dict[str, Any]]  # step -> its Outcome's fields
    lineage: dict[str, Any]


@dataclass
class Outcome:
    """One step in one run: its status, the cache's decision and why, its outputs, files and key metric."""

    status: StepStatus = "waiting"
    cache: CacheDecision = ""
    why: str = ""
    key: str = ""
    seconds: float = 0.0
    outputs: dict[str, Any] = field(default_factory=dict)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    metric: str = ""
    error: str = ""
    log: str = ""
    started: float = 0.0
