"""One training process: ``python -m distml.train.worker RUN_DIR`` under torchrun, or :func:`run_rank` under Ray.

Each rank leaves a marker in ``RUN_DIR/status/``: ``rank-N.done`` after it finished and wrote its results, or
``rank-N.failed`` with the error. The launcher trusts the markers over torchrun's exit code, because gloo
sometimes aborts a process *after* a clean ``destroy_process_group()`` (issue 4, item 9), while a real failure
leaves no ``done`` marker and is never hidden. Ray Train's per-worker function
(:mod:`distml.train.ray_launch`) runs the same :func:`run_rank`, so both launchers read the same markers.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
import warnings
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from distml.errors import DistmlError
from distml.files import write_atomic

if TYPE_CHECKING:
    from distml.train.dist import DistContext


def main(argv: list[str]) -> int:
    """torchrun's entry point: this rank joins the process group itself (see :func:`init_distributed`)."""
    from distml.train.dist import context_from_env, init_distributed

    ctx = context_from_env()

    def join() -> None:
        if ctx.distributed:
            init_distributed(ctx, timeout=timedelta(minutes=10))

    return 0 if run_rank(Path(argv[0]), ctx, join=join) is None else 1


def run_rank(run_dir: Path, ctx: DistContext, *, join: Callable[[], None] | None) -> str | None:
    """Train rank ``ctx.rank`` of the job in ``run_dir``; None when it finished, else the one-line reason.

    ``join`` creates the process group (and this function destroys it at the end); None means the launcher has
    created it and will destroy it (Ray Train). The reason is also the rank's ``failed`` marker.
    """
    import torch.distributed as dist

    from distml.train.job import Job
    from distml.train.loop import run

    # DDP warns once per worker for the seed CNNs: mkldnn's conv backward on CPU gives the first conv's weight
    # gradient [32, 1, 3, 3] the strides (9, 1, 3, 1) where the bucket view has (9, 9, 3, 1). Both describe the
    # same memory layout (the differing stride is of a size-1 dimension); DDP copies those 288 values into the
    # bucket each step instead of aliasing them. Harmless and not the user's to fix, so not shown.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    status = run_dir / "status"
    status.mkdir(parents=True, exist_ok=True)
    # Markers describe the latest attempt only: a restarted worker clears what its predecessor left.
    for stale in (status / f"rank-{ctx.rank}.failed", status / f"rank-{ctx.rank}.done"):
        stale.unlink(missing_ok=True)
    write_atomic(status / f"rank-{ctx.rank}.pid", f"{os.getpid()}\n".encode())  # for operators (and the fault test)
    try:
        job = Job.read(run_dir)
        if join is not None:
            join()
        result = run(job, ctx)
        if ctx.is_main:
            write_atomic(run_dir / "result.json", (json.dumps(result, indent=2) + "\n").encode())
        if ctx.distributed:
            dist.barrier()  # every rank has finished its work before any marks itself done
        write_atomic(status / f"rank-{ctx.rank}.done", b"ok\n")
    except DistmlError as exc:
        message = f"{exc.message}; {exc.hint}" if exc.hint else exc.message
        print(f"error: rank {ctx.rank}: {message}", file=sys.stderr, flush=True)
        write_atomic(status / f"rank-{ctx.rank}.failed", message.encode())
        return message
    except Exception as exc:
        traceback.print_exc()
        message = f"{type(exc).__name__}: {exc}"
        write_atomic(status / f"rank-{ctx.rank}.failed", message.encode())
        return message
    finally:
        if join is not None and dist.is_initialized():
            dist.destroy_process_group()
    return None


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    finally:
        from distml._proc import skip_final_collection

        skip_final_collection()  # torchrun waits for every worker to end before it reports the job done
