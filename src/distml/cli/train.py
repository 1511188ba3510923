"""``distml train``: one synchronous data-parallel training job (W workers under torchrun), or several."""

from __future__ import annotations

import click

from distml.cli.options import AppContext, config_options, pass_app, placement_option, ray_option
from distml.train import report


@click.command("train")
@config_options(
    "train",
    "dataset model workers epochs batch_size lr optimizer schedule augment seed checkpoint_every_steps "
    "threads_per_worker allow_oversubscribe compile max_restarts",
)
@click.option("--run-name", help="Run folder under <home>/runs; the same name again resumes it (one at a time).")
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
@ray_option()
@placement_option()
@pass_app
def train_cmd(
    app: AppContext,
    run_name: str | None,
    candidates: str | None,
    nnodes: int,
    node_rank: int,
    rdzv_endpoint: str | None,
) -> None:
    """Train one model with synchronous data-parallel SGD (PyTorch DDP, W workers under torchrun).

    Gradients are all-reduced every step (gloo on CPU, NCCL on GPU); progress is printed by rank 0.
    A run writes checkpoints every epoch to <home>/runs/<run-name>/; running the same --run-name again
    resumes from the newest good checkpoint.

    On one host every socket of the job listens on 127.0.0.1 only. Several hosts (--nnodes > 1) must meet on a
    trusted network: the rendezvous endpoint (torchrun's c10d store, which has no authentication and whose
    content torchrun unpickles) and the workers' gloo/NCCL ports are open to whoever can reach the hosts.
    Admit them only from the job's own hosts (on Kubernetes, a NetworkPolicy between the job's pods).

    With --ray ADDRESS the job runs on a Ray cluster instead (Ray Train places the workers, --placement pack or
    spread, and restarts them after a lost node, --max-restarts times); this command must run on a node of
    that cluster, and the workspace must be a shared folder at the same path on every node. Ray's token
    authentication must be on (RAY_AUTH_MODE=token) and the cluster on a trusted network.

    \b
    Examples:
      distml train --dataset fashion-mnist --model cnn --workers 2 --epochs 5
      distml train --model resnet --epochs 15 --batch-size 256 --lr 0.004 --run-name strong
      distml train --ray 10.0.0.1:6379 --workers 4 --placement spread --max-restarts 2
    """
    if candidates is not None:
        _train_candidates(app, candidates, run_name)
        return
    from distml.train.launch import Rendezvous, train

    cfg = app.config.train
    rdzv = Rendezvous(nnodes=nnodes, node_rank=node_rank, endpoint=rdzv_endpoint)
    result = train(cfg, app.workspace, run_name, rdzv, cluster=app.config.cluster)
    click.echo(report.result_line(cfg, result))
    if app.config.cluster.engine == "ray":
        from distml.train.candidates import placement_line

        where = placement_line(result.run_dir)  # which node ran each rank (placement.json)
        if where:
            click.echo(f"placement: {where}")


def _train_candidates(app: AppContext, spec: str, prefix: str | None) -> None:
    from datetime import datetime

    from distml.errors import UsageError
    from distml.train.candidates import run_candidates, summarise

    if spec == "config":
        if not app.config.candidates:
            raise UsageError("--candidates config, but the config has no [[candidates]] tables")
        tables = list(app.config.candidates)
    else:
        tables = [{"model": m.strip()} for m in spec.split(",") if m.strip()]
        if not tables:
            raise UsageError("--candidates needs at least one model", hint="e.g. --candidates cnn,cnn-dropout")
    # The command line's [train] options win over each candidate's table.
    configs = app.config.candidate_configs(tables, app.given_in("train"))
    prefix = prefix or f"candidates-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    jobs = run_candidates(configs, app.workspace, prefix, cluster=app.config.cluster)
    summarise(jobs)
    for line in report.failed_lines(jobs):
        click.echo(line, err=True)
    click.echo(report.candidates_line(jobs))
