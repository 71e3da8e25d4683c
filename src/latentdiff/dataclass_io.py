"""Dataclasses from plain data (YAML, JSON, keyword arguments): the one strict, typed builder of every config.

:func:`from_dict` builds any dataclass from a mapping, checking every value against the field's annotation
(int, float, bool, str, Literal, Optional/unions, list, tuple, dict, nested dataclasses, Any) and its range
(:func:`bounded`), and names the source and the dotted key in every error. An unknown key gets the same
message wherever it is met, with the nearest known key::

    configs/x.yaml: unknown key 'train.lrr' (did you mean 'train.lr'?)
    configs/x.yaml: train.steps must be an int, got 'ten'

:func:`update` replaces some fields of an instance the same way, :func:`set_path` one dotted key of a tree,
:func:`check_fields` validates an instance in its ``__post_init__`` (so that direct construction is checked
too), and :func:`to_dict` turns a tree back into plain data. :class:`FromDict` gives a config class
``from_dict``/``to_dict`` methods. This module sits in the lowest layer: of latentdiff it imports only the
errors it raises (:class:`~latentdiff.errors.ConfigError`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import field
from typing import Any, Literal

from .errors import ConfigError, ConfigTypeError  # noqa: F401  (re-exported)


def bounded(default=dataclasses.MISSING, *, lo=None, hi=None, lo_open=False, hi_open=False,
            factory=dataclasses.MISSING):
    """A dataclass field whose numeric value (when not None; each number of a tuple or list) must lie in
    [lo, hi]; *_open excludes that end."""
    meta = {"range": (lo, hi, lo_open, hi_open)}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


# ---- one value against its annotation -------------------------------------------------------------------


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if dataclasses.is_dataclass(tp) or origin in (dict, Mapping):
        return "a mapping"
    if origin in (list, tuple) or tp in (list, tuple):
        return "a list"
    names = {int: "an int", float: "a number", bool: "a bool (true/false)", str: "a string"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _fail(where, key, tp, value):
    hint = ""
    if typing.get_origin(tp) is Literal and isinstance(value, str):
        close = difflib.get_close_matches(value, [a for a in typing.get_args(tp) if isinstance(a, str)], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigTypeError(f"{where}: {key} must be {_type_name(tp)}, got {value!r}{hint}")


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def convert(tp, value, where: str, key: str):
    """``value`` checked (and, where lossless, converted) against annotation ``tp``; errors name where/key."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or tp is object:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            _fail(where, key, tp, value)
        return from_dict(tp, value, where, prefix=f"{key}.")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            scalar = options[0] in (int, float, bool, str) or typing.get_origin(options[0]) is Literal
            if value is None or (scalar and not _accepts(options[0], value)):
                _fail(where, key, tp, value)  # names the whole type, "an int or null"
            return convert(options[0], value, where, key)  # containers name the inner key that failed
        for a in options:
            try:
                return convert(a, value, where, key)
            except ConfigError:
                continue
        _fail(where, key, tp, value)
    if origin is Literal:
        for a in args:
            if value == a and type(value) is type(a):
                return a
        _fail(where, key, tp, value)
    if tp is bool:
        if not isinstance(value, bool):
            _fail(where, key, tp, value)
        return value
    if tp is int:
        if isinstance(value, float) and value.is_integer():  # 1e4 written as 1.0e+4
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(where, key, tp, value)
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string: YAML 1.1 needs "1.0e-3"
            try:
                return float(value)
            except ValueError:
                _fail(where, key, tp, value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(where, key, tp, value)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            _fail(where, key, tp, value)
        return value
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            _fail(where, key, tp, value)
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise ConfigTypeError(f"{where}: {key} must be a list of {len(args)} values, got {list(value)!r}")
            return tuple(convert(a, v, where, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        items = [convert(item, v, where, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            _fail(where, key, tp, value)
        kt, vt = args if args else (Any, Any)
        out = {}
        for k, v in value.items():
            if kt is str and not isinstance(k, str):
                raise ConfigTypeError(f"{where}: {key} has a non-string key {k!r}")
            out[k] = convert(vt, v, where, f"{key}.{k}")
        return out
    raise TypeError(f"config annotation {tp!r} of {key} is not supported")


def _accepts(tp, value) -> bool:
    try:
        convert(tp, value, "", "")
    except ConfigError:
        return False
    return True


def _check_range(f: dataclasses.Field, value, where: str, key: str):
    rng = f.metadata.get("range")
    if rng is None or value is None:
        return value
    if isinstance(value, (tuple, list)):
        for i, v in enumerate(value):
            _check_number(rng, v, where, f"{key}[{i}]")
    else:
        _check_number(rng, value, where, key)
    return value


def _check_number(rng, value, where: str, key: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    lo, hi, lo_open, hi_open = rng
    if isinstance(value, float) and math.isnan(value):
        raise ConfigError(f"{where}: {key} must be a number, got nan")
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise ConfigError(f"{where}: {key} must be {'>' if lo_open else '>='} {lo}, got {value!r}")
    if hi is not None and (value >= hi if hi_open else value > hi):
        raise ConfigError(f"{where}: {key} must be {'<' if hi_open else '<='} {hi}, got {value!r}")


def unknown_key(where: str, prefix: str, key, names) -> ConfigError:
    """The one error for a key that is not a field: the nearest known one, else the list of known ones."""
    close = difflib.get_close_matches(str(key), list(names), n=1, cutoff=0.6)
    hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (known: {', '.join(names)})"
    return ConfigError(f"{where}: unknown key '{prefix}{key}'{hint}")


# ---- dataclasses ------------------------------------------------------------------------------------------


def validate_fields(cls, data: Mapping, where: str = "config", prefix: str = "", ignore=()) -> dict:
    """Check a PARTIAL mapping against dataclass ``cls``: every key known, every value typed. Returns the
    converted dict. For overrides of a preset, e.g. the model section against the network's config class."""
    if not isinstance(data, Mapping):
        raise ConfigTypeError(f"{where}: {prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = _hints(cls)
    out = {}
    for k, v in data.items():
        if k in ignore:
            out[k] = v
            continue
        if k not in fields:
            raise unknown_key(where, prefix, k, list(fields))
        out[k] = _check_range(fields[k], convert(hints[k], v, where, f"{prefix}{k}"), where, f"{prefix}{k}")
    return out


def from_dict(cls, data: Mapping | None, where: str = "config", prefix: str = ""):
    """An instance of dataclass ``cls`` from a mapping; missing keys take the field defaults.

    ``where`` (a file name, an override) and ``prefix`` (the dotted path of this section) go into every error.
    """
    values = validate_fields(cls, {} if data is None else data, where, prefix)
    for f in dataclasses.fields(cls):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if f.init and required and f.name not in values:
            raise ConfigError(f"{where}: missing required key '{prefix}{f.name}'")
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:  # the class's own __post_init__ checks
        raise ConfigError(f"{where}: {prefix.rstrip('.') or cls.__name__}: {e}") from None


def update(obj, data: Mapping, where: str = "config", prefix: str = ""):
    """A copy of dataclass instance ``obj`` with the fields in ``data`` replaced, validated like from_dict."""
    values = validate_fields(type(obj), data, where, prefix)
    try:
        return dataclasses.replace(obj, **values)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {prefix.rstrip('.') or type(obj).__name__}: {e}") from None


def check_fields(obj, where: str | None = None) -> None:
    """Validate every field of dataclass instance ``obj`` against its annotation and range, storing the
    converted values (lists become tuples, 1.0 an int); for ``__post_init__``. ``where`` defaults to the
    class name: ``TrainConfig: batch_size must be >= 1, got 0``."""
    where = type(obj).__name__ if where is None else where
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        if f.init:
            value = convert(hints[f.name], getattr(obj, f.name), where, f.name)
            object.__setattr__(obj, f.name, _check_range(f, value, where, f.name))


def to_dict(obj) -> Any:
    """Plain YAML-ready data (dicts, lists, scalars) from a dataclass tree; tuples become lists."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def set_path(obj, parts: list[str], value, where: str, tp=None, done: tuple[str, ...] = ()):
    """A copy of ``obj`` (a dataclass tree, annotated ``tp``) with the dotted path ``parts`` set to ``value``,
    validated like :func:`from_dict`. Open mappings on the way (``dict[str, Any]`` fields) take any key."""
    tp = type(obj) if tp is None else tp
    name, key = parts[0], ".".join((*done, parts[0]))
    if dataclasses.is_dataclass(obj):
        fields = {f.name: f for f in dataclasses.fields(obj) if f.init}
        if name not in fields:
            raise unknown_key(where, "".join(p + "." for p in done), name, list(fields))
        ftp = _hints(type(obj))[name]
        if len(parts) == 1:
            new = _check_range(fields[name], convert(ftp, value, where, key), where, key)
        else:
            new = set_path(getattr(obj, name), parts[1:], value, where, ftp, (*done, name))
        try:
            return dataclasses.replace(obj, **{name: new})
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{where}: {e}") from None
    if isinstance(obj, Mapping):
        if typing.get_origin(tp) in (typing.Union, types.UnionType):  # Optional[dict[...]]: the dict's annotation
            tp = next((a for a in typing.get_args(tp) if a is not type(None)), Any)
        args = typing.get_args(tp)
        vt = args[1] if len(args) == 2 else Any
        out = dict(obj)
        if len(parts) == 1:
            out[name] = convert(vt, value, where, key)
        else:
            child = out.get(name, {})
            if not isinstance(child, Mapping):
                raise ConfigError(f"{where}: {key} is {child!r}, not a mapping with key '{parts[1]}'")
            out[name] = set_path(child, parts[1:], value, where, vt if vt is not Any else dict, (*done, name))
        return out
    raise ConfigError(f"{where}: {'.'.join(done)} is {obj!r}, not a section with key '{name}'")


class FromDict:
    """Base of a config dataclass: ``Cls.from_dict(mapping)`` builds it with :func:`from_dict` (errors name the
    class, or ``where``), ``obj.to_dict()`` gives plain data back (tuples as lists) for JSON or YAML."""

    @classmethod
    def from_dict(cls, data: Mapping | None, where: str | None = None, prefix: str = ""):
        return from_dict(cls, data, cls.__name__ if where is None else where, prefix)

    def to_dict(self) -> dict:
        return to_dict(self)
