"""Strict construction of frozen dataclass configs from params.yaml sections.

Every module that needs settings owns a frozen dataclass; stages build it with
:func:`from_params`. Unknown keys, missing keys and wrong types raise a
:class:`ParamError` that names the full key (``train.lr``), so a typo in a
sweep fails at start-up instead of being silently ignored.

Range checks live in each dataclass's ``__post_init__`` and use :func:`check`,
whose key is relative to the section; :func:`from_params` prefixes it.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml

from pgolf.errors import ParamError

T = TypeVar("T")


def check(condition: bool, key: str, message: str) -> None:
    """Raise ParamError(key, message) unless condition holds."""
    if not condition:
        raise ParamError(key, message)


def load_params(path: str | Path = "params.yaml") -> dict:
    path = Path(path)
    if not path.is_file():
        raise ParamError("", "file not found", file=str(path))
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ParamError("", f"invalid YAML{where}: {what}", file=str(path)) from None
    if not isinstance(data, dict):
        raise ParamError("", "top level must be a mapping", file=str(path))
    return data


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ParamError as exc:
                errors.append(exc.message)
        raise ParamError(key, "; ".join(errors))
    if origin is typing.Literal:
        if value not in args:
            raise ParamError(key, f"must be one of {list(args)}, got {value!r}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ParamError(key, f"expected a list, got {value!r}")
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if origin is tuple and args:
            if len(args) != len(value):
                raise ParamError(key, f"expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, Mapping):
            raise ParamError(key, f"expected a mapping, got {value!r}")
        return _build(annotation, value, key)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ParamError(key, f"expected true/false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamError(key, f"expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamError(key, f"expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ParamError(key, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {annotation!r} for {key}")


def _build(cls: type[T], mapping: Mapping, prefix: str) -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(mapping) - fields)
    if unknown:
        raise ParamError(f"{prefix}.{unknown[0]}", f"unknown key (known: {', '.join(sorted(fields))})")
    missing = sorted(fields - set(mapping))
    if missing:
        raise ParamError(f"{prefix}.{missing[0]}", "missing key")
    kwargs = {name: _coerce(mapping[name], hints[name], f"{prefix}.{name}") for name in fields}
    try:
        return cls(**kwargs)
    except ParamError as exc:
        if exc.key.startswith(prefix + "."):
            raise
        raise ParamError(f"{prefix}.{exc.key}", exc.message) from None


def from_params(cls: type[T], params: Mapping, section: str) -> T:
    """Build ``cls`` from ``params[section]`` (dotted sections allowed)."""
    node: Any = params
    for part in section.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise ParamError(section, "missing section")
        node = node[part]
    if not isinstance(node, Mapping):
        raise ParamError(section, "expected a mapping")
    return _build(cls, node, section)


def to_dict(config: Any) -> dict:
    """Plain-JSON view of a (nested) config dataclass; tuples become lists."""
    def convert(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: convert(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [convert(x) for x in v]
        return v
    return convert(config)
