"""Peer for bench/serve_peers.py: LitServe (``litserve==0.2.19``) serving a distml artifact's ``model.onnx``.

What a LitServe user would write for the same model: a ``LitAPI`` that runs the graph with ONNX Runtime (1
intra-op thread, CPU) behind ``POST /predict``. The request is the V2 body bench/serve.py sends to distml
(``{"id": ..., "inputs": [{"name": "images", "shape": [1, 28, 28, 1], "datatype": "UINT8", "data": [784
ints]}]}``), byte for byte; the answer is ``{"class_id": C, "probabilities": [10 floats]}``.

LitServe's defaults otherwise: one inference worker process behind one API server process (uvicorn), joined
by multiprocessing queues, ``max_batch_size=1``. ``--max-batch-size N --batch-timeout S`` turns its batching on
(``decode_request`` gives one image, LitServe stacks them with ``numpy.stack``, ``unbatch`` splits the rows).
Only ``host`` (loopback, not LitServe's 0.0.0.0), ``accelerator="cpu"``, ``devices=1`` and no generated client
file differ from ``LitServer(api).run()``.

Run with the LitServe venv's python (bench/_peer_env.sh litserve creates it and prints its path):

    .venv-litserve/bin/python bench/peers/litserve_app.py --model-dir DIR --port 8000 [--max-batch-size 32]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import litserve as ls  # type: ignore[import-not-found]  # only in .venv-litserve, not in .venv where mypy runs
import numpy as np
import onnxruntime as ort


class OnnxImageClassifier(ls.LitAPI):  # type: ignore[misc]
    """One UINT8 image per request in, its class and probabilities out."""

    def __init__(self, model_dir: Path, max_batch_size: int, batch_timeout: float) -> None:
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout)
        self.model_dir = model_dir
        card = json.loads((model_dir / "model.json").read_text())
        self.shape = tuple(int(d) for d in card["input"]["shape"][1:])  # H, W, C
        self.batched = max_batch_size > 1

    def setup(self, device: str) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = ort.InferenceSession(
            str(self.model_dir / "model.onnx"), options, providers=["CPUExecutionProvider"]
        )

    # No annotation on ``request``, as in LitServe's examples: LitServe reads it to build the endpoint, and without
    # one it hands decode_request the parsed JSON body (an annotation would make FastAPI expect a query parameter).
    def decode_request(self, request):  # type: ignore[no-untyped-def]
        tensor = request["inputs"][0]
        return np.asarray(tensor["data"], dtype=np.uint8).reshape(self.shape)

    def predict(self, x: np.ndarray) -> Any:
        images = x if self.batched else x[None]  # batched: LitServe already stacked N images
        probabilities = self.session.run(["probabilities"], {"images": images})[0]
        return probabilities if self.batched else probabilities[0]

    def encode_response(self, output: np.ndarray) -> dict[str, Any]:
        return {"class_id": int(output.argmax()), "probabilities": output.tolist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--max-batch-size", type=int, default=1, help="LitServe's default: 1 (no batching)")
    parser.add_argument("--batch-timeout", type=float, default=0.0, help="seconds a batch waits to fill")
    args = parser.parse_args()
    api = OnnxImageClassifier(args.model_dir, args.max_batch_size, args.batch_timeout)
    server = ls.LitServer(api, accelerator="cpu", devices=1)
    server.run(host=args.host, port=args.port, generate_client_file=False)


if __name__ == "__main__":
    main()
