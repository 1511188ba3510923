"""The shape of ``src/distml`` in numbers: module sizes, ``cli/`` lines, ``Any``, function-local imports,
``# fmt: skip``. Run on a commit to compare (issue 16's before/after table):

    python bench/code_stats.py [--rev REV ...] [--out bench/results/code-stats.json]

Each ``--rev`` is read from git (``git show REV:path``), so nothing is checked out; without one it reads the
working tree. Lines are physical lines of each ``.py`` file; ``Any`` counts the name ``Any`` used in code (not in
comments or strings); a function-local import is an ``import`` statement inside a function body.
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import statistics
import subprocess
import tokenize
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SRC = "src/distml"


def _files(rev: str | None) -> dict[str, str]:
    """``{path: source}`` of every module under src/distml at ``rev`` (None: the working tree)."""
    if rev is None:
        return {str(p.relative_to(ROOT)): p.read_text() for p in sorted((ROOT / SRC).rglob("*.py"))}
    names = subprocess.run(["git", "ls-tree", "-r", "--name-only", rev, SRC], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split()  # fmt: skip
    return {
        n: subprocess.run(["git", "show", f"{rev}:{n}"], cwd=ROOT, check=True, capture_output=True, text=True).stdout
        for n in names
        if n.endswith(".py")
    }


def _any_count(source: str) -> int:
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    return sum(1 for t in tokens if t.type == tokenize.NAME and t.string == "Any")


def _local_imports(tree: ast.Module) -> int:
    """Import statements inside functions (methods too); a nested function's count once, in the outermost one."""
    count = 0
    stack: list[ast.AST] = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            count += sum(isinstance(n, ast.Import | ast.ImportFrom) for n in ast.walk(node))
        elif isinstance(node, ast.ClassDef | ast.If | ast.Try):
            stack.extend(ast.iter_child_nodes(node))
    return count


def stats(rev: str | None) -> dict[str, Any]:
    files = _files(rev)
    lines = {name: len(text.splitlines()) for name, text in files.items()}
    sizes = sorted(lines.values())
    return {
        "rev": rev or "working tree",
        "modules": len(files),
        "lines": sum(sizes),
        "cli_lines": sum(n for name, n in lines.items() if name.startswith(f"{SRC}/cli/")),
        "median_module_lines": statistics.median(sizes),
        "max_module": max(lines, key=lambda n: lines[n]).removeprefix(f"{SRC}/"),
        "max_module_lines": sizes[-1],
        "any": sum(_any_count(text) for text in files.values()),
        "function_local_imports": sum(_local_imports(ast.parse(text)) for text in files.values()),
        "fmt_skip": sum(text.count("# fmt: skip") for text in files.values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rev", action="append", help="a git revision (repeatable); default: the working tree")
    parser.add_argument("--out", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args()
    rows = [stats(rev) for rev in (args.rev or [None])]
    keys = list(rows[0])
    width = max(len(k) for k in keys)
    for key in keys:
        print(f"{key:<{width}}  " + "  ".join(f"{row[key]!s:>24}" for row in rows))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
