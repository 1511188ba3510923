"""``distml tune show``: a study's trial table, and a report with its optimisation history and parameter importance.

The report reads any study (:class:`~distml.search.tuner.StudyResult` for the trials, the Optuna storage for the
per-epoch values and the search space) and writes ``history.png``, ``importance.png`` and ``report.md`` into
``<home>/studies/<S>-report/``, each atomically, then attaches them to the study's MLflow run.

Importance is Optuna's PED-ANOVA (NumPy only; fANOVA would need scikit-learn) over the COMPLETE trials. A study
with too few of them gets no importance plot, and the report says why.
"""

from __future__ import annotations

import io
import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from distml.files import write_atomic
from distml.search.config import params_text

if TYPE_CHECKING:
    import optuna
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from distml.search.result import StudyResult

# PED-ANOVA compares the best trials with all of them: with fewer complete trials than this the "best" part is one
# trial, and the numbers say nothing.
MIN_TRIALS_FOR_IMPORTANCE = 4
NOT_USED = "not used for the choice"


def trial_table(result: StudyResult) -> str:
    """The trials, one line each: number, state, validation metric, epochs used, time, test accuracy, params.

    The best trial is marked ``*``; a pruned trial's value is the last one it reported. Test accuracy is shown for
    information and marked as not used for the choice.
    """
    metric = result.metric
    best = result.best["number"] if result.best is not None else None
    head = f"  {'#':>4} {'STATE':<8} {_short(metric):>9} {'EPOCHS':>6} {'TIME':>7} {'TEST ACC*':>9}  PARAMS"
    lines = [head]
    for trial in sorted(result.trials, key=lambda t: t["number"]):
        mark = "*" if trial["number"] == best else " "
        lines.append(
            f"{mark} {trial['number']:>4} {trial['state']:<8} {_value(trial['value'], metric):>9} "
            f"{trial['epochs_used'] or 0:>6} {_duration(trial['seconds']):>7} "
            f"{_value(trial['test_accuracy'], 'accuracy'):>9}  {params_text(trial['params'])}"
        )
    if result.best is not None:
        early = " (pruned: no trial completed)" if result.best["state"] != "COMPLETE" else ""
        lines.append(f"* best: trial {result.best['number']}{early}, {metric} {_value(result.best['value'], metric)}")
    else:
        lines.append("no trial has reported a value yet: no best")
    lines.append(f"TEST ACC*: measured on the test split, {NOT_USED}")
    if any(t["state"] == "STOPPED" for t in result.trials):
        lines.append("STOPPED: stopped by the budget; the next distml tune resumes it from its checkpoint")
    return "\n".join(lines)


def default_folder(result: StudyResult) -> Path:
    """``<home>/studies/<S>-report``: next to the study's storage."""
    return result.storage.parent / f"{result.study}-report"


def write_report(result: StudyResult, out: Path | None = None) -> list[Path]:
    """Write the study's plots and ``report.md`` into ``out`` (default :func:`default_folder`); returns the files.

    The files are also logged to the study's MLflow parent run, when it has one.
    """
    from distml.search.tracking import log_report

    out = out or default_folder(result)
    out.mkdir(parents=True, exist_ok=True)
    study = _load_study(result)
    metric = result.metric
    history = out / "history.png"
    write_atomic(history, _png(_history_figure(study, metric)))
    files = [history]
    importances, why_not = _importances(study)
    if importances:
        importance = out / "importance.png"
        write_atomic(importance, _png(_importance_figure(importances, metric)))
        files.append(importance)
    report = out / "report.md"
    write_atomic(report, _markdown(result, importances, why_not, files).encode())
    files.append(report)
    log_report(result.storage, result.study, files)
    return files


def _load_study(result: StudyResult) -> optuna.Study:
    import optuna

    from distml.search.study import storage_url

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name=result.study, storage=storage_url(result.storage))


def _importances(study: optuna.Study) -> tuple[dict[str, float], str]:
    """(importance per parameter, "") or ({}, why there is none)."""
    import optuna
    from optuna.importance import PedAnovaImportanceEvaluator

    complete = [
        t
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if t.value is not None and math.isfinite(t.value)
    ]
    if len(complete) < MIN_TRIALS_FOR_IMPORTANCE:
        return {}, (
            f"too few complete trials for parameter importance: {len(complete)}, it needs "
            f"{MIN_TRIALS_FOR_IMPORTANCE} (pruned and failed trials carry no final value)"
        )
    varied = sorted({k for t in complete for k in t.params if len({str(u.params.get(k)) for u in complete}) > 1})
    if not varied:
        return {}, "no parameter varies among the complete trials: nothing to compare"
    # The top trials against all complete ones: the top 10%, but at least two trials so one lucky run is not it.
    target = min(0.5, max(0.1, 2 / len(complete)))
    evaluator = PedAnovaImportanceEvaluator(target_quantile=target)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna warns about small studies; the report says how many trials it used
        found = optuna.importance.get_param_importances(study, evaluator=evaluator, params=varied, normalize=True)
    return dict(found), ""


def _history_figure(study: optuna.Study, metric: str) -> Figure:
    """Left: each trial's value and the best so far. Right: every trial's per-epoch validation metric."""
    import optuna
    from matplotlib.figure import Figure

    states = optuna.trial.TrialState
    maximise = study.direction == optuna.study.StudyDirection.MAXIMIZE
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    left, right = fig.subplots(1, 2)
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    done = [(t.number, t.value) for t in trials if t.state == states.COMPLETE and t.value is not None]
    pruned = [(t.number, _last(t)) for t in trials if t.state == states.PRUNED and t.intermediate_values]
    if done:
        left.scatter(*zip(*done, strict=True), color="tab:blue", label="complete", zorder=3)
        best, best_so_far = [], None
        for _, value in done:
            if best_so_far is None or (value > best_so_far if maximise else value < best_so_far):
                best_so_far = value
            best.append(best_so_far)
        left.step([n for n, _ in done], best, where="post", color="tab:red", label="best so far")
    if pruned:
        left.scatter(*zip(*pruned, strict=True), marker="x", color="grey", label="pruned (last value)", zorder=2)
    _label(left, "optimisation history", "trial", metric)
    for trial in trials:
        if trial.intermediate_values:
            steps = sorted(trial.intermediate_values)
            colour = "tab:blue" if trial.state == states.COMPLETE else "lightgrey"
            right.plot(steps, [trial.intermediate_values[s] for s in steps], color=colour, marker=".", linewidth=1)
    _label(right, "per epoch (grey: pruned or unfinished)", "epoch", metric, legend=False)
    return fig


def _last(trial: optuna.trial.FrozenTrial) -> float:
    """The last value a trial reported (a pruned trial's value at the rung it was stopped)."""
    return trial.intermediate_values[max(trial.intermediate_values)]


def _importance_figure(importances: dict[str, float], metric: str) -> Figure:
    from matplotlib.figure import Figure

    names = list(importances)[::-1]  # most important on top
    fig = Figure(figsize=(7, 0.5 * len(names) + 1.5), layout="constrained")
    ax = fig.subplots()
    ax.barh(names, [importances[n] for n in names], color="tab:blue")
    _label(ax, f"parameter importance for {metric}\n(PED-ANOVA, complete trials)", "importance", "", legend=False)
    return fig


def _label(ax: Axes, title: str, x: str, y: str, *, legend: bool = True) -> None:
    from matplotlib.ticker import MaxNLocator

    if x in ("trial", "epoch"):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no trial 2.5
    ax.set_title(title)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.grid(alpha=0.3)
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend()


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _markdown(result: StudyResult, importances: dict[str, float], why_not: str, files: list[Path]) -> str:
    metric = result.metric
    states = ("COMPLETE", "PRUNED", "STOPPED", "FAIL", "RUNNING")
    counts = {s: sum(t["state"] == s for t in result.trials) for s in states}
    lines = [
        f"# Study {result.study}",
        "",
        f"- storage: `{result.storage}` (open it with `optuna-dashboard sqlite:///{result.storage}`)",
        f"- chosen on: {metric} ({result.direction}), validation split only",
        f"- trials: {len(result.trials)} ({', '.join(f'{n} {s.lower()}' for s, n in counts.items() if n)})",
        f"- epochs spent: {sum(t['epochs_used'] or 0 for t in result.trials)}",
        "",
        "## Best trial",
        "",
    ]
    best = result.best
    if best is None:
        lines.append("No trial has reported a value: there is no best.")
    else:
        early = " (stopped early: no trial completed)" if best["state"] != "COMPLETE" else ""
        lines += [
            f"Trial {best['number']}{early}: {metric} {_value(best['value'], metric)} "
            f"after {best['epochs_used']} epochs ({_duration(best['seconds'])}), run `{best['run_dir']}`.",
            f"Test accuracy {_value(best['test_accuracy'], 'accuracy')} ({NOT_USED}).",
            "",
            *[f"- `{k}` = {v!r}" for k, v in sorted(best["params"].items())],
        ]
    lines += ["", "## Trials", "", "```", trial_table(result), "```", "", "## Plots", ""]
    lines += [f"![{f.stem}]({f.name})" for f in files if f.suffix == ".png"]
    lines += ["", "## Parameter importance", ""]
    if importances:
        lines += [f"- `{k}`: {v:.2f}" for k, v in importances.items()]
    else:
        lines.append(f"No importance plot: {why_not}.")
    return "\n".join(lines) + "\n"


def _short(metric: str) -> str:
    return metric.upper().replace("_ACCURACY", " ACC").replace("_LOSS", " LOSS").replace("_", " ")


def _value(value: float | None, metric: str) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.2%}" if metric.endswith("accuracy") else f"{value:.4f}"


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
