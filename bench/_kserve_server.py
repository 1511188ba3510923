"""Baseline for bench/serve.py: KServe's own Python model server (``kserve==0.21.0``) serving a distml artifact.

This is "what a KServe user would write" for the same ``model.onnx`` that ``distml serve`` serves: a
``kserve.Model`` subclass that runs the graph with ONNX Runtime (1 intra-op thread, CPU), served by
``kserve.ModelServer``. Nothing is tuned beyond ``intra_op_num_threads=1``.

Run it with the KServe venv's python (bench/_kserve_env.sh creates it and prints its path), not with .venv:

    .venv-kserve/bin/python bench/_kserve_server.py --model-dir DIR --port 18080 [--workers 1]

Endpoints (``NAME`` is model.json's ``name``):

- V1 ``POST /v1/models/NAME:predict`` with ``{"instances": [{"b64": "<base64 PNG>"}, ...]}`` and
  ``Content-Type: application/json`` (KServe hands any other content type, e.g. curl -d's form default, to the
  model as raw bytes) -> ``{"predictions": [{"class_id", "label", "probabilities"}, ...]}``.
- V2 ``POST /v2/models/NAME/infer`` with one UINT8 input tensor ``[N, H, W, C]`` (JSON ``data``, flat or nested)
  -> one output ``probabilities`` FP32 ``[N, classes]``.

Host. KServe 0.21 does not let you choose the host: ``RESTServer`` hard-codes ``uvicorn.Config(host="0.0.0.0")``
(and the gRPC server listens on ``[::]:8081``). ``ModelServer`` has no host argument and no ``--host`` flag.
This script therefore patches that one constant, ``--host`` (default 127.0.0.1), which is its only departure from
stock KServe; ``--host 0.0.0.0`` gives KServe's own behaviour. gRPC is off (``--enable_grpc true`` turns it on),
so only the HTTP port is opened.

Logging: KServe's defaults (level from ``KSERVE_LOGLEVEL``, default INFO). At INFO every inference request writes
four lines: uvicorn's access line (stdout), and on stderr a ``kserve.trace`` line with preprocess/predict/postprocess
ms (``--enable_latency_logging``, default true) and two ``kserve.trace`` lines from KServe's timing middleware (wall
and CPU time of the route). A 4xx/5xx also logs a full traceback at ERROR. Redirect them (as a benchmark should)
rather than let a terminal slow the server. (fastapi also warns once per process that ORJSONResponse is deprecated.)

KServe parses ``sys.argv`` itself when ``kserve`` is imported (its module-level parser), so its own flags such as
``--enable_latency_logging false`` or ``--event-loop asyncio`` also work here; the parser below extends it.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
from pathlib import Path
from typing import Any

import kserve
import numpy as np
import onnxruntime as ort
from kserve import InferOutput, InferRequest, InferResponse, model_server
from kserve.errors import InvalidInput
from kserve.protocol.rest import server as rest_server
from kserve.utils.utils import generate_uuid
from PIL import Image


class OnnxImageClassifier(kserve.Model):  # type: ignore[misc]
    """A distml artifact (``model.onnx`` + ``model.json``) behind KServe's V1 and V2 endpoints."""

    def __init__(self, model_dir: Path):
        card = json.loads((model_dir / "model.json").read_text())
        super().__init__(card["name"])
        self.model_dir = model_dir
        self.class_names: list[str] = list(card["class_names"])
        self.height, self.width, self.channels = (int(d) for d in card["input"]["shape"][1:])
        self.session: Any = None
        self.load()

    def load(self) -> bool:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = ort.InferenceSession(
            str(self.model_dir / "model.onnx"), options, providers=["CPUExecutionProvider"]
        )
        self.ready = True
        return self.ready

    # With --workers N > 1 KServe spawns N processes and pickles the model into each; an ONNX Runtime session
    # cannot be pickled, so each worker loads its own.
    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "session": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.load()

    def _decode_png(self, instance: Any) -> np.ndarray:
        if not isinstance(instance, dict) or "b64" not in instance:
            raise InvalidInput('each instance must be {"b64": "<base64 PNG>"}')
        image = Image.open(io.BytesIO(base64.b64decode(instance["b64"]))).convert("L" if self.channels == 1 else "RGB")
        array = np.asarray(image, dtype=np.uint8)
        if array.ndim == 2:
            array = array[:, :, None]
        if array.shape != (self.height, self.width, self.channels):
            raise InvalidInput(f"image is {array.shape}, the model takes {(self.height, self.width, self.channels)}")
        return array

    def predict(self, payload: dict[str, Any] | InferRequest, headers: dict[str, str] | None = None) -> Any:
        if isinstance(payload, InferRequest):  # V2: a UINT8 tensor N x H x W x C
            tensor = payload.inputs[0]
            if tensor.datatype != "UINT8":
                raise InvalidInput(f"input {tensor.name!r} must be UINT8, got {tensor.datatype}")
            images = tensor.as_numpy().reshape(-1, self.height, self.width, self.channels)
        else:  # V1: {"instances": [{"b64": ...}, ...]}
            if not isinstance(payload, dict):  # KServe passes non-JSON content types through as raw bytes
                raise InvalidInput("send the V1 request as JSON (Content-Type: application/json)")
            instances = payload.get("instances")
            if not isinstance(instances, list) or not instances:
                raise InvalidInput('expected {"instances": [{"b64": "<base64 PNG>"}, ...]}')
            images = np.stack([self._decode_png(instance) for instance in instances])

        probabilities = self.session.run(["probabilities"], {"images": images})[0]

        if isinstance(payload, InferRequest):
            output = InferOutput(name="probabilities", shape=list(probabilities.shape), datatype="FP32")
            output.set_data_from_numpy(probabilities, binary_data=payload.use_binary_outputs)
            return InferResponse(
                # as kserve.utils.get_predict_response does: V2 makes "id" optional in requests, required in responses
                response_id=payload.id or generate_uuid(),
                model_name=self.name,
                infer_outputs=[output],
                use_binary_outputs=payload.use_binary_outputs,
            )
        class_ids = probabilities.argmax(axis=1)
        return {
            "predictions": [
                {"class_id": int(c), "label": self.class_names[c], "probabilities": p.tolist()}
                for c, p in zip(class_ids, probabilities, strict=True)
            ]
        }


def _bind_host(host: str) -> None:
    """Make KServe's REST server listen on ``host`` instead of its hard-coded 0.0.0.0 (see the module docstring).

    Patched on the class, so the single-process and the ``--workers N`` server (which binds in the parent) both get it.
    """
    stock_init = rest_server.RESTServer.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        stock_init(self, *args, **kwargs)
        self.config.host = host  # uvicorn reads it when it binds, which is later

    rest_server.RESTServer.__init__ = init


def main() -> None:
    parser = argparse.ArgumentParser(parents=[model_server.parser], description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, required=True, help="distml artifact folder (model.onnx, model.json)")
    parser.add_argument("--port", type=int, default=8080, help="HTTP port")
    parser.add_argument("--host", default="127.0.0.1", help="listen address (stock KServe: 0.0.0.0)")
    parser.set_defaults(enable_grpc=False)
    args, _ = parser.parse_known_args()

    _bind_host(args.host)
    model = OnnxImageClassifier(args.model_dir)
    kserve.ModelServer(http_port=args.port, workers=args.workers, enable_grpc=args.enable_grpc).start([model])


if __name__ == "__main__":
    main()
