"""Gradient all-reduce through shared memory, for CPU workers that all run on one host.

gloo moves every gradient bucket over TCP on the loopback interface, and each of its collectives wakes gloo's
I/O threads. For the seed CNN (1.4 MB of gradients, two DDP buckets) that cost about 3 ms of a 8.6 ms step on
the 2-core machine, while the same two workers without any all-reduce ran as fast as one process with two
threads (measured in ``docs/performance.md``). Workers on one host can share the memory instead:

1. each rank divides its bucket by W and writes it into its own slot of a segment in ``/dev/shm``;
2. it raises its flag to the bucket's sequence number and waits until every rank's flag is there (a spin
   barrier in the same segment: microseconds, against a millisecond or more for a gloo barrier under load);
3. it sums the W slots, in rank order, into its own gradient.

Every rank sums the same slots in the same order, so all get the same result, and for W=2 it is bit-equal to
gloo's ``a + b``. Two sets of slots alternate, so a rank writing bucket ``k + 2`` cannot overwrite what a
slower rank still reads for bucket ``k``: every rank has finished reading ``k`` before it raises its flag for
``k + 1``. The ordering argument (slot writes are seen before the flag write; the flag is read before the
slots) holds on x86-64's memory model, so elsewhere :func:`available` says no and gloo does the work.
"""

# No ``from __future__ import annotations`` here: DDP inspects the hook's annotations at registration and wants
# the real ``dist.GradBucket`` and ``Future`` classes, not strings.
import mmap
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from distml.errors import TrainingError
from distml.train.dist import DistContext

SHM_DIR = Path("/dev/shm")  # noqa: S108 - the POSIX shared-memory filesystem, not a temp folder
_FLAG_STRIDE = 8  # int64s per flag: one 64-byte cache line each, so ranks do not write to a shared line
_SPINS_BEFORE_YIELD = 200
# A peer is usually a few microseconds to a few milliseconds behind: yield the core for up to _YIELD_FOR_S, then
# sleep, each time for a fraction of the time waited so far (at most 10% late, at most _MAX_SLEEP_S), so a rank
# that waits long (a checkpoint on rank 0, a hung peer) stops burning a core.
_YIELD_FOR_S = 0.001
_MIN_SLEEP_S = 50e-6
_MAX_SLEEP_S = 0.01
WAIT_TIMEOUT_S = 600.0  # as the process group's: a peer that never arrives has died, and torchrun ends the job


def available(ctx: DistContext) -> bool:
    """Whether this job can use it: CPU, more than one worker, every worker on this host (x86-64, /dev/shm)."""
    return (
        ctx.device.type == "cpu"
        and ctx.distributed
        and ctx.local_world_size == ctx.world_size
        and platform.machine().lower() in ("x86_64", "amd64")
        and SHM_DIR.is_dir()
        and os.access(SHM_DIR, os.W_OK)
    )


@dataclass
class SharedGradients:
    """The mapped segment: W flags, then ``2 x W`` slots of ``capacity`` float32 values."""

    rank: int
    world_size: int
    capacity: int
    flags: np.ndarray  # W, int64: the last bucket each rank has written (every _FLAG_STRIDE-th int64)
    slots: torch.Tensor  # 2 x W x capacity, float32
    _mapping: mmap.mmap
    buckets: int = field(default=0)

    @classmethod
    def open(cls, ctx: DistContext, name: str, capacity: int) -> "SharedGradients":
        """Collective: local rank 0 creates the segment, every rank maps it, then its name is removed.

        Once unlinked the memory lives exactly as long as the workers' mappings, so nothing is left in
        ``/dev/shm`` whether the job ends or a worker is killed.
        """
        path = SHM_DIR / name
        size = segment_bytes(ctx.world_size, capacity)
        error = None
        if ctx.local_rank == 0:
            try:
                _create_segment(path, size)
            except TrainingError as exc:
                error = exc
        # Every rank learns whether the segment exists (this is also the barrier before mapping it).
        created = torch.tensor([0 if error else 1], dtype=torch.int32)
        dist.all_reduce(created, op=dist.ReduceOp.MIN)
        if error is not None:
            raise error
        if not created.item():
            raise TrainingError("local rank 0 could not create the shared-memory gradient segment (see its error)")
        fd = os.open(path, os.O_RDWR)
        try:
            mapping = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        dist.barrier()
        if ctx.local_rank == 0:
            path.unlink(missing_ok=True)
        return cls.on(mapping, ctx.rank, ctx.world_size, capacity)

    @classmethod
    def on(cls, mapping: mmap.mmap, rank: int, world_size: int, capacity: int) -> "SharedGradients":
        """Rank ``rank``'s view of a mapped segment of :func:`segment_bytes` (zero-filled when new)."""
        flag_bytes = world_size * _FLAG_STRIDE * 8
        flags = np.frombuffer(mapping, dtype=np.int64, count=world_size * _FLAG_STRIDE)[::_FLAG_STRIDE]
        slots = torch.frombuffer(mapping, dtype=torch.float32, offset=flag_bytes).view(2, world_size, capacity)
        return cls(rank, world_size, capacity, flags, slots, mapping)

    def allreduce_mean_(self, grad: torch.Tensor) -> torch.Tensor:
        """Replace ``grad`` (float32, contiguous) on every rank with the mean over the ranks, in place."""
        n = grad.numel()
        if n > self.capacity or grad.dtype != torch.float32:
            raise ValueError(f"bucket of {n} {grad.dtype} values does not fit {self.capacity} float32 slots")
        slots = self.slots[self.buckets % 2, :, :n]
        self.buckets += 1
        grad.div_(self.world_size)  # as DDP's own hook does: divide first, then sum
        slots[self.rank].copy_(grad.view(-1))
        self._barrier(self.buckets)
        torch.sum(slots, dim=0, out=grad.view(-1))
        return grad

    def _barrier(self, seq: int) -> None:
        """Raise this rank's flag to ``seq`` and wait for every flag: spin briefly, yield the core, then sleep."""
        flags = self.flags
        flags[self.rank] = seq
        for _ in range(_SPINS_BEFORE_YIELD):
            if int(flags.min()) >= seq:
                return
        start = time.monotonic()
        while int(flags.min()) < seq:
            waited = time.monotonic() - start
            if waited < _YIELD_FOR_S:
                os.sched_yield()  # a waiting rank gives its core to one that is still computing
                continue
            if waited > WAIT_TIMEOUT_S:
                raise TrainingError(f"rank {self.rank} waited {WAIT_TIMEOUT_S:.0f} s for the other workers")
            time.sleep(min(_MAX_SLEEP_S, max(_MIN_SLEEP_S, waited / 10)))


def segment_bytes(world_size: int, capacity: int) -> int:
    """Size of the segment for ``world_size`` ranks and buckets of up to ``capacity`` float32 values."""
    return world_size * _FLAG_STRIDE * 8 + 2 * world_size * capacity * 4


def _create_segment(path: Path, size: int) -> None:
    """Create the zero-filled segment file with every page reserved, or raise TrainingError saying why not.

    Creating it with ftruncate() alone only sets its length: tmpfs hands out pages when they are first written,
    and a write past its free space is a SIGBUS that kills the worker mid-step. Reserving them all here turns a
    /dev/shm too small for the job (a container's default is 64 MB) into an error before training starts.
    """
    path.unlink(missing_ok=True)  # a crashed earlier attempt under the same name
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.posix_fallocate(fd, 0, size)  # also sets the length; the pages read as zeros: every flag starts at 0
    except OSError as exc:
        path.unlink(missing_ok=True)
        raise TrainingError(
            f"cannot reserve {size / 2**20:.1f} MiB in {SHM_DIR} for the shared-memory all-reduce: {exc.strerror}",
            hint="give the workers more shared memory (docker run --shm-size, a memory-backed emptyDir at "
            '/dev/shm on Kubernetes), or set cpu_allreduce = "gloo" in the [train] config',
        ) from None
    finally:
        os.close(fd)


def _hook(
    state: SharedGradients,
    bucket: dist.GradBucket,  # type: ignore[name-defined]  # exported at runtime, missing from the stubs
) -> torch.futures.Future[torch.Tensor]:
    future: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    future.set_result(state.allreduce_mean_(bucket.buffer()))
    return future


def install(ddp: torch.nn.parallel.DistributedDataParallel, ctx: DistContext, name: str) -> SharedGradients:
    """Make ``ddp`` all-reduce its gradient buckets through shared memory (see :func:`available`)."""
    capacity = sum(p.numel() for p in ddp.module.parameters() if p.requires_grad)
    state = SharedGradients.open(ctx, name, capacity)
    ddp.register_comm_hook(state, _hook)
    return state
