"""Config dataclasses to and from plain (YAML / JSON) data, with errors that name the dotted key."""

from __future__ import annotations

import dataclasses
import math
import typing


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type or impossible; the message names the key."""


def differences(old, new, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two configs of one dataclass type, compared by
    value (so 1e-3 and 0.001 are the same, and a field an older spacejax did not write, read back
    at its default, differs only if the new config sets it otherwise)."""
    keys = []
    for field in dataclasses.fields(old):
        a, b = getattr(old, field.name), getattr(new, field.name)
        if dataclasses.is_dataclass(a) and dataclasses.is_dataclass(b):
            keys += differences(a, b, f"{prefix}{field.name}.")
        elif a != b:
            keys.append(prefix + field.name)
    return keys


def to_dict(config) -> dict:
    """A config dataclass as plain JSON/YAML-ready data (tuples become lists)."""
    def plain(value):
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value
    return plain(dataclasses.asdict(config))


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass `cls` from plain data, checking keys and types; errors name the dotted key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key {prefix}{unknown[0]}; known keys of {prefix or 'the config'}: "
                          f"{sorted(fields)}")
    hints = typing.get_type_hints(cls)
    values = {name: _coerce(hints[name], value, prefix + name) for name, value in data.items()}
    return cls(**values)


def _coerce(hint, value, key: str):
    """Check `value` against the annotation `hint`; nested dataclasses are built recursively."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        (hint,) = [a for a in args if a is not type(None)]
        return _coerce(hint, value, key)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, key + ".")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return tuple(_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads 1e-2 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{key} must be of type {hint.__name__}, got {value!r}")
    if hint is float and not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value!r}")
    return value
