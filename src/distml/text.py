"""Quoting what a user or client sent back to them in an error message, bounded.

Every message that echoes a value from outside (a request field, a path, a model reference) goes through
:func:`clip`: a 10 MB string or a list nested 1,000 deep must neither become the message nor raise
``RecursionError`` while it is formatted. A leaf module: the server and the registry both use it.
"""

from __future__ import annotations

import reprlib

LIMIT = 80  # characters of a value quoted back

_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxstring, _repr.maxother = 2, 60, 60  # bounded depth: no RecursionError on nested input
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = 4


def clip(value: object, limit: int = LIMIT, *, quote: bool = True) -> str:
    """``repr(value)`` at most ``limit`` characters long and never deeper than two levels; with ``quote=False`` a
    string as it is, cut at ``limit`` characters with its full length said (``abc... (5,000 characters)``)."""
    if isinstance(value, str) and not quote:
        return value if len(value) <= limit else f"{value[:limit]}... ({len(value):,} characters)"
    text = _repr.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
