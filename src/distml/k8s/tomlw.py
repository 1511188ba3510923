"""A small TOML writer for distml's config files: tables of scalars, lists and inline tables; ``None`` is left out.

The standard library reads TOML but does not write it; the config files rendered for the cluster need no more
than this, and :func:`dumps_toml` checks its own output by reading it back.
"""

from __future__ import annotations

import json
import math
import re
import tomllib
from typing import Any


def dumps_toml(
    doc: dict[str, dict[str, Any]], *, header: str = "", arrays: dict[str, list[dict[str, Any]]] | None = None
) -> str:
    """``[section]`` tables of ``doc``, then the ``[[name]]`` tables of ``arrays``; a dict inside a table is written
    as an inline table, a key that is not bare is quoted, ``None`` is left out. The text is read back and checked."""
    arrays = arrays or {}
    lines = [f"# {header}"] if header else []
    for section, table in doc.items():
        lines += ["", f"[{section}]", *_pairs(table)]
    for name, tables in arrays.items():
        for table in tables:
            lines += ["", f"[[{name}]]", *_pairs(table)]
    text = "\n".join(lines).lstrip("\n") + "\n"
    back = tomllib.loads(text)
    want = _plain({**doc, **{name: tables for name, tables in arrays.items() if tables}})
    assert back == want, f"TOML round trip changed the config: {back} != {want}"
    return text


def _pairs(table: dict[str, Any]) -> list[str]:
    return [f"{_key(k)} = {_value(v)}" for k, v in table.items() if v is not None]


def _key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(f"cannot write {v} to TOML")
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # a JSON string is a valid TOML basic string
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(_pairs(v)) + " }" if v else "{}"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def _plain(v: Any) -> Any:
    """``v`` as TOML reads it back: tuples as lists, ``None`` left out of tables."""
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items() if x is not None}
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    return v
