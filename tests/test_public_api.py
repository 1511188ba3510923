"""The public surface: what ``__all__`` promises exists, and the error tree is rooted in DistmlError."""

from __future__ import annotations

import inspect

import pytest

import distml
import distml.data
import distml.data.sources
from distml import errors


@pytest.mark.parametrize("module", [distml, distml.data, distml.data.sources])
def test_all_names_exist(module: object) -> None:
    names = module.__all__  # type: ignore[attr-defined]
    for name in names:
        assert hasattr(module, name), name


def test_every_project_error_is_a_distml_error_with_an_exit_code() -> None:
    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass) if issubclass(c, Exception)]
    assert len(classes) > 10
    for cls in classes:
        assert issubclass(cls, errors.DistmlError)
        assert cls.exit_code in (1, 2)
    assert errors.NotFoundError.exit_code == errors.ConfigError.exit_code == 2
    assert errors.ChecksumError.exit_code == errors.WorkspaceError.exit_code == 1
