"""A new workspace's MLflow SQLite store is a copy of one blank store built once per MLflow version (tracking.py)."""

from __future__ import annotations

from pathlib import Path

import pytest


def test_a_new_workspace_store_is_a_copy_of_one_blank_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from distml import tracking

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    first, second = tmp_path / "a", tmp_path / "b"
    tracking.ensure_experiment(first, "e")
    (blank,) = (tmp_path / "cache" / "distml").glob("mlflow-*-blank.db")
    built = blank.stat().st_mtime_ns
    tracking.ensure_experiment(second, "e")
    assert blank.stat().st_mtime_ns == built  # built once, copied for the second workspace
    # Each store is its own, with its workspace's artifact folder.
    for home in (first, second):
        exp = tracking.mlflow_client(tracking.tracking_uri(home)).get_experiment_by_name("e")
        assert exp is not None and exp.artifact_location == (home.resolve() / "mlartifacts").as_uri()
    # No usable cache folder: MLflow creates the store itself, as before.
    (tmp_path / "not-a-folder").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "not-a-folder"))
    assert tracking.ensure_experiment(tmp_path / "c", "e")
    assert (tmp_path / "c" / "mlflow.db").is_file()
