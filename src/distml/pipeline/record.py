"""Reading run records back: the summary table, ``distml runs list`` and ``distml runs show``."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from distml._proc import pid_alive
from distml.errors import NotFoundError


def runs_folder(home: Path) -> Path:
    return home / "pipeline" / "runs"


def load(home: Path, ref: str) -> dict[str, Any]:
    """The record of run ``ref`` (an id or a unique prefix of one; ``latest`` for the newest)."""
    folder = runs_folder(home)
    ids = sorted(p.name for p in folder.iterdir() if (p / "run.json").is_file()) if folder.is_dir() else []
    found = [ids[-1]] if ref == "latest" and ids else [i for i in ids if ref and i.startswith(ref)]
    if len(found) != 1:
        what = "no pipeline run" if not found else f"{len(found)} pipeline runs"
        raise NotFoundError(f"{what} matches {ref!r}", hint="see 'distml runs list'")
    return _status(json.loads((folder / found[0] / "run.json").read_text()))


def _status(doc: dict[str, Any]) -> dict[str, Any]:
    """A record still 'running' whose process is gone was killed (SIGKILL, power loss): say so."""
    if doc.get("status") == "running" and not _alive(doc.get("pid")):
        doc["status"] = "killed"
        for step in doc.get("steps", {}).values():
            if step.get("status") == "running":
                step["status"] = "killed"
    return doc


def _alive(pid: object) -> bool:
    return isinstance(pid, int) and pid_alive(pid)


def list_records(home: Path) -> list[dict[str, Any]]:
    folder = runs_folder(home)
    out = []
    for path in sorted(folder.glob("*/run.json")) if folder.is_dir() else []:
        try:
            out.append(_status(json.loads(path.read_text())))
        except (OSError, ValueError):
            continue
    return out


def summary_table(steps: dict[str, dict[str, Any]]) -> list[str]:
    """STEP / STATUS / TIME / CACHE / KEY METRIC, one line per step."""
    width = max([len(n) for n in steps] + [4])
    lines = [f"{'STEP':<{width}}  {'STATUS':<12} {'TIME':>8}  {'CACHE':<5}  KEY METRIC"]
    for name, s in steps.items():
        seconds = s.get("seconds") or 0.0
        time_text = "-" if s.get("cache") == "hit" or not seconds else _duration(seconds)
        metric = s.get("metric") or s.get("error") or s.get("why", "")
        lines.append(
            f"{name:<{width}}  {s.get('status', '?'):<12} {time_text:>8}  {s.get('cache') or '-':<5}  {metric}"
        )
    return lines


def lineage(steps: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Dataset digest -> training runs -> selected run -> model version -> alias, from the steps' outputs."""
    out: dict[str, Any] = {}
    ingest = steps.get("ingest", {}).get("outputs") or {}
    if ingest:
        out["dataset"] = {"name": ingest.get("dataset"), "digest": ingest.get("digest")}
    runs = {n: s.get("outputs") or {} for n, s in steps.items() if n.startswith("train[")}
    if runs:
        out["training_runs"] = {
            n: {"run": o.get("run"), "mlflow_run_id": o.get("mlflow_run_id"), "test_accuracy": o.get("test_accuracy")}
            for n, o in runs.items()
            if o
        }
    sel = steps.get("select", {}).get("outputs") or {}
    if sel:
        out["selected"] = {"run": sel.get("winner"), "metric": sel.get("metric"), "value": sel.get("value")}
    reg = steps.get("register", {}).get("outputs") or {}
    if reg:
        out["model"] = {
            "name": reg.get("name"),
            "version": reg.get("version"),
            "alias": "champion",
            "ref": reg.get("ref"),
        }
    return out


def describe(doc: dict[str, Any]) -> list[str]:
    """``distml runs show``: header, the steps with their cache decisions, lineage."""
    took = (doc.get("ended") or time.time()) - doc["started"]
    lines = [
        f"run {doc['id']}: {doc['status']}, started {_when(doc['started'])}, took {_duration(took)}",
        f"command: {' '.join(doc.get('argv', []))}",
        "",
    ]
    lines += summary_table(doc["steps"])
    lines += ["", "cache decisions:"]
    width = max([len(n) for n in doc["steps"]] + [4])
    for name, s in doc["steps"].items():
        lines.append(f"  {name:<{width}} {s.get('cache') or s.get('status')}: {s.get('why') or s.get('error') or '-'}")
        if s.get("log"):
            lines.append(f"  {'':<{width}} log: {s['log']}")
    lin = doc.get("lineage") or lineage(doc["steps"])
    if lin:
        lines += ["", "lineage:"]
        if "dataset" in lin:
            lines.append(f"  dataset   {lin['dataset']['name']}@{str(lin['dataset']['digest'])[:12]}")
        for name, r in lin.get("training_runs", {}).items():
            acc = r.get("test_accuracy")
            lines.append(
                f"  {name:<9} run {r['run']}"
                + (f", test accuracy {acc:.2%}" if acc is not None else "")
                + (f", mlflow {r['mlflow_run_id']}" if r.get("mlflow_run_id") else "")
            )
        if "selected" in lin:
            lines.append(
                f"  selected  {lin['selected']['run']} ({lin['selected']['metric']} {lin['selected']['value']:.4f})"
            )
        if "model" in lin:
            lines.append(
                f"  model     {lin['model']['name']} version {lin['model']['version']} "
                f"-> alias champion ({lin['model']['ref']})"
            )
    return lines


def _duration(seconds: float) -> str:
    return f"{seconds:.1f}s" if seconds < 60 else f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def _when(stamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp))
