"""The serving stage: ``distml serve``, a model server for KServe V1 and V2 (Open Inference Protocol).

- :mod:`distml.serve.app`: the steps every transport calls (``admit``, ``decode``, ``predict``, ``finish``; the
  :class:`~distml.serve.call.Call` they pass), readiness and draining;
- :mod:`distml.serve.rest`: the HTTP transport (routes, body limits, one error handler);
  :mod:`distml.serve.grpc_server`, :mod:`distml.serve.grpc_codec`: the gRPC one (V2's ``GRPCInferenceService``);
- :mod:`distml.serve.v1`, :mod:`distml.serve.v2`: the two protocols' bodies, parsed and encoded;
- :mod:`distml.serve.variants`, :mod:`distml.serve.fleet`: the served models (champion, canary, shadow) and what
  changes them; :mod:`distml.serve.follow` (the alias, hot swap), :mod:`distml.serve.rollout` (judging the
  canary), :mod:`distml.serve.shadow`;
- :mod:`distml.serve.codec`: images and pixel arrays -> the model's ``uint8`` input, with pixel limits;
- :mod:`distml.serve.batcher`: the one dynamic batcher both protocols share;
- :mod:`distml.serve.model`: the ONNX Runtime session over a model artifact;
- :mod:`distml.serve.metrics`, :mod:`distml.serve.reqlog`: Prometheus metrics, CloudEvents request logging;
- :mod:`distml.serve.server`: uvicorn, worker processes and graceful shutdown.

Nothing on this path imports torch (MLflow only when a server follows an alias): a serving container needs
ONNX Runtime, NumPy and Pillow.
"""

from distml.serve.app import ServeApp
from distml.serve.server import build_app, serve

__all__ = ["ServeApp", "build_app", "serve"]
