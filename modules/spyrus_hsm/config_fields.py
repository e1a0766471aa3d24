"""How a configuration key is read and checked: its annotation gives its type, its field's
metadata its allowed range, so one loop checks every bounded key and the reference pages can
print the same words the error messages use.

    workers: int = ranged(4, 1, 64, says="between 1 and 64")
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from .errors import Kind, SpyrusError

YEAR = 365 * 24 * 3600


class ConfigError(SpyrusError, ValueError, kind=Kind.CONFIG):
    """The configuration is invalid; the message names the key and where it came from."""


@dataclass(frozen=True)
class Bounds:
    """low <= value <= high (None: no limit on that side); `above`/`below` make a side strict.
    `says` completes "'key' must be ..." in the error message and the reference."""
    low: float | None
    high: float | None
    says: str
    above: bool = False
    below: bool = False

    def allows(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.above else value < self.low):
            return False
        return self.high is None or (value < self.high if self.below else value <= self.high)


def bounds(low: float | None, high: float | None = None, *, says: str | None = None, unit: str = "",
           above: bool = False, below: bool = False) -> dict[str, Bounds]:
    """Field metadata for a number in a range; `says` defaults to "LOW to HIGH[ unit]"."""
    if says is None:
        says = f"{low} to {high}" if high is not None else f">= {low}"
        says += f" {unit}" if unit else ""
    return {"bounds": Bounds(low, high, says, above, below)}


def ranged(default: float, low: float | None, high: float | None = None, *, says: str | None = None,
           unit: str = "", above: bool = False, below: bool = False) -> Any:
    """A dataclass field with that default and those bounds (see `bounds`)."""
    return field(default=default, metadata=bounds(low, high, says=says, unit=unit, above=above, below=below))


def field_bounds(cls: type[Any]) -> dict[str, Bounds]:
    """The bounded fields of a config dataclass, by name."""
    return {f.name: f.metadata["bounds"] for f in fields(cls) if "bounds" in f.metadata}


def ranges_of(sections: dict[str, type[Any]]) -> dict[str, str]:
    """'section.key' -> "must be ..." for each bounded field of the sections' dataclasses."""
    return {f"{name}.{key}": f"must be {rule.says}"
            for name, cls in sections.items() for key, rule in field_bounds(cls).items()}


def check_bounds(section: object, name: str, where: str) -> None:
    """ConfigError for the first field of `section` (a config dataclass read as `name`) outside
    its bounds."""
    for key, rule in field_bounds(type(section)).items():
        value = getattr(section, key)
        if not rule.allows(value):
            raise ConfigError(f"{where}: '{name}.{key}' must be {rule.says}, got {value}")


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file {path} is not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def section(cls: type[Any], value: Any, name: str, source: str) -> Any:
    """A config dataclass from one mapping of the file, each value typed by its annotation."""
    if value is None:
        return cls()
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: '{name}' must be a mapping")
    known = hints(cls)
    kwargs = {}
    for key, item in value.items():
        if key not in known:
            raise ConfigError(f"{source}: unknown key '{name}.{key}' (known: {', '.join(known)})")
        kwargs[key] = typed(known[key], item, f"{name}.{key}", source)
    return cls(**kwargs)


def as_list(value: Any, key: str, source: str) -> list[Any]:
    """A list (a single string is a list of one; null, an empty one)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise ConfigError(f"{source}: '{key}' must be a list")
    return value


def hints(cls: type[Any]) -> dict[str, Any]:
    """The annotated type of each field of a config dataclass."""
    found = get_type_hints(cls)
    return {f.name: found[f.name] for f in fields(cls)}


_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


def typed(hint: Any, value: Any, key: str, source: str) -> Any:
    """`value` as the annotation `hint` wants it, or ConfigError naming `key` and `source`."""
    args = get_args(hint)
    optional = get_origin(hint) in (Union, types.UnionType) and type(None) in args
    if optional:
        [hint] = [a for a in args if a is not type(None)]
        args = get_args(hint)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{source}: '{key}' must be {_describe(hint)}, not null")
    if get_origin(hint) is Literal:
        if value not in args:
            raise ConfigError(f"{source}: '{key}' must be one of {', '.join(map(str, args))}, got {value!r}")
        return value
    if hint is float and type(value) is int:
        return float(value)
    if type(value) is not hint:  # exact: a bool is not an int, a number is not a string
        if hint is str and isinstance(value, (int, float, bool)):
            raise ConfigError(f"{source}: '{key}' must be a string, but YAML read {value!r} as "
                              f"{_NAMES[type(value)]}; put it in quotes")
        raise ConfigError(f"{source}: '{key}' must be {_describe(hint)}, got {value!r}")
    return value


def _describe(hint: Any) -> str:
    if get_origin(hint) is Literal:
        return "one of " + ", ".join(map(str, get_args(hint)))
    return getattr(hint, "__name__", str(hint))
