"""Typed configurations: nested dataclasses whose defaults are the default config, changed by a
YAML file and then dotted ``a.b=value`` overrides; unknown keys and mistyped values are refused
naming the key; ``validate`` and ``derived`` hooks (docs/CONTRACTS.md, "Typed configs")."""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

import yaml

__all__ = ["TypedConfig", "load_config", "apply_overrides", "merge_dict", "to_dict", "flatten",
           "get", "check_choices", "check_positive", "check_nonneg"]

DERIVED = "derived"     # the reserved top-level key of a resolved dump


class TypedConfig:
    """Mixin of a root config dataclass: serialisation, loading and the two hooks."""

    # Shown when a dump's derived values were edited: the inputs to change instead.
    derived_inputs: ClassVar[Sequence[str]] = ()

    def derived(self) -> dict[str, Any]:
        """Values computed from the config, once (none by default)."""
        return {}

    def validate(self):
        """Check ranges and relations; raise ValueError naming the key. Returns self."""
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict of YAML-safe values (tuples become lists)."""
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]):
        """Build from a (possibly partial) nested dict over the defaults; strict."""
        return merge_dict(cls(), data)

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: Sequence[str] = ()):
        """Defaults, then the YAML file at ``path`` (if any), then ``key=value`` overrides."""
        return load_config(cls(), path, overrides)

    def override(self, overrides: Sequence[str]):
        """A new config with dotted ``key=value`` overrides applied."""
        return apply_overrides(self, overrides)

    def to_yaml(self) -> str:
        """The resolved config as YAML, with a ``derived:`` section when there are derived values."""
        doc = self.to_dict()
        derived = self.derived()
        if derived:
            doc[DERIVED] = derived
        return yaml.safe_dump(doc, sort_keys=False)

    def save(self, path: str | Path) -> None:
        """Write :meth:`to_yaml` to ``path``."""
        Path(path).write_text(self.to_yaml())


# ---- loading and overriding ---------------------------------------------------------
def load_config(base, path: str | Path | None = None, overrides: Sequence[str] = ()):
    """``base`` (a config instance), then the YAML file at ``path`` (if any), then overrides.

    Raises FileNotFoundError naming a missing file and ValueError naming a bad key/value.
    """
    cfg = base
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ValueError(f"config file {path} is not valid YAML: {e}") from e
        if data is not None:
            if not isinstance(data, Mapping):
                raise ValueError(f"config file {path} must hold a mapping of sections, "
                                 f"got {type(data).__name__}")
            try:
                cfg = merge_dict(cfg, data)
            except ValueError as e:
                raise ValueError(f"{path}: {e}") from e
    return apply_overrides(cfg, overrides)


def apply_overrides(cfg, overrides: Sequence[str]):
    """Apply dotted ``a.b=value`` strings (value parsed as YAML, then type-checked)."""
    nested: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        path = key.split(".")
        if not sep or not _leaf_shaped(cfg, path):
            raise ValueError(f"override {item!r} must look like {_form(cfg)}=value "
                             f"({_listing(cfg)})")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = nested
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = _FromString(raw, value)
    return merge_dict(cfg, nested)


def merge_dict(cfg, data: Mapping[str, Any]):
    """A new config: ``cfg`` with the nested values of ``data``; strict, type-checked, validated.

    A ``derived`` section is accepted only if it equals what the result derives (so a
    resolved dump loads back, but editing a derived value is refused).
    """
    if not isinstance(data, Mapping):
        raise ValueError(f"config must be a mapping of sections, got {type(data).__name__}")
    derived = data.get(DERIVED)
    out = _merge(cfg, {k: v for k, v in data.items() if k != DERIVED}, prefix="")
    out = out.validate() if hasattr(out, "validate") else out
    if derived is not None:
        expected = out.derived() if hasattr(out, "derived") else {}
        if not isinstance(derived, Mapping) or set(derived) != set(expected) or any(
                abs(float(derived[k]) - expected[k]) > 1e-12 * max(1.0, abs(expected[k]))
                for k in expected):
            inputs = " or ".join(getattr(out, "derived_inputs", ())) or "their inputs"
            raise ValueError(f"config derived={dict(derived) if isinstance(derived, Mapping) else derived!r} "
                             f"disagrees with the values computed from the config {expected}; "
                             f"derived values are computed (change {inputs} instead)")
    return out


def _merge(obj, data: Mapping[str, Any], *, prefix: str):
    hints = typing.get_type_hints(type(obj))
    names = _names(type(obj))
    changes = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in names:
            if not prefix and _all_sections(obj):
                raise ValueError(f"unknown config section {name!r}; valid sections: {names}")
            where = f" in {prefix[:-1]!r}" if prefix else ""
            raise ValueError(f"unknown config key {key}; valid keys{where}: {names}")
        current = changes.get(name, getattr(obj, name))
        if dataclasses.is_dataclass(current):
            if not isinstance(value, Mapping):
                raise ValueError(f"config section {key!r} must be a mapping, got {value!r}")
            changes[name] = _merge(current, value, prefix=f"{key}.")
        else:
            changes[name] = _coerce(value, hints[name], key)
    return dataclasses.replace(obj, **changes)


# ---- reading values -------------------------------------------------------------------
def to_dict(obj) -> dict[str, Any]:
    """A config dataclass as a plain nested dict (tuples become lists)."""
    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        return [plain(x) for x in v] if isinstance(v, (tuple, list)) else v
    return plain(obj)


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (a config's dotted keys and their values)."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def get(cfg, key: str) -> Any:
    """The value at dotted ``key``."""
    for name in key.split("."):
        cfg = getattr(cfg, name)
    return cfg


def check_choices(cfg, choices: Mapping[str, Sequence[Any]]) -> None:
    """Each dotted key's value is one of its allowed values (ValueError naming the key)."""
    for key, allowed in choices.items():
        value = get(cfg, key)
        if value not in allowed:
            raise ValueError(f"config {key}={value!r} is not one of {list(allowed)}")


def check_positive(cfg, keys: Sequence[str]) -> None:
    """Each dotted key's value is > 0 (ValueError naming the key)."""
    for key in keys:
        if not get(cfg, key) > 0:
            raise ValueError(f"config {key}={get(cfg, key)!r} must be > 0")


def check_nonneg(cfg, keys: Sequence[str]) -> None:
    """Each dotted key's value is >= 0 (ValueError naming the key)."""
    for key in keys:
        if get(cfg, key) < 0:
            raise ValueError(f"config {key}={get(cfg, key)!r} must be >= 0")


# ---- types ------------------------------------------------------------------------
class _FromString:
    """A value that came from the command line: its raw text and its YAML parse."""

    def __init__(self, raw: str, parsed: Any):
        self.raw, self.parsed = raw, parsed


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the field type ``tp``; convert command-line strings."""
    raw = None
    if isinstance(value, _FromString):
        raw, value = value.raw.strip(), value.parsed

    def bad():
        shown = raw if raw is not None else repr(value)
        return ValueError(f"config {key}={shown} is not a valid {_type_name(tp)}")

    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):   # e.g. int | str: the first type that takes it
        for arm in sorted(typing.get_args(tp), key=lambda a: a is not type(None)):   # null: None first
            try:
                return _coerce(value if raw is None else _FromString(raw, value), arm, key)
            except ValueError:
                continue
        raise bad()
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value in allowed:
            return value
        if raw is not None and raw in allowed:
            return raw
        raise ValueError(f"config {key}={raw if raw is not None else repr(value)} is not one of "
                         f"{list(allowed)}")
    if origin is tuple:
        args = typing.get_args(tp)
        if raw is not None and isinstance(value, str):
            value = [yaml.safe_load(v) for v in value.split(",")]
        if not isinstance(value, (list, tuple)):
            raise bad()
        if len(args) == 2 and args[1] is Ellipsis:
            items = [_coerce(v, args[0], key) for v in value]
        else:
            if len(value) != len(args):
                raise bad()
            items = [_coerce(v, a, key) for v, a in zip(value, args)]
        return tuple(items)
    if tp is type(None):
        if value is None:
            return None
        raise bad()
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                raise bad() from None
        raise bad()
    if tp is str:
        if raw is not None and not isinstance(value, str):
            return raw  # command-line text that YAML read as a number etc.: keep it as typed
        if isinstance(value, str):
            return value
        raise bad()
    raise TypeError(f"config {key}: unsupported field type {tp!r}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) if typing.get_origin(tp) is None else str(tp)


def _names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _all_sections(obj) -> bool:
    return all(dataclasses.is_dataclass(getattr(obj, n)) for n in _names(type(obj)))


def _leaf_shaped(cfg, path: list[str]) -> bool:
    """Whether dotted ``path`` can name a value: it does not stop at a section nor run
    past a value. Unknown names are left to :func:`_merge` to report, except a name
    at a level that holds sections only (``gate_mode`` for ``gate.mode``)."""
    node = cfg
    for i, name in enumerate(path):
        if not name or not dataclasses.is_dataclass(node):
            return False
        if name not in _names(type(node)):
            return not (i == len(path) - 1 and _all_sections(node))
        node = getattr(node, name)
    return not dataclasses.is_dataclass(node)


def _form(cfg) -> str:
    kinds = {dataclasses.is_dataclass(getattr(cfg, n)) for n in _names(type(cfg))}
    return {frozenset({True}): "section.key", frozenset({False}): "key"}.get(
        frozenset(kinds), "key or section.key")


def _listing(cfg) -> str:
    sections = [n for n in _names(type(cfg)) if dataclasses.is_dataclass(getattr(cfg, n))]
    keys = [n for n in _names(type(cfg)) if n not in sections]
    parts = ([f"sections: {sections}"] if sections else []) + ([f"keys: {keys}"] if keys else [])
    return "; ".join(parts)
