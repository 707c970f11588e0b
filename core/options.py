"""Command-line parameters from dataclasses: one click option (or argument) per field, for every
command (cli.py declares no option by hand), so a default is written only in the dataclass
(``option``: the metadata keys and the field types). A job's config (a ``core.config.TypedConfig``)
is built by ``config_from``: its defaults, a YAML file (``--config``), the options given on the
command line, then ``KEY=VALUE`` overrides. Importing this module imports click and, of the
project, core.config only."""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Mapping, Sequence

import click

from core.config import apply_overrides, load_config, merge_dict

__all__ = ["option", "config_params", "config_from", "check_bounds"]

_SCALARS = {int: int, float: float, str: str, bool: bool}


def option(default: Any, help: str, **cli: Any):
    """A dataclass field with its default and its command-line form (``config_params`` makes it).

    Metadata keys (``cli``): ``flag`` (another option name, e.g. ``--store`` for the field
    ``store_path``); ``argument`` (a positional argument; ``tuple[str, ...]``: any number of them);
    ``required``; ``path`` ("file", "dir" or "any") with ``exists`` (default True: the path must
    exist); ``choices``; ``min`` and ``max`` (an integer or float range, checked by
    :func:`check_bounds` too); ``metavar``; ``show_default`` (text shown instead of the default);
    ``negatable`` (default True: a ``bool`` is an ``--x/--no-x`` switch; False: a flag ``--x``, off
    by default). Field types: ``int``, ``float``, ``str``, ``bool``, ``X | None`` (no default),
    ``Literal[...]`` (a choice), ``tuple[X, Y]`` (several values after one option) and
    ``tuple[X, ...]`` (a repeatable option).
    """
    return dataclasses.field(default=default, metadata={"help": help, **cli})


def _scalar(tp: Any, meta: Mapping[str, Any]):
    """The click type of one value of type ``tp``."""
    if meta.get("path"):
        kind = meta["path"]
        return click.Path(exists=meta.get("exists", True), dir_okay=kind != "file", file_okay=kind != "dir")
    if meta.get("choices") is not None:
        return click.Choice([str(c) for c in meta["choices"]])
    if "min" in meta or "max" in meta:
        rng = {int: click.IntRange, float: click.FloatRange}[tp]
        return rng(min=meta.get("min"), max=meta.get("max"))
    return _SCALARS[tp]


def _click_type(tp: Any, meta: Mapping[str, Any]):
    """(click type, multiple) of a field type."""
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
            return _scalar(args[0], meta), True
        return tuple(_scalar(a, meta) for a in args), False
    return _scalar(tp, meta), False


def _text(value, fill: Mapping[str, str]):
    """``value`` with each ``{name}`` of ``fill`` replaced (other braces stay as they are)."""
    if not isinstance(value, str):
        return value
    for name, text in fill.items():
        value = value.replace("{" + name + "}", text)
    return value


def config_params(cls: type, **fill: str) -> list[click.Parameter]:
    """The click parameters of every field of the dataclass ``cls``, in field order. ``fill``:
    text put for ``{name}`` in the help and shown defaults (one dataclass for several commands)."""
    hints = typing.get_type_hints(cls)
    params: list[click.Parameter] = []
    for f in dataclasses.fields(cls):
        meta, tp = f.metadata, hints[f.name]
        kind, multiple = _click_type(tp, meta)
        if meta.get("argument"):
            params.append(click.Argument([f.name], type=kind, nargs=-1 if multiple else 1,
                                         metavar=meta.get("metavar", f.name.upper())))
            continue
        flag = meta.get("flag", "--" + f.name.replace("_", "-"))
        default = None if meta.get("required") else (f.default if f.default is not dataclasses.MISSING else None)
        if tp is bool and meta.get("negatable", True):
            decls, kw = [f"{flag}/--no-{flag[2:]}", f.name], {}
        elif tp is bool:
            decls, kw = [flag, f.name], dict(is_flag=True)
        else:
            decls, kw = [flag, f.name], dict(type=kind, multiple=multiple)
        params.append(click.Option(decls, default=default, required=bool(meta.get("required")),
                                   help=_text(meta.get("help"), fill), metavar=meta.get("metavar"),
                                   show_default=_text(meta.get("show_default", True), fill), **kw))
    return params


def config_from(cls: type, values: Mapping[str, Any], overrides: Sequence[str] = (), *, path=None):
    """The config ``cls`` from its defaults, the YAML file ``path`` (if any), the command-line
    ``values`` (field name -> value; other names are ignored), then the ``key=value``
    ``overrides``. Inside a click command only the values given on the command line count, so
    that an option's default does not undo the file. Unknown keys and bad values are refused
    naming the key (ValueError)."""
    ctx = click.get_current_context(silent=True)
    names = {f.name for f in dataclasses.fields(cls)}
    given = {k: v for k, v in values.items() if k in names and not (
        ctx is not None and k in ctx.params and ctx.get_parameter_source(k) is click.core.ParameterSource.DEFAULT)}
    cfg = cls()
    if path is not None:      # the file's values checked with the required ones given already present
        cfg = load_config(dataclasses.replace(cfg, **given), path)
    return apply_overrides(merge_dict(cfg, given), list(overrides))


def check_bounds(cfg) -> None:
    """Each field's value lies within its ``min`` / ``max`` metadata (each item of a tuple;
    None passes); ValueError naming the key."""
    for f in dataclasses.fields(cfg):
        lo, hi, value = f.metadata.get("min"), f.metadata.get("max"), getattr(cfg, f.name)
        for v in value if isinstance(value, tuple) else (value,):
            if v is not None and ((lo is not None and v < lo) or (hi is not None and v > hi)):
                bound = " and ".join(b for b in (lo is not None and f">= {lo}", hi is not None and f"<= {hi}") if b)
                raise ValueError(f"config {f.name}={value!r} must be {bound}")
