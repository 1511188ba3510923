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
    """Dataset digest -> training runs (or the search) -> selected run -> model version -> alias, from the steps.

    After a search: its summary (study, trial count and states, the best trial's params and validation value),
    the validation split the trials were chosen on, the trial the selection took, and the refit when there is one.
    """
    out: dict[str, Any] = {}
    ingest = steps.get("ingest", {}).get("outputs") or {}
    if ingest:
        out["dataset"] = {"name": ingest.get("dataset"), "digest": ingest.get("digest")}
    search = steps.get("search", {}).get("outputs") or {}
    if search:
        kept = ("study", "storage", "trials", "asked", "budget_minutes", "budget_stopped", "ran", "states", "metric")
        out["search"] = {k: search.get(k) for k in (*kept, "best")}
        out["validation"] = search.get("validation")
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
        trial = trial_of(search, sel.get("winner"))
        if trial is not None:  # chosen on validation; its test accuracy is reported, not used
            out["selected"].update(trial=trial["number"], test_accuracy=trial.get("test_accuracy"))
        chosen = next((o for o in runs.values() if o.get("run") == sel.get("winner")), {})
        validation = sel.get("validation") or chosen.get("validation")
        if validation and "validation" not in out:  # the split the candidates were chosen on
            out["validation"] = validation
    refit = steps.get("refit", {}).get("outputs") or {}
    if refit:
        out["refit"] = {
            k: refit.get(k) for k in ("refit", "run", "source_trial", "source_run", "reason", "test_accuracy")
        }
    reg = steps.get("register", {}).get("outputs") or {}
    if reg:
        out["model"] = {
            "name": reg.get("name"),
            "version": reg.get("version"),
            "alias": "champion",
            "ref": reg.get("ref"),
        }
    return out


def trial_of(search: dict[str, Any], run: object) -> dict[str, Any] | None:
    """The search's trial whose run folder is ``run`` (None when there was no search)."""
    for trial in search.get("table") or []:
        if isinstance(trial, dict) and Path(str(trial.get("run_dir"))).name == run:
            return trial
    return None


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
        if "search" in lin:
            lines += _search_lines(lin["search"], lin.get("validation"))
        if "selected" in lin:
            sel = lin["selected"]
            trial = ""
            if sel.get("trial") is not None:
                test = sel.get("test_accuracy")
                shown = f", test accuracy {test:.2%} (reported, not used to choose)" if test is not None else ""
                trial = f": trial {sel['trial']}{shown}"
            lines.append(f"  selected  {sel['run']} ({sel['metric']} {sel['value']:.4f}){trial}")
        if "refit" in lin:
            r = lin["refit"]
            acc = r.get("test_accuracy")
            lines.append(
                f"  refit     run {r['run']}: trial {r['source_trial']} retrained on all of train"
                + (f", test accuracy {acc:.2%}" if acc is not None else "")
                + f" (chosen by {r['reason']})"
            )
        if "model" in lin:
            lines.append(
                f"  model     {lin['model']['name']} version {lin['model']['version']} "
                f"-> alias champion ({lin['model']['ref']})"
            )
    return lines


def _search_lines(search: dict[str, Any], validation: dict[str, Any] | None) -> list[str]:
    states = ", ".join(f"{n} {s.lower()}" for s, n in (search.get("states") or {}).items())
    lines = [f"  search    study {search['study']} ({search['storage']}): {search['trials']} trials ({states})"]
    if search.get("budget_stopped"):
        budget = search.get("budget_minutes")
        minutes = f"{budget:g}" if isinstance(budget, int | float) else "?"
        lines.append(
            f"            stopped by its {minutes}-minute budget after {search['trials']} of "
            f"{search.get('asked')} trials (raise --budget-minutes or --trials to continue)"
        )
    best = search.get("best") or {}
    if best:
        params = ", ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(best["params"].items())
        )
        value = best.get("value")
        lines.append(
            f"            the study's best: trial {best.get('number')}, {search.get('metric')} "
            + (f"{value:.4f}" if isinstance(value, float) else "-")
            + f" ({params})"
        )
    if validation:
        lines.append(
            f"            validation split: {validation.get('images')} train images held out "
            f"(fraction {validation.get('fraction')}, seed {validation.get('seed')})"
        )
    return lines


def _duration(seconds: float) -> str:
    return f"{seconds:.1f}s" if seconds < 60 else f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def _when(stamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp))
