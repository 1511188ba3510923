"""``distml serve``: the model server (KServe V1 + V2 over HTTP, dynamic batching, metrics, request logs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from pydantic import ValidationError

from distml.cli.main import AppContext, pass_app
from distml.config import ServeConfig, _config_error


@click.command("serve")
@click.argument("model", required=False)
@click.option("--host", help="Interface to listen on; 0.0.0.0 for all. [default: 127.0.0.1]")
@click.option("--port", type=int, help="[default: 8080; 0 picks a free one]")
@click.option("--workers", type=int, help="Server processes sharing the port. [default: 1]")
@click.option("--threads", type=int, help="ONNX Runtime intra-op threads per worker. [default: 1]")
@click.option("--max-batch-size", type=int, help="Images per model run, across requests. [default: 32]")
@click.option(
    "--max-batch-delay-ms",
    type=float,
    help="Longest a batch waits for requests already on their way (never when none are). [default: 2]",
)
@click.option("--max-queue", type=int, help="Places for requests admitted and waiting for the model. [default: 64]")
@click.option(
    "--max-queue-wait-ms",
    type=float,
    help="With the queue full, a request may still get a place this long after it came. [default: 100]",
)
@click.option(
    "--max-loop-lag-ms",
    type=float,
    help="With more requests in than --max-queue, refuse new ones while the event loop runs this late. [default: 50]",
)
@click.option(
    "--refusal-delay-ms",
    type=float,
    help="A refused request gets its 503 this late, give or take half. [default: 1000]",
)
@click.option("--request-timeout-s", type=float, help="Longest a request waits for its answer (503). [default: 30]")
@click.option("--max-body-bytes", type=int, help="Request body limit (413). [default: 16 MiB]")
@click.option("--max-instances", type=int, help="Images per request (413). [default: 256]")
@click.option(
    "--max-request-pixels", type=int, help="Decoded pixels per request, from image headers (413). [default: 32 Mi]"
)
@click.option("--decode-timeout-s", type=float, help="Longest one request's images may decode (503). [default: 5]")
@click.option(
    "--max-inflight-bytes", type=int, help="Bodies being read or queued, all together (503). [default: 256 MiB]"
)
@click.option("--max-header-bytes", type=int, help="Request line + headers (431). [default: 64 KiB]")
@click.option("--header-timeout-s", type=float, help="Headers must arrive within this (408). [default: 5]")
@click.option("--body-timeout-s", type=float, help="The body must arrive within this (408). [default: 15]")
@click.option("--idle-timeout-s", type=float, help="Close an idle keep-alive connection after this. [default: 5]")
@click.option("--log-url", help="Send each request and response as a CloudEvent to this HTTP endpoint.")
@click.option("--log-file", type=click.Path(path_type=Path, dir_okay=False), help="...or append them to this JSONL.")
@click.option("--log-mode", type=click.Choice(["all", "request", "response"]), help="[default: all]")
@click.option("--drain-s", type=float, help="After SIGTERM, answer not-ready this long before stopping. [default: 0]")
@click.option("--access-log", is_flag=True, default=None, help="One log line per request (costs throughput).")
@pass_app
def serve_cmd(app: AppContext, model: str | None, **options: Any) -> None:
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
    from distml.registry.export import model_name_for
    from distml.registry.registry import resolve_model
    from distml.serve.server import serve

    overrides = {k: v for k, v in options.items() if v is not None}
    try:
        config = ServeConfig.model_validate({**app.config.serve.model_dump(), **overrides})
    except ValidationError as exc:
        raise _config_error(exc, source="command line") from None
    ref = model or config.model or f"models:/{model_name_for(app.config.train.dataset)}@champion"
    artifact = resolve_model(ref, app.workspace)
    serve(config, artifact.path, announce=lambda line: click.echo(line))
    click.echo("stopped")
