"""Processes: children that do not outlive the process that started them, and whether a pid is alive."""

from __future__ import annotations

import ctypes
import gc
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def _set_pdeathsig() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` for ``subprocess.Popen``: the child gets SIGTERM when its parent dies (Linux; else None).

    Without it a SIGKILLed ``distml run`` or ``distml train`` would leave torchrun and its workers training on,
    writing into a run folder that the next invocation resumes.
    """
    return _set_pdeathsig if sys.platform.startswith("linux") else None


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (it may belong to another user); a zombie (ended, not yet reaped) does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # Linux: the state is the first field after the command, which is in parentheses
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return not sys.platform.startswith("linux")  # no /proc entry: gone on Linux; elsewhere kill(0) decides


def skip_final_collection() -> None:
    """Spare this process the garbage collection that Python runs as it exits: call it as ``main`` returns.

    A process with torch, MLflow and Ray loaded spent 2-3 CPU-s in that last collection (measured: a ``distml
    train --ray`` driver printed its last line ~3 s before it ended, a ``distml run`` ~5 s), only to free memory
    the operating system takes back anyway. ``gc.freeze()`` moves every object to the permanent generation, which
    no collection visits; reference counting still frees what it frees, ``atexit`` handlers still run and the
    standard streams are still flushed. Only for a process's own entry point, never for a library call.
    """
    gc.freeze()
