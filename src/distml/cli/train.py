"""``distml train``: one synchronous data-parallel training job (W workers under torchrun)."""

from __future__ import annotations

from typing import Any

import click
from pydantic import ValidationError

from distml.cli.main import AppContext, pass_app
from distml.config import TrainConfig, _config_error

_SCHEDULES = ["constant", "step", "cosine", "onecycle"]


@click.command("train")
@click.option("--dataset", help="Dataset name or digest prefix. [default: fashion-mnist]")
@click.option("--model", help="cnn, cnn-dropout, cnn-batchnorm, resnet or resnet-small. [default: cnn]")
@click.option("--workers", type=int, help="Worker processes (DDP replicas) on this host. [default: 2]")
@click.option("--epochs", type=int, help="[default: 5]")
@click.option("--batch-size", type=int, help="Global batch; each worker gets batch-size / workers. [default: 64]")
@click.option("--lr", type=float, help="Peak learning rate. [default: 0.002]")
@click.option("--optimizer", type=click.Choice(["adamw", "sgd"]), help="[default: adamw]")
@click.option("--schedule", type=click.Choice(_SCHEDULES), help="Learning-rate schedule. [default: onecycle]")
@click.option(
    "--augment",
    type=click.Choice(["none", "crop", "crop+flip"]),
    help="Random crop (pad 2) and horizontal flip; helps longer runs of bigger nets. [default: none]",
)
@click.option("--seed", type=int, help="Seeds weights, data order, augmentation and dropout. [default: 0]")
@click.option("--run-name", help="Run folder under <home>/runs; the same name again resumes it (one at a time).")
@click.option("--checkpoint-every-steps", type=int, help="Also checkpoint every N steps (0: epoch ends only).")
@click.option("--threads-per-worker", type=int, help="Intra-op threads per worker. [default: cores / workers]")
@click.option("--allow-oversubscribe", is_flag=True, default=None, help="Allow workers x threads > cores.")
@click.option("--compile", "compile_", is_flag=True, default=None, help="torch.compile the model (GPU).")
@click.option("--max-restarts", type=int, help="torchrun restarts after a worker dies (resume from checkpoint).")
@click.option(
    "--candidates",
    metavar="MODELS|config",
    help="Train several candidates at once: comma-separated models, or 'config' for the [[candidates]] tables of "
    "the config file. Other options apply to every candidate; --run-name is the prefix of their runs.",
)
@click.option("--nnodes", type=int, default=1, show_default=True, help="torchrun: number of hosts.")
@click.option("--node-rank", type=int, default=0, show_default=True, help="torchrun: this host's rank.")
@click.option(
    "--rdzv-endpoint",
    metavar="HOST:PORT",
    help="torchrun: c10d rendezvous endpoint (multi-host). Unauthenticated: only on a trusted network.",
)
@pass_app
def train_cmd(
    app: AppContext, nnodes: int, node_rank: int, rdzv_endpoint: str | None, candidates: str | None, **options: Any
) -> None:
    """Train one model with synchronous data-parallel SGD (PyTorch DDP, W workers under torchrun).

    Gradients are all-reduced every step (gloo on CPU, NCCL on GPU); progress is printed by rank 0.
    A run writes checkpoints every epoch to <home>/runs/<run-name>/; running the same --run-name again
    resumes from the newest good checkpoint.

    On one host every socket of the job listens on 127.0.0.1 only. Several hosts (--nnodes > 1) must meet on a
    trusted network: the rendezvous endpoint (torchrun's c10d store, which has no authentication and whose
    content torchrun unpickles) and the workers' gloo/NCCL ports are open to whoever can reach the hosts.
    Admit them only from the job's own hosts (on Kubernetes, a NetworkPolicy between the job's pods).

    \b
    Examples:
      distml train --dataset fashion-mnist --model cnn --workers 2 --epochs 5
      distml train --model resnet --epochs 15 --batch-size 256 --lr 0.004 --run-name strong
    """
    from distml.train.launch import Rendezvous, train

    overrides = {("compile" if k == "compile_" else k): v for k, v in options.items() if v is not None}
    run_name = overrides.pop("run_name", None)
    if candidates is not None:
        _train_candidates(app, candidates, overrides, run_name)
        return
    try:
        cfg = TrainConfig.model_validate({**app.config.train.model_dump(), **overrides})
    except ValidationError as exc:
        raise _config_error(exc, source="command line") from None
    rdzv = Rendezvous(nnodes=nnodes, node_rank=node_rank, endpoint=rdzv_endpoint)
    result = train(cfg, app.workspace, run_name, rdzv)
    m = result.metrics
    if "epochs" not in m:  # no result.json here: global rank 0 ran on another host, with its own run folder
        click.echo(
            f"run {result.run_dir.name}: this host's workers finished, {m.get('wall_seconds', 0):.1f} s; global "
            f"rank 0 ran on another host and wrote the results (history, checkpoints) to its run folder"
        )
        return
    acc = m.get("test_accuracy")
    acc_text = f"test accuracy {acc:.2%}" if isinstance(acc, float) else "no test split"
    click.echo(
        f"run {result.run_dir.name}: {cfg.model} on {cfg.dataset}, {m.get('epochs')} epochs, {acc_text}, "
        f"{m.get('wall_seconds', 0):.1f} s -> {result.run_dir}"
    )


def _train_candidates(app: AppContext, spec: str, overrides: dict[str, Any], prefix: str | None) -> None:
    from datetime import datetime

    from distml.errors import UsageError
    from distml.train.candidates import run_candidates, summarise

    if spec == "config":
        if not app.config.candidates:
            raise UsageError("--candidates config, but the config has no [[candidates]] tables")
        tables: list[dict[str, Any]] = [dict(c) for c in app.config.candidates]
    else:
        models = [m.strip() for m in spec.split(",") if m.strip()]
        if not models:
            raise UsageError("--candidates needs at least one model", hint="e.g. --candidates cnn,cnn-dropout")
        tables = [{"model": m} for m in models]
    try:
        configs = app.config.candidate_configs(tables, overrides)
    except ValidationError as exc:
        raise _config_error(exc, source="candidates") from None
    prefix = prefix or f"candidates-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    jobs = run_candidates(configs, app.workspace, prefix)
    summarise(jobs)
    for job in jobs:
        if job.state == "failed":
            click.echo(f"candidate {job.label} failed: {job.error} (log: {job.log})", err=True)
    done = sum(j.state == "done" for j in jobs)
    click.echo(f"{done} of {len(jobs)} candidates finished; runs: {', '.join(j.run_dir.name for j in jobs)}")
