"""The Ray cluster that jobs run on: connect once per process, and list its nodes.

A shared leaf like :mod:`distml.tracking`: it imports Ray only inside its functions, so importing it (or the
config, or the server) never loads Ray. Everything that touches Ray's driver API goes through here; the token
comes from Ray's own lookup (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``), never from
distml's command line, where ``ps`` would show it.
"""

from __future__ import annotations

import importlib
import logging
import socket
import types
from dataclasses import dataclass

from distml.errors import ClusterError, UsageError

INSTALL_HINT = "pip install 'distml[ray]'"


@dataclass(frozen=True)
class NodeInfo:
    """One alive node of the cluster, as Ray reports it."""

    node_id: str
    ip: str
    cpus: float
    gpus: float


def require_ray() -> types.ModuleType:
    """The ``ray`` module, or a one-line UsageError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise UsageError("Ray is not installed", hint=INSTALL_HINT) from None
    return ray


def connect(address: str, *, timeout_s: float = 10.0) -> None:
    """Connect this process to the Ray cluster at ``address`` (``auto`` or ``HOST:PORT``); once per process.

    Raises ClusterError naming the address when nothing answers there within ``timeout_s``, and a one-line
    ClusterError when the cluster refuses this client's token or the client has none.
    """
    ray = require_ray()
    if ray.is_initialized():
        return
    target = _find_local_cluster() if address == "auto" else address
    # Ray itself retries an unreachable address for about a minute; a plain TCP connection says it at once.
    _probe(target, address, timeout_s)
    _require_local_node(address)
    logger = logging.getLogger("ray")
    level = logger.level
    logger.setLevel(logging.WARNING)  # Ray's INFO lines about connecting are noise in a distml command
    try:
        ray.init(address=target, logging_level=logging.WARNING, log_to_driver=True, namespace="distml")
    except ray.exceptions.AuthenticationError:
        raise ClusterError(
            f"the Ray cluster at {address} refused this client's token",
            hint="set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH to the cluster's token, or write it to ~/.ray/auth_token",
        ) from None
    except (ConnectionError, RuntimeError, TimeoutError, ValueError) as exc:
        raise ClusterError(_connect_failure(address, exc)) from None
    finally:
        logger.setLevel(level)


def nodes() -> list[NodeInfo]:
    """The alive nodes of the cluster this process is connected to (:func:`connect` first)."""
    ray = require_ray()
    found = []
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        resources = node.get("Resources", {})
        found.append(
            NodeInfo(
                node_id=str(node["NodeID"]),
                ip=str(node["NodeManagerAddress"]),
                cpus=float(resources.get("CPU", 0.0)),
                gpus=float(resources.get("GPU", 0.0)),
            )
        )
    return found


def _find_local_cluster() -> str:
    """``auto``: the address of the cluster started with ``ray start`` on this host, or a ClusterError."""
    services = _ray_services()
    try:
        return str(services.canonicalize_bootstrap_address_or_die("auto"))
    except ConnectionError as exc:
        raise ClusterError(
            f"--ray auto found no Ray cluster on this host ({exc})",
            hint="start one with `ray start --head`, or pass --ray HOST:PORT of its head",
        ) from None


def _probe(target: str, address: str, timeout_s: float) -> None:
    """Fail within ``timeout_s`` when nothing listens at ``target``: Ray itself would retry for a minute."""
    host, _, port = target.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except (OSError, ValueError) as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else getattr(exc, "strerror", None) or str(exc)
        raise ClusterError(
            f"cannot reach the Ray cluster at {address}: {reason}",
            hint="check the head's address and port (its GCS port, 6379 by default) and that it is running",
        ) from None


def _require_local_node(address: str) -> None:
    """A Ray driver attaches to a node on its own host: say so at once, where Ray would look for one for a minute."""
    if not _ray_services().find_node_ids():
        raise ClusterError(
            f"this host runs no node of the Ray cluster at {address}; distml drives Ray jobs from a node of the "
            "cluster",
            hint=f"run the command on the head node, or join this host first: ray start --address={address}",
        )


def _ray_services() -> types.ModuleType:
    """Ray's address and process discovery (``ray._private.services``; Ray is pinned in the ``ray`` extra)."""
    return importlib.import_module("ray._private.services")


def _connect_failure(address: str, exc: BaseException) -> str:
    """One line for a failed ``ray.init``: Ray's own messages run to several lines of advice."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "token" in text.lower():
        return (
            f"the Ray cluster at {address} needs a token and this client has none (set RAY_AUTH_TOKEN or "
            "RAY_AUTH_TOKEN_PATH, or write it to ~/.ray/auth_token)"
        )
    return f"cannot connect to the Ray cluster at {address}: {text}"
