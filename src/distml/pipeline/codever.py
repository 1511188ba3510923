"""The code version of a step: a digest of the distml modules that can change its output, and of no others.

A step names its root modules in :mod:`distml.pipeline.steps` (the module of its work; for ingest, also the
module of the dataset source it reads). This follows their ``import`` statements through the distml package,
read from the source with :mod:`ast` (nothing is imported), and hashes each file it reaches. Editing any of
those files changes the step's key, and the cache says which module changed; editing a module the step cannot
run (the CLI, the server, another dataset source) does not. No version number to bump.

What is followed is what can run:

- every ``import`` of a module, also the ones inside functions (the step may call them);
- importing ``a.b.c`` runs ``a/__init__.py`` and ``a/b/__init__.py`` too, so those count;
- not the imports under ``if TYPE_CHECKING:``: they never run;
- ``from distml.data import open_path``, a name a package offers but does not define, is followed to the
  submodule that defines it (the one the package's own ``TYPE_CHECKING`` import names), not to all of them.

The closure is precise because of one rule of the layout, which ``tests/test_structure.py`` keeps: a package's
``__init__`` imports none of its submodules when it runs (the names it offers load on first use). Importing
``distml.data.reader`` therefore runs ``data/__init__.py`` and nothing else of the data stage, and a training
step's key covers the reader and the store, not the CIFAR-10 tar reader. The granularity is the module: a step
that uses one function of a module depends on the whole file.
"""

from __future__ import annotations

import ast
import functools
import hashlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import distml

PACKAGE = "distml"
ROOT = Path(distml.__file__).resolve().parent  # the installed package; tests pass a copy to edit


def module_file(name: str, root: Path = ROOT) -> Path | None:
    """The source file of distml module ``name`` (``distml.a.b`` -> a/b.py or a/b/__init__.py), if it exists."""
    parts = name.split(".")
    if parts[0] != PACKAGE:
        return None
    base = root.joinpath(*parts[1:])
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _is_type_checking(test: ast.expr) -> bool:
    """``TYPE_CHECKING`` or ``typing.TYPE_CHECKING``: a block that only the type checker reads."""
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    return isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


# Where statements nest (in source order): only a statement can be an import, so expressions are never walked.
_BLOCKS = ("body", "handlers", "orelse", "finalbody", "cases")


def _statements(node: ast.AST) -> list[ast.AST]:
    """The statements (and ``except``/``case`` clauses, which hold statements) directly inside ``node``."""
    return [child for block in _BLOCKS for child in getattr(node, block, ())]


def _import_nodes(node: ast.AST, *, runtime: bool) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement under ``node``, in source order; with ``runtime``, not those under ``if TYPE_CHECKING:``.

    It walks statements only, with a stack: a warm ``distml run`` reads every module its steps can run, and a
    walk of every node of every module was most of its time.
    """
    stack = list(reversed(_statements(node)))
    while stack:
        child = stack.pop()
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child
        elif runtime and isinstance(child, ast.If) and _is_type_checking(child.test):
            stack.extend(reversed(child.orelse))
        else:
            stack.extend(reversed(_statements(child)))


@functools.lru_cache(maxsize=4096)
def _imports_in(source: bytes, filename: str, runtime: bool) -> tuple[ast.Import | ast.ImportFrom, ...]:
    """The import statements of one source file, parsed once per process for each content it has.

    The steps of a run share most of their modules, so each is parsed once, not once per step; an edited file
    is another content, so it is parsed anew.
    """
    return tuple(_import_nodes(ast.parse(source, filename=filename), runtime=runtime))


def _from_base(package: str, node: ast.ImportFrom) -> str:
    """The module a ``from X import ...`` reads, with a relative ``X`` made absolute."""
    if not node.level:
        return node.module or ""
    parts = package.split(".")
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def _package_of(name: str, path: Path) -> str:
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def _defining_module(package: str, attr: str, root: Path, depth: int = 0) -> str | None:
    """The module that defines ``attr`` when ``package`` only offers it (a lazy or plain re-export), if any."""
    path = module_file(package, root)
    if path is None or path.name != "__init__.py" or depth > 8:
        return None
    for node in _imports_in(path.read_bytes(), str(path), False):  # TYPE_CHECKING imports say where names come from
        if not isinstance(node, ast.ImportFrom):
            continue
        for alias in node.names:
            if (alias.asname or alias.name) == attr:
                source = _from_base(package, node)
                deeper = _defining_module(source, alias.name, root, depth + 1)
                return deeper or source
    return None


def _with_parents(module: str, root: Path) -> set[str]:
    """``a.b.c`` -> the distml modules among ``a``, ``a.b``, ``a.b.c``: importing it runs each of them."""
    parts = module.split(".")
    prefixes = (".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return {p for p in prefixes if p.split(".")[0] == PACKAGE and module_file(p, root) is not None}


def module_imports(name: str, path: Path, root: Path = ROOT) -> set[str]:
    """The distml modules that running module ``name`` (at ``path``) can import, with their parent packages."""
    package = _package_of(name, path)
    out: set[str] = set()
    for node in _imports_in(path.read_bytes(), str(path), True):
        if isinstance(node, ast.Import):
            for alias in node.names:
                out |= _with_parents(alias.name, root)
            continue
        base = _from_base(package, node)
        out |= _with_parents(base, root)
        for alias in node.names:
            target = f"{base}.{alias.name}"
            if module_file(target, root) is not None:  # "from pkg import module"
                out |= _with_parents(target, root)
            elif (defining := _defining_module(base, alias.name, root)) is not None:  # "from pkg import name"
                out |= _with_parents(defining, root)
    return out


def closure(roots: Iterable[str], root: Path = ROOT) -> list[str]:
    """Every distml module reachable from ``roots`` through imports that can run, sorted."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = module_file(name, root)
        if path is None:
            raise ValueError(f"{name} is not a distml module")
        seen.add(name)
        todo.extend(module_imports(name, path, root) - seen)
    return sorted(seen)


@functools.lru_cache(maxsize=64)
def code_version(roots: tuple[str, ...], root: Path = ROOT) -> dict[str, str]:
    """``{module: sha256 of its source}`` for every module the step with these root modules can run.

    Read once per process: a pipeline run keys all its steps with the code it started with.
    """
    out = {}
    for name in closure(roots, root):
        path = module_file(name, root)
        assert path is not None
        out[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out
