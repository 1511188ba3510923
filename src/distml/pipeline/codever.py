"""The code version of a step: a digest of every distml module its functions can run.

A step names the modules its function lives in; this follows their ``import`` statements (all of them, also the
ones inside functions, read from the source with :mod:`ast`, nothing imported) through the distml package and
hashes each file it reaches. Editing any of those files changes the step's key, and the cache says which module
changed; editing a module the step cannot reach (the CLI, the server) does not. No version number to bump.
"""

from __future__ import annotations

import ast
import functools
import hashlib
from collections.abc import Iterable
from pathlib import Path

import distml

PACKAGE = "distml"
_ROOT = Path(distml.__file__).resolve().parent


def module_file(name: str) -> Path | None:
    """The source file of distml module ``name`` (``distml.a.b`` -> a/b.py or a/b/__init__.py), if it exists."""
    parts = name.split(".")
    if parts[0] != PACKAGE:
        return None
    base = _ROOT.joinpath(*parts[1:])
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imports(name: str, path: Path) -> set[str]:
    """The distml modules that the module ``name`` at ``path`` imports (with their parent packages)."""
    tree = ast.parse(path.read_bytes(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # "from pkg import module"
    out: set[str] = set()
    for mod in found:
        parts = mod.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ too
            prefix = ".".join(parts[:i])
            if prefix.startswith(PACKAGE) and module_file(prefix) is not None:
                out.add(prefix)
    return out


def closure(roots: Iterable[str]) -> list[str]:
    """Every distml module reachable from ``roots`` through imports, sorted."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = module_file(name)
        if path is None:
            raise ValueError(f"{name} is not a distml module")
        seen.add(name)
        todo.extend(_imports(name, path) - seen)
    return sorted(seen)


@functools.lru_cache(maxsize=64)
def code_version(roots: tuple[str, ...]) -> dict[str, str]:
    """``{module: sha256 of its source}`` for every module the step with these root modules can run."""
    out = {}
    for name in closure(roots):
        path = module_file(name)
        assert path is not None
        out[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out
