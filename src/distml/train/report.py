"""What ``distml train`` prints when a job, or a set of candidate jobs, is over."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # types only: printing a result loads no torch
    from distml.config import TrainConfig
    from distml.train.candidates import Candidate
    from distml.train.launch import TrainResult


def result_line(cfg: TrainConfig, result: TrainResult) -> str:
    """One finished job: its model, dataset, epochs, test and validation accuracy, time and run folder."""
    m = result.metrics
    if "epochs" not in m:  # no result.json here: global rank 0 ran on another host, with its own run folder
        return (
            f"run {result.run_dir.name}: this host's workers finished, {m.get('wall_seconds', 0):.1f} s; global "
            f"rank 0 ran on another host and wrote the results (history, checkpoints) to its run folder"
        )
    acc = m.get("test_accuracy")
    acc_text = f"test accuracy {acc:.2%}" if isinstance(acc, float) else "no test split"
    val = m.get("val_accuracy")
    # Selection (distml select, the pipeline, a search) chooses on validation; the test figure is the report.
    acc_text += f", val accuracy {val:.2%}" if isinstance(val, float) else ", no validation split"
    return (
        f"run {result.run_dir.name}: {cfg.model} on {cfg.dataset}, {m.get('epochs')} epochs, {acc_text}, "
        f"{m.get('wall_seconds', 0):.1f} s -> {result.run_dir}"
    )


def failed_lines(jobs: list[Candidate]) -> list[str]:
    """One line per candidate that failed: its error and where its log is."""
    return [f"candidate {j.label} failed: {j.error} (log: {j.log})" for j in jobs if j.state == "failed"]


def candidates_line(jobs: list[Candidate]) -> str:
    """How many candidates finished, and their run folders."""
    done = sum(j.state == "done" for j in jobs)
    return f"{done} of {len(jobs)} candidates finished; runs: {', '.join(j.run_dir.name for j in jobs)}"
