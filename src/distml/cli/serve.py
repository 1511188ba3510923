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
    "log_mode drain_s access_log",
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

    \b
    Examples:
      distml serve
      distml serve models:/fashion-mnist-classifier/3 --port 9000 --workers 2
      distml serve ./model --log-file requests.jsonl
    """
    from distml.card import model_name_for
    from distml.serve.server import serve
    from distml.serve.source import resolve_source

    config = app.config.serve
    ref = model or config.model or f"models:/{model_name_for(app.config.train.dataset)}@champion"
    serve(config, resolve_source(ref, app.workspace.home), announce=lambda line: click.echo(line))
    click.echo("stopped")
