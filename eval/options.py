"""Command-line parameters from a config dataclass: one click option (or argument) per field.

The field's default, type and metadata (``eval/config.py``: ``help``, ``flag``, ``argument``,
``required``, ``path``, ``metavar``) make the parameter, so a default is written only in the
dataclass. Types: ``int``, ``float``, ``str``, ``bool`` (an ``--x/--no-x`` switch), ``X | None``
(no default), ``Literal[...]`` (a choice), ``tuple[X, Y]`` (several values after one option)
and ``tuple[X, ...]`` (a repeatable option). The command receives the values under the field
names; ``config_from(cls, values)`` builds the config from them (strict, validated).
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Mapping

import click

__all__ = ["config_params", "config_from"]

_SCALARS = {int: int, float: float, str: str, bool: bool}


def _click_type(tp: Any, meta: Mapping[str, Any]):
    """(click type, multiple) of a field type."""
    if meta.get("path"):
        return click.Path(exists=True, dir_okay=meta["path"] == "dir", file_okay=meta["path"] == "file"), False
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        arms = [a for a in args if a is not type(None)]
        if len(arms) != 1:
            raise TypeError(f"unsupported option type {tp!r}")
        return _click_type(arms[0], meta)
    if origin is typing.Literal:
        return click.Choice([str(a) for a in args]), False
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return _SCALARS[args[0]], True
        return tuple(_SCALARS[a] for a in args), False
    return _SCALARS[tp], False


def config_params(cls: type) -> list[click.Parameter]:
    """The click parameters of every field of the dataclass ``cls``, in field order."""
    hints = typing.get_type_hints(cls)
    params: list[click.Parameter] = []
    for f in dataclasses.fields(cls):
        meta, tp = f.metadata, hints[f.name]
        kind, multiple = _click_type(tp, meta)
        if meta.get("argument"):
            params.append(click.Argument([f.name], type=kind, metavar=f.name.upper()))
            continue
        flag = meta.get("flag", "--" + f.name.replace("_", "-"))
        decls = [f"{flag}/--no-{flag[2:]}" if tp is bool else flag, f.name]
        default = None if meta.get("required") else (f.default if f.default is not dataclasses.MISSING else None)
        params.append(click.Option(decls, type=None if tp is bool else kind, multiple=multiple,
                                   default=default, required=bool(meta.get("required")),
                                   help=meta.get("help"), metavar=meta.get("metavar"), show_default=True))
    return params


def config_from(cls: type, values: Mapping[str, Any], overrides=()):
    """The config ``cls`` from command-line ``values`` (field name -> value), then ``key=value``
    ``overrides``; unknown keys and bad values are refused naming the key."""
    names = {f.name for f in dataclasses.fields(cls)}
    cfg = cls.from_dict({k: v for k, v in values.items() if k in names})
    return cfg.override(list(overrides)) if overrides else cfg
