"""Dataclasses read back from JSON that may have been edited or received: every value is checked
against its field's annotation on the way in, nested dataclasses included; nothing is coerced
(a bool is not an int) and nothing but data is built."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any


class JsonShapeError(ValueError):
    """A JSON value that does not fit the dataclass it should describe; the message names where."""


def has_type(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits an annotation of plain data (no dataclasses: see ``from_json``)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(has_type(value, option) for option in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(has_type(v, item) for v in value)
    if origin is dict:
        key_type, item = typing.get_args(hint)
        return isinstance(value, dict) and all(isinstance(k, key_type) and has_type(v, item) for k, v in value.items())
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if dataclasses.is_dataclass(hint):
        return False
    return isinstance(value, hint)


def type_name(hint: Any) -> str:
    return str(hint).replace("typing.", "") if typing.get_origin(hint) else getattr(hint, "__name__", str(hint))


def from_json(cls: type, value: Any, where: str = "") -> Any:
    """An instance of dataclass ``cls`` from ``value``; keys it does not declare are ignored."""
    if not isinstance(value, dict):
        raise JsonShapeError(f"{where or cls.__name__} is {type(value).__name__}, not an object")
    hints = typing.get_type_hints(cls)
    values = {}
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        if field.name not in value:
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                raise JsonShapeError(f"{where}.{field.name} is missing".lstrip("."))
            continue
        values[field.name] = _value(hints[field.name], value[field.name], f"{where}.{field.name}".lstrip("."))
    return cls(**values)


def _value(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return from_json(hint, value, where)
    if origin is list and dataclasses.is_dataclass(typing.get_args(hint)[0]):
        if not isinstance(value, list):
            raise JsonShapeError(f"{where} is {type(value).__name__}, not a list")
        item = typing.get_args(hint)[0]
        return [from_json(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        dataclass_options = [option for option in options if dataclasses.is_dataclass(option)]
        if dataclass_options and isinstance(value, dict):
            return from_json(dataclass_options[0], value, where)
    if not has_type(value, hint):
        raise JsonShapeError(f"{where} is {value!r:.40}, not {type_name(hint)}")
    return value
