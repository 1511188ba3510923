"""One inference request as the transport-neutral steps see it (:class:`~distml.serve.app.ServeApp`'s admit,
decode, predict, finish), whichever protocol brought it: REST (:mod:`~distml.serve.rest`) or gRPC."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Call:
    """One inference request, from its arrival through :meth:`~distml.serve.app.ServeApp.admit` to ``finish``."""

    protocol: str  # "v1" | "v2" | "grpc"
    request_id: str
    route_key: str  # the sticky key: the route_header's value, else request_id
    started: float  # time.perf_counter() at arrival
    arrived: float  # time.time() at arrival
    version: str | None = None  # a request for one version (V2 .../versions/V): the variant serving it answers
    counted: bool = False  # counted in ServeApp.active (by admit, or earlier by the transport); finish uncounts
    answered: float = 0.0  # perf_counter() when predict returned: encode time is measured from here
