"""JSON files as typed dataclasses: writing (:func:`dump`), reading with one error naming the misfit
(:func:`load`), and the JSON Schema of a type (:func:`schema`) that ``deploy/schema/`` holds for the
files the device and the workstation exchange (the bundle manifest, the device state)."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import field
from typing import Any

JSON_SCHEMA = "https://json-schema.org/draft/2020-12/schema"


def optional() -> Any:
    """A field that may be absent: None in the type, no key in the JSON."""
    return field(default=None, metadata={"optional": True})


class Misfit(Exception):
    """Where the JSON does not fit the type."""


def dump(value: Any) -> Any:
    """``value`` (dataclasses, dicts, lists, scalars) as plain JSON values; absent optionals left out."""
    if dataclasses.is_dataclass(value):
        return {
            f.name: dump(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if not (f.metadata.get("optional") and getattr(value, f.name) is None)
        }
    if isinstance(value, dict):
        return {k: dump(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [dump(v) for v in value]
    return value


def load(tp: Any, data: Any, where: str = "") -> Any:
    """``data`` (parsed JSON) as type ``tp``: dataclasses, list/tuple/dict of them, optionals, scalars.
    Keys the type does not name are ignored (a newer writer may add some)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(data, dict):
            raise Misfit(f"{where or 'the top level'} is not an object")
        hints = typing.get_type_hints(tp)
        values = {}
        for f in dataclasses.fields(tp):
            path = f"{where}.{f.name}" if where else f.name
            if f.name in data:
                values[f.name] = load(hints[f.name], data[f.name], path)
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise Misfit(f"{path} is missing")
        return tp(**values)
    if origin is types.UnionType:  # X | None
        if data is None:
            return None
        return load(next(a for a in args if a is not type(None)), data, where)
    if origin is list or origin is tuple:
        if not isinstance(data, list):
            raise Misfit(f"{where} is not a list")
        items = [load(args[0], v, f"{where}[{i}]") for i, v in enumerate(data)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(data, dict):
            raise Misfit(f"{where} is not an object")
        return {str(k): load(args[1], v, f"{where}.{k}") for k, v in data.items()}
    if tp is Any:
        return data
    if tp is float and isinstance(data, int | float) and not isinstance(data, bool):
        return float(data)
    if tp in (int, str, bool) and type(data) is tp:
        return data
    raise Misfit(f"{where} is {data!r}, not {getattr(tp, '__name__', tp)}")


_SCALARS = {str: "string", int: "integer", float: "number", bool: "boolean"}


def schema(tp: Any, *, title: str | None = None, consts: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON Schema (2020-12) of what :func:`dump` writes for type ``tp``: every field not
    optional is required; ``consts`` pins top-level fields to one value (a format name)."""
    out: dict[str, Any] = {"$schema": JSON_SCHEMA}
    if title:
        out["title"] = title
    out |= _schema(tp)
    for name, value in (consts or {}).items():
        out["properties"][name] = {"const": value}
    return out


def _schema(tp: Any) -> dict[str, Any]:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        fields = dataclasses.fields(tp)
        node: dict[str, Any] = {"type": "object"}
        if tp.__doc__ and not tp.__doc__.startswith(f"{tp.__name__}("):
            node["description"] = " ".join(tp.__doc__.split())
        node["properties"] = {f.name: _schema(_non_null(hints[f.name]) if f.metadata.get("optional") else hints[f.name]) for f in fields}
        required = [f.name for f in fields if not f.metadata.get("optional")]
        if required:
            node["required"] = required
        return node
    if origin is types.UnionType:
        inner = [_schema(a) for a in args if a is not type(None)]
        return {"anyOf": [*inner, {"type": "null"}]} if type(None) in args else {"anyOf": inner}
    if origin is list or origin is tuple:
        return {"type": "array", "items": _schema(args[0])}
    if origin is dict:
        return {"type": "object", "additionalProperties": _schema(args[1])}
    if tp is Any:
        return {}
    if tp in _SCALARS:
        return {"type": _SCALARS[tp]}
    raise TypeError(f"no JSON Schema for {tp!r}")


def _non_null(tp: Any) -> Any:
    """An optional field's type without its None: present means a value."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if typing.get_origin(tp) is types.UnionType and len(args) == 1 else tp
