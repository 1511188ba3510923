"""A step's outputs as files, the way an Argo Workflow reads a container step's output parameters."""

from __future__ import annotations

import json
from pathlib import Path

from distml.files import write_atomic


def write_outputs(folder: Path, outputs: dict[str, object]) -> None:
    """Write each output to ``folder/<name>`` (a string as it is, anything else as JSON) and all of them to
    ``folder/outputs.json``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    for name, value in outputs.items():
        write_atomic(folder / name, (value if isinstance(value, str) else json.dumps(value)).encode())
    write_atomic(folder / "outputs.json", (json.dumps(outputs, indent=2, default=str) + "\n").encode())
