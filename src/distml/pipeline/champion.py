"""The register step's hit check, read straight from the workspace's MLflow SQLite store: no MLflow import.

A cached ``register`` is good while the model's ``champion`` alias still names the version it registered
(:func:`distml.pipeline.steps.verify_registered`). Asking MLflow costs seconds on a warm rerun (importing it and
opening its store's client, which checks the schema) for one row of one table; a warm ``distml run`` must be a
hit in about 5 s. So the check first reads that row with :mod:`sqlite3`, read-only, and only trusts a plain yes:
the alias names that version and no champion move is recorded half done. Anything else (a tracking server, a
store or table that is not there, a recorded move, another answer) is left to the registry itself, which then
says what is wrong in its own words.
"""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

from distml import tracking

# _MOVE_TAG: a champion move recorded before its alias writes; while it is there, the alias row is not the answer.
from distml.registry.registry import _MOVE_TAG, CHAMPION

_SQLITE = "sqlite:///"


def store_file(home: Path) -> Path | None:
    """The SQLite file of the workspace's tracking store, or None when the store is not a local SQLite file."""
    uri = tracking.tracking_uri(home)
    if not uri.startswith(_SQLITE):
        return None
    path = Path(uri.removeprefix(_SQLITE).split("?", 1)[0])
    return path if path.is_file() else None


def champion_is(home: Path, name: str, version: str) -> bool:
    """True when the store says, plainly, that ``name@champion`` is ``version``; False when it cannot tell so."""
    path = store_file(home)
    if path is None:
        return False
    try:
        # Read-only and by URI: never create a store, never take a write lock a running step would wait on.
        with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=1.0)) as db:
            moving = db.execute(
                "SELECT 1 FROM registered_model_tags WHERE name = ? AND key = ?", (name, _MOVE_TAG)
            ).fetchall()
            rows = db.execute(
                "SELECT version FROM registered_model_aliases WHERE name = ? AND alias = ?", (name, CHAMPION)
            ).fetchall()
    except sqlite3.Error:  # another schema, a locked or damaged file: the registry decides
        return False
    return not moving and len(rows) == 1 and str(rows[0][0]) == str(version)
