"""The Ray cluster that jobs run on: connect once per process, and list its nodes.

A shared leaf like :mod:`distml.tracking`: it imports Ray only inside its functions, so importing it (or the
config, or the server) never loads Ray. Everything that touches Ray's driver API goes through here; the token
comes from Ray's own lookup (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``), never from
distml's command line, where ``ps`` would show it.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import signal
import socket
import types
from dataclasses import dataclass
from pathlib import Path

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
    _check_token(ray, target, address, timeout_s)
    _require_local_node(address)
    logger = logging.getLogger("ray")
    level = logger.level
    logger.setLevel(logging.WARNING)  # Ray's INFO lines about connecting are noise in a distml command
    # ray.init replaces the process's SIGTERM handler with sys.exit; distml's own (a candidate's or trial's job
    # turns SIGTERM into an interrupt that stops its workers and keeps their checkpoint) must stay in force.
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        ray.init(address=target, logging_level=logging.WARNING, log_to_driver=True, namespace="distml")
    except ray.exceptions.AuthenticationError:
        raise _token_error(address) from None
    except (ConnectionError, RuntimeError, TimeoutError, ValueError) as exc:
        raise ClusterError(_connect_failure(address, exc)) from None
    finally:
        logger.setLevel(level)
        if sigterm is not None:
            with contextlib.suppress(ValueError):  # not the main thread: ray.init replaced nothing there
                signal.signal(signal.SIGTERM, sigterm)


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


def _check_token(ray: types.ModuleType, target: str, address: str, timeout_s: float) -> None:
    """Ask the cluster's GCS one question with this client's token, to say at once what ``ray.init`` says late.

    Given a wrong token, or none, ``ray.init`` retries for about 20 s, printing a warning a second, and then
    fails without saying why.
    """
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "token" and not _has_token():
        raise _token_error(address)  # Ray's client aborts the process (a failed check in its C++) in this case
    try:
        client = importlib.import_module("ray._raylet").GcsClient(address=target, cluster_id=None)
        client.internal_kv_get(b"distml-connect-probe", None, timeout=timeout_s)
    except ray.exceptions.AuthenticationError:
        raise _token_error(address) from None
    except Exception as exc:  # a timeout, or something that is not a Ray GCS at that port
        raise ClusterError(f"the Ray cluster at {address} did not answer: {_first_line(exc)}") from None


def _token_error(address: str) -> ClusterError:
    """The cluster refused this client: its token is wrong, or it has none (then token mode may be off too)."""
    if _has_token():
        return ClusterError(
            f"the Ray cluster at {address} refused this client's token",
            hint="set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH to the cluster's token, or write it to ~/.ray/auth_token",
        )
    return ClusterError(
        f"the Ray cluster at {address} needs a token and this client has none",
        hint="set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token)",
    )


def _has_token() -> bool:
    """Whether Ray's lookup would find a token: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    return Path(path).is_file()


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
    text = _first_line(exc)
    if "token" in text.lower():
        return str(_token_error(address))
    return f"cannot connect to the Ray cluster at {address}: {text}"


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
