"""Whether this process sees a run folder the driver wrote: the per-node workspace check of a Ray job.

A module of its own, importing only the standard library, because Ray runs the check as a task in a fresh worker
process on every node for every job (:func:`distml.train.ray_launch.start_workspace_check`): importing
:mod:`distml.train.ray_launch` there (pydantic, distml's configuration) cost ~0.4 CPU-s per node and job.
"""

from __future__ import annotations

from pathlib import Path

CHECK_FILE = "ray-check"  # the driver's token: a process that cannot read it does not see this workspace


def sees_workspace(run_dir: str, token: str) -> bool:
    """Whether ``run_dir`` here holds the driver's ``token`` and the job file beside it."""
    folder = Path(run_dir)
    try:
        return (folder / CHECK_FILE).read_text() == token and (folder / "job.json").is_file()
    except OSError:
        return False
