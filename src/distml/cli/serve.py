"""``distml serve``: the model server (KServe V1 + V2 over HTTP, dynamic batching, metrics, request logs)."""

from __future__ import annotations

import click

from distml.cli.options import AppContext, config_options, pass_app


@click.command("serve")
@click.argument("model", required=False)
@config_options(
    "serve",
    "host port workers threads max_batch_size max_batch_delay_ms max_queue max_queue_wait_ms max_loop_lag_ms "
    "refusal_delay_ms request_timeout_s max_body_bytes max_instances max_request_pixels decode_timeout_s "
    "max_inflight_bytes max_header_bytes header_timeout_s body_timeout_s idle_timeout_s log_url log_file "
    "log_mode drain_s access_log grpc_port follow_s canary canary_percent route_header shadow rollback_window_s "
    "rollback_min_requests rollback_error_margin rollback_latency_ratio rollback_latency_floor_ms "
    "rollback_alias",
)
@pass_app
def serve_cmd(app: AppContext, model: str | None) -> None:
    """Serve MODEL (a model folder or models:/NAME@ALIAS; default: the dataset's champion) over HTTP.

    \b
    KServe V1:  POST /v1/models/NAME:predict  {"instances": [{"b64": "<PNG/JPEG>"} | pixels, ...]}
    V2 (OIP):   POST /v2/models/NAME/infer    BYTES images or UINT8/FP32 pixels; binary extension too
    Also: GET /v2, /v2/health/live, /v2/health/ready, /v2/models/NAME, /v1/models, /metrics.

    Requests from both protocols share one dynamic batcher. Stop with Ctrl-C or SIGTERM (graceful).

    A registry model is checked before the server starts: its model.onnx and model.json must have the sha256
    its version recorded when it was registered, and the version must have passed the ONNX parity check;
    otherwise serve refuses to start (exit 1).

    Served from models:/NAME@ALIAS, the server follows the alias (every --follow-s seconds; 0: never): when it
    moves (promote, rollback, a pipeline registering a new champion) the new version is verified the same way,
    warmed up and swapped in without a restart; requests in flight finish on the old one. A version that fails
    is not served (logged, distml_swaps_total{outcome="refused"}). Every answer names its version
    (x-model-version header, V2 model_version).

    --canary MODEL sends --canary-percent of requests to a second model (the same model's other version), by a
    sticky key: the --route-header's value, else the request id, so one client stays on one variant. If, over
    --rollback-window-s, its error rate exceeds the champion's by --rollback-error-margin or its p99 latency is
    over --rollback-latency-ratio times the champion's (and --rollback-latency-floor-ms above it), its share
    drops to 0 (logged, distml_rollbacks_total) and, with --rollback-alias, that registry alias is moved back to
    the champion's version. --shadow MODEL runs a model on every request off the answer path and records its
    top-1 agreement (distml_shadow_images_total).

    \b
    Examples:
      distml serve
      distml serve models:/fashion-mnist-classifier/3 --port 9000 --workers 2
      distml serve ./model --log-file requests.jsonl
      distml serve --canary models:/fashion-mnist-classifier@challenger --canary-percent 5 --rollback-alias challenger
    """
    from distml.card import model_name_for
    from distml.serve.follow import check_rollout
    from distml.serve.server import serve
    from distml.serve.source import resolve_source

    config = app.config.serve
    ref = model or config.model or f"models:/{model_name_for(app.config.train.dataset)}@champion"
    source = resolve_source(ref, app.workspace.home)
    for line in check_rollout(config, source, app.given_in("serve")):
        click.echo(line)
    serve(config, source, announce=lambda line: click.echo(line))
    click.echo("stopped")
