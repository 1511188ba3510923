"""A small TOML writer for distml's config sections (flat tables of scalars and lists; ``None`` is left out).

The standard library reads TOML but does not write it; the config files rendered for the cluster need no more
than this, and :func:`dumps_toml` checks its own output by reading it back.
"""

from __future__ import annotations

import json
import math
import tomllib
from typing import Any


def dumps_toml(doc: dict[str, dict[str, Any]], *, header: str = "") -> str:
    lines = [f"# {header}"] if header else []
    for section, table in doc.items():
        lines += ["", f"[{section}]"]
        lines += [f"{key} = {_value(v)}" for key, v in table.items() if v is not None]
    text = "\n".join(lines).lstrip("\n") + "\n"
    back = tomllib.loads(text)
    want = {
        s: {k: list(v) if isinstance(v, tuple) else v for k, v in t.items() if v is not None} for s, t in doc.items()
    }
    assert back == want, f"TOML round trip changed the config: {back} != {want}"
    return text


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
    raise TypeError(f"cannot write {type(v).__name__} to TOML")
