"""The distributed context: rank, world size and device, read from the environment in this one place.

torchrun sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE`` (and the rendezvous variables); everything else in the
training code receives a :class:`DistContext` and never reads the environment itself.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class DistContext:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str  # "gloo" on CPU, "nccl" on GPU
    restart: int = 0  # torchrun's restart count: 0 on the first attempt
    local_world_size: int = 1  # workers on this host
    job_id: str = "local"  # the same on every rank of one job: torchrun's run id and the store's port

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def context_from_env(environ: Mapping[str, str] | None = None) -> DistContext:
    """Build the context from torchrun's variables (a plain single process when they are absent)."""
    import torch

    env = os.environ if environ is None else environ
    rank = int(env.get("RANK", "0"))
    local_rank = int(env.get("LOCAL_RANK", "0"))
    world_size = int(env.get("WORLD_SIZE", "1"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    return DistContext(
        rank,
        local_rank,
        world_size,
        device,
        backend,
        restart=int(env.get("TORCHELASTIC_RESTART_COUNT", "0")),
        local_world_size=int(env.get("LOCAL_WORLD_SIZE", str(world_size))),
        job_id=f"{env.get('TORCHELASTIC_RUN_ID', 'local')}-{env.get('MASTER_PORT', '0')}",
    )


def init_distributed(ctx: DistContext, timeout: timedelta, environ: Mapping[str, str] | None = None) -> None:
    """Join the process group through a store namespaced by the restart attempt.

    With plain ``env://`` init, workers restarted by torchrun (``--max-restarts``) could read the gloo addresses
    that the previous attempt's workers left in the rendezvous store, and then hang or fail connecting to dead
    ports (seen here about one restart in two with torch 2.13). A prefix per attempt keeps attempts apart.
    """
    import torch
    import torch.distributed as dist

    if ctx.device.type == "cuda":
        torch.cuda.set_device(ctx.device)  # before NCCL creates its communicator on the current device
    env = os.environ if environ is None else environ
    agent_hosts_store = env.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    addr, port = env["MASTER_ADDR"], int(env["MASTER_PORT"])
    hosts_store = not agent_hosts_store and ctx.rank == 0
    store = dist.TCPStore(  # type: ignore[attr-defined]  # re-exported at runtime, not in the stubs
        addr,
        port,
        ctx.world_size,
        is_master=hosts_store,
        timeout=timeout,
        # TCPStore's server listens on every interface ("::"), whatever host it is given; the store has no
        # authentication. Given a socket already listening on MASTER_ADDR only, it serves on that instead: on
        # one host the launcher sets MASTER_ADDR to 127.0.0.1, so the store is not reachable from the network.
        master_listen_fd=_listen_on(addr, port) if hosts_store else None,
    )
    prefixed = dist.PrefixStore(f"distml/attempt-{ctx.restart}/", store)  # type: ignore[attr-defined]  # idem
    dist.init_process_group(ctx.backend, store=prefixed, rank=ctx.rank, world_size=ctx.world_size, timeout=timeout)


def _listen_on(addr: str, port: int) -> int:
    """A TCP socket listening on ``addr:port`` alone; its file descriptor is handed over to the caller."""
    family, kind, proto, _, sockaddr = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as TCPStore sets on its own sockets
        sock.bind(sockaddr)
        sock.listen(socket.SOMAXCONN)
    except BaseException:
        sock.close()
        raise
    return sock.detach()  # the store owns the descriptor from here on


def usable_cores() -> int:
    """Cores this process may run on (affinity-aware, so a container's CPU set is respected)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def gpu_count() -> int:
    """CUDA devices visible to this process. Without an NVIDIA driver it is 0 at once, without importing torch."""
    if not os.path.isdir("/proc/driver/nvidia/gpus"):
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def cuda_device_name() -> str:
    """The first visible CUDA device's name, or "none"; without an NVIDIA driver at once, without importing torch."""
    if not gpu_count():
        return "none"
    import torch

    return str(torch.cuda.get_device_name(0))


class RankLogger:
    """Prints on rank 0; on other ranks every method does nothing, so call sites never branch on rank."""

    def __init__(self, ctx: DistContext) -> None:
        self.enabled = ctx.is_main

    def info(self, message: str) -> None:
        if self.enabled:
            print(message, flush=True)
