"""YAML out: block style, keys in the order built, multi-line strings as literal blocks."""

from __future__ import annotations

from typing import Any

import yaml


class _Dumper(yaml.SafeDumper):  # type: ignore[misc]
    def ignore_aliases(self, data: Any) -> bool:
        return True  # a shared dict (one security context) is written out each time, not as &anchor/*alias


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    # Embedded manifests (an Argo resource step's) and config files stay readable as literal blocks.
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_Dumper.add_representer(str, _str)


def dump(obj: Any) -> str:
    return str(yaml.dump(obj, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=1000))


def dump_all(objs: list[Any]) -> str:
    return str(yaml.dump_all(objs, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=1000))
