"""Reading configs: ``key=value`` overrides, dotted keys, and building the nested dataclasses
of t2sda/config.py from a mapping with every value coerced to its field's type."""

from __future__ import annotations

import dataclasses
import math
import types
import typing


class ConfigError(ValueError):
    """A bad key or value; the message is one line naming the key, value and what is allowed."""


def _missing(full: dict, given: dict, *, prefix: str) -> list[str]:
    """Dotted keys of ``full`` absent from ``given`` (a whole absent section as ``name.*``)."""
    out = []
    for key, value in full.items():
        if key not in given:
            out.append(prefix + key + (".*" if isinstance(value, dict) else ""))
        elif isinstance(value, dict) and isinstance(given[key], dict):
            out += _missing(value, given[key], prefix=prefix + key + ".")
    return out


def _split(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r}: expected key=value, e.g. method.pull_weight=0.1")
    return key.strip(), value.strip()


def _set_dotted(raw: dict, key: str, value) -> None:
    node, parts = raw, key.split(".")
    for depth, part in enumerate(parts):
        if not isinstance(node, dict) or part not in node:
            where = ".".join(parts[:depth]) or "top level"
            known = ", ".join(sorted(node)) if isinstance(node, dict) else "none"
            raise ConfigError(f"unknown config key {key!r} (keys at {where}: {known})")
        if depth == len(parts) - 1:
            if isinstance(node[part], dict):
                raise ConfigError(f"config key {key!r} is a section; set one of its fields")
            node[part] = value
        else:
            node = node[part]


def _coerce(key: str, value, kind):
    """Turn a value (often a CLI string) into ``kind``, or raise a one-line ConfigError."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{key}={value!r}: expected a boolean (true/false)")
    if kind is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r}: expected an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(str(value))
        except ValueError:
            raise ConfigError(f"{key}={value!r}: expected an integer") from None
    if kind is float:
        try:
            number = float(value) if not isinstance(value, bool) else None
        except (TypeError, ValueError):
            number = None
        if number is None or not math.isfinite(number):
            raise ConfigError(f"{key}={value!r}: expected a finite number")
        return number
    if kind is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}={value!r}: expected a string")
        return str(value)
    raise TypeError(f"unsupported field type {kind} for {key}")


def _build(cls, raw, *, prefix: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - fields)
    if unknown:
        names = ", ".join(repr(prefix + key) for key in unknown)
        raise ConfigError(f"unknown config key{'s' if len(unknown) > 1 else ''} {names} "
                          f"(known: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, value in raw.items():
        kind, key = hints[name], prefix + name
        if isinstance(kind, types.UnionType):
            raise TypeError(f"union field {key} is not supported")
        if dataclasses.is_dataclass(kind):
            kwargs[name] = _build(kind, value, prefix=key + ".")
        else:
            kwargs[name] = _coerce(key, value, kind)
    return cls(**kwargs)
