"""Typed TOML tables: build a frozen dataclass from a table, checking every key and value.

Shared by the config file and the rules directory, so both report mistakes the same way:
the file, the dotted key, what was expected.
"""

from __future__ import annotations

import tomllib
import typing
from dataclasses import MISSING, fields, is_dataclass
from enum import Enum
from pathlib import Path

POSITIVE = {"positive": True}  # field metadata: a number above zero, or a list that is not empty


class ConfigError(Exception):
    """A configuration or rules problem; the message names the file and the key."""


def read_toml(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: {e}") from None


def build(cls, data: dict, path: Path, prefix: str = ""):
    """Instantiate dataclass `cls` from a TOML table, checking every key and type."""
    hints = typing.get_type_hints(cls)
    fields_by_name = {f.name: f for f in fields(cls) if f.init and not f.metadata.get("internal")}
    allowed = set(fields_by_name)
    kwargs = {}
    for key, value in data.items():
        if key not in allowed:
            raise ConfigError(f"{path}: unknown key {prefix}{key}")
        kwargs[key] = _coerce(value, hints[key], path, f"{prefix}{key}")
        if fields_by_name[key].metadata.get("positive") and not _positive(kwargs[key]):
            raise ConfigError(f"{path}: {prefix}{key} must be above zero (or a list that is not empty)")
    for name, f in fields_by_name.items():
        if name not in kwargs and f.default is MISSING and f.default_factory is MISSING:
            raise ConfigError(f"{path}: missing key {prefix}{name}")
    return cls(**kwargs)


def _positive(value) -> bool:
    return len(value) > 0 if isinstance(value, tuple) else value > 0


def _coerce(value, kind, path: Path, key: str):
    def wrong(expected: str):
        return ConfigError(f"{path}: {key} must be {expected}, not {value!r}")

    origin = typing.get_origin(kind)
    if is_dataclass(kind):
        if not isinstance(value, dict):
            raise wrong("a table")
        return build(kind, value, path, key + ".")
    if isinstance(kind, type) and issubclass(kind, Enum):
        names = [m.value for m in kind]
        if not isinstance(value, str) or value.upper() not in names:
            raise wrong("one of " + ", ".join(names))
        return kind(value.upper())
    if origin is typing.Literal:
        choices = typing.get_args(kind)
        if value not in choices:
            raise wrong("one of " + ", ".join(map(repr, choices)))
        return value
    if origin is tuple and is_dataclass(typing.get_args(kind)[0]):  # an array of tables: [[section.key]]
        if not isinstance(value, list) or not all(isinstance(i, dict) for i in value):
            raise wrong("an array of tables")
        return tuple(build(typing.get_args(kind)[0], item, path, f"{key}[{i}].") for i, item in enumerate(value))
    if origin is tuple:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise wrong("a string or a list of strings")
        return tuple(items)
    if kind is bool:
        if not isinstance(value, bool):
            raise wrong("true or false")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise wrong("a whole number, 0 or more")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong("a number")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise wrong("a string")
        return value
    raise TypeError(f"no coercion for {kind}")
