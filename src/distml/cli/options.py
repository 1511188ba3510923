"""What every subcommand shares: the :class:`AppContext`, :func:`pass_app`, and options built from the config.

The config tree (:mod:`distml.config`) is the one source of the options that set it: :func:`config_option`
takes a field's type, choices, description and default from its pydantic model. Such an option does not reach the
command's function; its value becomes a dotted override (``train.epochs``) that :func:`pass_app` hands to
:func:`~distml.config.load_config`, which validates everything once.
"""

from __future__ import annotations

import functools
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import click
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from distml.config import DistmlConfig, load_config
from distml.workspace import Workspace

F = TypeVar("F", bound=Callable[..., Any])

# Keys of click's ctx.meta, which every context of one command line shares.
_OVERRIDES = "distml.overrides"  # dotted config key -> the value given on the command line
_CONFIG_PATH = "distml.config_path"


@dataclass(frozen=True)
class AppContext:
    """What every subcommand receives: the resolved config, and which of its keys the command line set."""

    config: DistmlConfig
    given: Mapping[str, object]

    @property
    def workspace(self) -> Workspace:
        return Workspace(self.config.workspace.home)

    def given_in(self, section: str) -> dict[str, object]:
        """The fields of one section set on the command line, e.g. ``{"epochs": 3}`` for ``train``."""
        prefix = f"{section}."
        return {k.removeprefix(prefix): v for k, v in self.given.items() if k.startswith(prefix)}


def pass_app(fn: Callable[..., None]) -> Callable[..., None]:
    """Give a leaf command the AppContext, built from ``--config`` and every config option on the command line.

    The command takes ``--home`` too, so that ``distml data list --home X`` works as ``distml --home X data list``.
    """

    @config_option("workspace", "home", hidden=True)
    @click.pass_context
    @functools.wraps(fn)
    def wrapper(ctx: click.Context, /, *args: Any, **kwargs: Any) -> None:
        given = dict(ctx.meta.get(_OVERRIDES, {}))
        fn(AppContext(load_config(ctx.meta.get(_CONFIG_PATH), overrides=given), given), *args, **kwargs)

    return wrapper


def config_path_option(help: str) -> Callable[[F], F]:
    """``--config FILE``: the distml.toml that :func:`pass_app` loads."""

    def remember(ctx: click.Context, _param: click.Parameter, value: Path | None) -> None:
        if value is not None:
            ctx.meta[_CONFIG_PATH] = value

    return click.option(
        "--config", type=click.Path(path_type=Path, dir_okay=False), expose_value=False, callback=remember, help=help
    )


class ConfigOption(click.Option):
    """A click option for one config field (``key`` is its dotted name); tests read ``field`` to check --help."""

    def __init__(self, *args: Any, key: str, field: FieldInfo, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.key = key
        self.field = field


def config_option(section: str, name: str, *decls: str, record: bool = True, **attrs: Any) -> Callable[[F], F]:
    """An option for field ``name`` of config ``section``: ``--max-batch-size`` for ``serve.max_batch_size``.

    Its type, choices (a ``Literal``), help (the field's description) and the default shown come from the
    field. With ``record`` (the default) the value goes to the config as an override; without, the command
    function receives it (``None`` when not given) and decides what it means. ``attrs`` go to click as they are.
    """
    field = _section(section).model_fields[name]
    kind, choices = _kind(field.annotation)
    help_text = field.description or ""
    if help_text and not help_text.endswith("."):
        help_text += "."
    if choices:
        attrs.setdefault("metavar", f"[{'|'.join(choices)}]")
    if kind is not bool and field.default is not None:  # a flag's default is off; None is no default
        help_text += f"  [default: {default_text(name, field.default)}]"
    if kind is bool:
        attrs.update(is_flag=True)
    elif kind is Path:
        attrs.setdefault("type", click.Path(path_type=Path))
    elif kind in (int, float):
        attrs.setdefault("type", kind)
    if record:
        attrs.update(expose_value=False, callback=_record)
    return click.option(
        *(decls or (f"--{name.replace('_', '-')}",)),
        cls=ConfigOption,
        key=f"{section}.{name}",
        field=field,
        default=None,
        help=help_text.strip(),
        **attrs,
    )


def config_options(section: str, *names: str, record: bool = True) -> Callable[[F], F]:
    """:func:`config_option` for each of ``names`` (each may hold several, space-separated), in that order."""

    def decorate(fn: F) -> F:
        for name in reversed(" ".join(names).split()):
            fn = config_option(section, name, record=record)(fn)
        return fn

    return decorate


def ray_option() -> Callable[[F], F]:
    """``--ray ADDRESS``: run on the Ray cluster at ADDRESS (``cluster.engine = "ray"``, ``cluster.address``).

    The address is validated with the rest of the config; the token is never an option (it would show in ``ps``):
    Ray reads it from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token.
    """

    def remember(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
        if value is not None:
            overrides = ctx.meta.setdefault(_OVERRIDES, {})
            overrides["cluster.engine"] = "ray"
            overrides["cluster.address"] = value

    return click.option(
        "--ray",
        metavar="ADDRESS",
        expose_value=False,
        callback=remember,
        help="Run on a Ray cluster: auto (started with `ray start` on this host) or HOST:PORT of its head. Its "
        "token comes from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token.",
    )


def placement_option() -> Callable[[F], F]:
    """``--placement pack|spread``: where Ray puts one job's workers (``cluster.placement``)."""
    return config_option("cluster", "placement")


def default_text(name: str, value: object) -> str:
    """A default as --help shows it: ``16 MiB`` for a byte count, ``2`` for 2.0, ``a,b`` for a tuple."""
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, int) and name.endswith("_bytes"):
        for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
            if value >= size and value % size == 0:
                return f"{value // size} {unit}"
    return str(value)


def _record(ctx: click.Context, param: click.Parameter, value: object) -> None:
    if value is not None:
        assert isinstance(param, ConfigOption)
        ctx.meta.setdefault(_OVERRIDES, {})[param.key] = value


def _section(section: str) -> type[BaseModel]:
    model = DistmlConfig.model_fields[section].annotation
    assert isinstance(model, type), f"{section} is not a config section"
    assert issubclass(model, BaseModel), f"{section} is not a config section"
    return model


def _kind(annotation: object) -> tuple[object, tuple[str, ...]]:
    """The Python type an option parses (``X | None`` is ``X``), and a ``Literal``'s choices."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) is Literal:
        return str, tuple(str(a) for a in typing.get_args(annotation))
    return annotation, ()
