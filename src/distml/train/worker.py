"""Entry point of one training process under torchrun: ``python -m distml.train.worker RUN_DIR``.

Each rank leaves a marker in ``RUN_DIR/status/``: ``rank-N.done`` after it finished and wrote its results, or
``rank-N.failed`` with the error. The launcher trusts the markers over torchrun's exit code, because gloo
sometimes aborts a process *after* a clean ``destroy_process_group()`` (issue 4, item 9), while a real failure
leaves no ``done`` marker and is never hidden.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
import warnings
from datetime import timedelta
from pathlib import Path

from distml.errors import DistmlError
from distml.files import write_atomic


def main(argv: list[str]) -> int:
    import torch.distributed as dist

    from distml.train.dist import context_from_env, init_distributed
    from distml.train.job import Job
    from distml.train.loop import run

    # DDP warns once per worker for the seed CNNs: mkldnn's conv backward on CPU gives the first conv's weight
    # gradient [32, 1, 3, 3] the strides (9, 1, 3, 1) where the bucket view has (9, 9, 3, 1). Both describe the
    # same memory layout (the differing stride is of a size-1 dimension); DDP copies those 288 values into the
    # bucket each step instead of aliasing them. Harmless and not the user's to fix, so not shown.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    run_dir = Path(argv[0])
    ctx = context_from_env()
    status = run_dir / "status"
    status.mkdir(parents=True, exist_ok=True)
    # Markers describe the latest attempt only: a restarted worker clears what its predecessor left.
    for stale in (status / f"rank-{ctx.rank}.failed", status / f"rank-{ctx.rank}.done"):
        stale.unlink(missing_ok=True)
    write_atomic(status / f"rank-{ctx.rank}.pid", f"{os.getpid()}\n".encode())  # for operators (and the fault test)
    try:
        job = Job.read(run_dir)
        if ctx.distributed:
            init_distributed(ctx, timeout=timedelta(minutes=10))
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
        return 1
    except Exception as exc:
        traceback.print_exc()
        write_atomic(status / f"rank-{ctx.rank}.failed", f"{type(exc).__name__}: {exc}".encode())
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
