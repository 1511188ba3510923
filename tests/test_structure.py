"""The stage boundaries hold by import, not by discipline.

What each part of ``distml`` may import (``shared`` = ``errors``, ``config``, ``files``, ``workspace``,
``tracking``, ``cluster``, ``card``, ``model_names``: leaves every stage may use; ``tracking`` loads MLflow and
``cluster`` Ray only when called):

- ``data``: the shared modules. Each source in ``data.sources`` reads only ``data.sources.base`` and the readers
  it needs (``fetch``, ``idx``, ``safetar``); the store and the reader know no source.
- ``train``: ``data`` (the reader and the store, not the sources) and the shared modules.
- ``registry``: ``artifact`` is a leaf (the card, NumPy, ONNX Runtime when a session is asked for); ``export``
  may use ``train`` (it rebuilds the model from a checkpoint); ``registry`` and ``evaluate`` use ``export``.
- ``serve``: ``registry.artifact`` and the shared modules; never ``train``, ``data.sources``, torch or MLflow
  (importing the server loads none of them).
- ``k8s``: the config, the pipeline's shape and the shared modules; never ``train``.
- ``pipeline``: every stage (it runs them); ``cli``: anything.
- A package's ``__init__`` imports none of its submodules when it runs: the names it offers (``from
  distml.data import open_dataset``) load on first use, for users and scripts. Code inside ``distml`` imports
  the module that defines a name (``from distml.data.reader import open_path``).

The last rule is what makes a step's cache key precise (:mod:`distml.pipeline.codever`): importing one module
of a stage runs no other. The checks below import in a fresh interpreter (what is loaded), and read the import
statements, function-local ones included (what can be loaded: :func:`distml.pipeline.codever.closure`).
"""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from distml.pipeline.codever import ROOT, closure, module_file, module_imports

FACADES = ("distml.data", "distml.data.sources", "distml.registry", "distml.train")


def _loaded_after(*modules: str) -> list[str]:
    """The modules in ``sys.modules`` after a fresh interpreter imports ``modules``."""
    code = f"import json, sys\nimport {', '.join(modules)}\nprint(json.dumps(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    loaded: list[str] = json.loads(result.stdout)
    return loaded


def _matching(modules: list[str], prefixes: tuple[str, ...]) -> list[str]:
    return [m for m in modules if any(m == p or m.startswith(p + ".") for p in prefixes)]


def test_importing_the_server_loads_no_training_sources_torch_or_mlflow() -> None:
    loaded = _loaded_after("distml.serve", "distml.serve.server", "distml.serve.app")
    assert "distml.serve.server" in loaded
    assert _matching(loaded, ("distml.train", "distml.data.sources", "torch", "mlflow")) == []


def test_importing_the_kubernetes_render_loads_no_training_code() -> None:
    loaded = _loaded_after("distml.k8s", "distml.k8s.render")
    assert "distml.k8s.render" in loaded
    assert _matching(loaded, ("distml.train",)) == []


def test_the_server_can_reach_no_training_or_source_code() -> None:
    """Not only at import: no function of the server can import them either."""
    reachable = closure(("distml.serve", "distml.serve.server", "distml.serve.app"))
    assert _matching(reachable, ("distml.train", "distml.data.sources", "distml.registry.export")) == []


def test_the_kubernetes_render_can_reach_no_training_code() -> None:
    reachable = closure(("distml.k8s", "distml.k8s.render"))
    assert _matching(reachable, ("distml.train",)) == []


def test_importing_the_config_the_cluster_module_or_the_cli_loads_no_ray() -> None:
    """Ray is an optional extra and slow to import: only a command that runs on a cluster loads it."""
    loaded = _loaded_after("distml.config", "distml.cluster", "distml.cli.main", "distml.train.ray_launch")
    assert "distml.cluster" in loaded
    assert _matching(loaded, ("ray",)) == []


def test_the_cluster_module_is_a_shared_leaf_the_server_cannot_reach() -> None:
    """``distml.cluster`` uses only the exception tree; the server reaches neither it nor the Ray launcher."""
    assert set(closure(("distml.cluster",))) == {"distml", "distml.cluster", "distml.errors"}
    reachable = closure(("distml.serve", "distml.serve.server", "distml.serve.app"))
    assert _matching(reachable, ("distml.cluster", "distml.train.ray_launch")) == []


def _package_inits() -> list[str]:
    return sorted(".".join(p.parent.relative_to(ROOT.parent).parts) for p in ROOT.rglob("__init__.py"))


# The root package offers DistmlError (from the leaf errors module); serve's package is the server's entry point,
# which nothing but the CLI imports.
ALLOWED_IN_INIT = {"distml": {"distml.errors"}, "distml.serve": {"distml.serve.app", "distml.serve.server"}}


@pytest.mark.parametrize("package", _package_inits())
def test_a_package_init_imports_none_of_its_submodules(package: str) -> None:
    path = module_file(package)
    assert path is not None
    submodules = {m for m in module_imports(package, path) if m.startswith(package + ".")}
    assert submodules <= ALLOWED_IN_INIT.get(package, set())


@pytest.mark.parametrize("package", FACADES)
def test_a_facade_offers_exactly_what_it_imports_for_the_type_checker(package: str) -> None:
    """``__all__``, the lazy table and the ``TYPE_CHECKING`` imports name the same things, and each resolves."""
    module = importlib.import_module(package)
    path = Path(module.__file__ or "")
    typed: dict[str, str] = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(package + "."):
            typed.update({a.name: node.module.removeprefix(package + ".") for a in node.names if node.module})
    lazy: dict[str, str] = module._FROM
    assert typed == lazy
    assert sorted(lazy) == sorted(module.__all__)
    # A name that is also a submodule's would turn into that submodule once it is imported (``distml.data.ingest``).
    assert [name for name in lazy if module_file(f"{package}.{name}") is not None] == []
    for name, sub in lazy.items():
        assert getattr(module, name) is getattr(importlib.import_module(f"{package}.{sub}"), name)
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        getattr(module, "nothing")  # noqa: B009 (the attribute lookup is what is tested)


def test_distml_imports_each_name_from_the_module_that_defines_it() -> None:
    """Inside ``distml``, ``from distml.data import open_path`` is ``from distml.data.reader import open_path``."""
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module in FACADES and path.name != "__init__.py":
                offered = importlib.import_module(node.module)._FROM
                names = [a.name for a in node.names if a.name in offered]
                if names:
                    found.append(f"{path.relative_to(ROOT.parent)}:{node.lineno}: from {node.module} import {names}")
    assert found == []
