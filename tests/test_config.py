"""The typed config tree: precedence, validation errors that name the field, nothing parsed at import."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from distml.config import load_config
from distml.errors import ConfigError


def test_defaults_file_env_and_overrides_in_order(tmp_path: Path) -> None:
    assert load_config(environ={}).workspace.home == Path(".distml")
    config = tmp_path / "distml.toml"
    config.write_text('[workspace]\nhome = "/from/file"\n[data]\nshard_bytes = 4096\n')
    assert load_config(config, environ={}).workspace.home == Path("/from/file")
    assert load_config(config, environ={"DISTML_HOME": "/from/env"}).workspace.home == Path("/from/env")
    cfg = load_config(
        config, environ={"DISTML_HOME": "/e"}, overrides={"workspace.home": "/cli", "data.on_bad_file": None}
    )
    assert cfg.workspace.home == Path("/cli")
    assert cfg.data.shard_bytes == 4096 and cfg.data.on_bad_file == "fail"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[data]\nshard_bytes = 3\n", "data.shard_bytes=3"),
        ("[data]\nshard_size = 3\n", r"unknown config key data.shard_size in .* \(did you mean 'shard_bytes'\?\)"),
        ("[data\n", "is not valid TOML"),
    ],
)
def test_invalid_config_names_the_field(tmp_path: Path, text: str, needle: str) -> None:
    config = tmp_path / "distml.toml"
    config.write_text(text)
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[")):
        load_config(config, environ={})


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml", environ={})


def test_importing_distml_touches_nothing_and_imports_no_torch(tmp_path: Path) -> None:
    code = "import sys, distml, distml.data, distml.cli.main; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert out.stdout.strip() == "False"
    assert list(tmp_path.iterdir()) == []  # no workspace created, no config read


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b'workspace = "x"\n', "workspace must be a table"),
        (b"[data]\nshard_bytes = 4096 # \xff\xfe\n", "is not valid TOML"),
    ],
)
def test_malformed_config_files_are_config_errors(tmp_path: Path, content: bytes, needle: str) -> None:
    config = tmp_path / "distml.toml"
    config.write_bytes(content)
    with pytest.raises(ConfigError, match=needle):
        load_config(config, environ={"DISTML_HOME": "/h"})


def test_cluster_section_ray_needs_an_address_of_a_known_form() -> None:
    assert load_config(environ={}).cluster.engine == "local"
    cfg = load_config(environ={}, overrides={"cluster.engine": "ray", "cluster.address": "127.0.0.1:6379"})
    assert (cfg.cluster.engine, cfg.cluster.address, cfg.cluster.placement) == ("ray", "127.0.0.1:6379", "pack")
    assert load_config(environ={}, overrides={"cluster.engine": "ray", "cluster.address": "auto"}).cluster.address
    with pytest.raises(ConfigError, match="engine 'ray' needs an address"):
        load_config(environ={}, overrides={"cluster.engine": "ray"})
    with pytest.raises(ConfigError, match="'nohost' is not auto or HOST:PORT"):
        load_config(environ={}, overrides={"cluster.engine": "ray", "cluster.address": "nohost"})
    with pytest.raises(ConfigError, match="placement"):
        load_config(environ={}, overrides={"cluster.placement": "scatter"})
