"""Settings from a YAML (.yaml/.yml) or TOML (.toml) file, for the CLI commands that take many.

Each value is checked against the type of its setting before anything slow happens, and a
wrong one is refused naming the setting and the file. What a reader of the file would mean is
accepted: a number written as a string (`lr: 1e-2`, which YAML reads as text), one value where
a list is expected (`layers: 20`, `modules: down_proj`) and comma-separated lists in one string
(`layers: 20,24`, as on the command line).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path

from fastmem.errors import MissingInput, UsageError


def load_settings(path: str | Path, known, what: str) -> dict:
    """The file's top-level mapping, refusing keys outside `known` (a typo must not be ignored).

    `known` is the settings dataclass (values are type-checked and converted as the module
    docstring says) or a set of setting names (names checked only).
    """
    path = Path(path)
    values = _read_mapping(path, what)
    names = {f.name for f in dataclasses.fields(known)} if dataclasses.is_dataclass(known) else set(known)
    unknown = sorted(set(values) - names)
    if unknown:
        raise UsageError(f"{path}: unknown {what} setting(s) {unknown}; known: {sorted(names)}")
    if dataclasses.is_dataclass(known):
        hints = typing.get_type_hints(known)
        values = {key: _typed(value, hints[key], f"{what} config {path}: {key}") for key, value in values.items()}
    return values


def _read_mapping(path: Path, what: str) -> dict:
    if not path.is_file():
        raise MissingInput(f"{what} config {path} not found")
    if path.suffix not in (".toml", ".yaml", ".yml"):
        raise UsageError(f"{what} config must be .yaml, .yml or .toml, got {path.name}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UsageError(f"{what} config {path} is not UTF-8 text (byte {err.start})") from None
    if path.suffix == ".toml":
        try:
            import tomllib  # Python >= 3.11
        except ImportError:
            raise UsageError(f"{what} config {path}: TOML needs Python >= 3.11; use YAML") from None
        try:
            values = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise UsageError(f"{what} config {path} is not valid TOML ({err})") from None
    else:
        import yaml
        try:
            values = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise UsageError(f"{what} config {path} is not valid YAML{where} "
                             f"({getattr(err, 'problem', None) or type(err).__name__})") from None
    if not isinstance(values, dict):
        raise UsageError(f"{path}: expected a mapping of {what} settings, got {type(values).__name__}")
    return values


def _typed(value, kind, label: str):
    """`value` as the type `kind` (int, float, bool, str, list[...], X | None), or UsageError."""
    args = typing.get_args(kind)
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (kind,) = [a for a in args if a is not type(None)]
        return _typed(value, kind, label)
    if typing.get_origin(kind) is list:
        (item,) = args
        if isinstance(value, str) and item is not str or isinstance(value, str) and "," in value:
            value = [part.strip() for part in value.split(",") if part.strip()]
        elif not isinstance(value, list):
            value = [value]  # one value where a list is expected: `layers: 20`
        return [_typed(v, item, f"{label}[{i}]") for i, v in enumerate(value)]
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise UsageError(f"{label} must be true or false, got {value!r}")
    if kind is int:
        number = _number(value)
        if number is not None and math.isfinite(number) and float(number).is_integer():
            return int(number)
        raise UsageError(f"{label} must be an integer, got {value!r}")
    if kind is float:
        number = _number(value)
        if number is not None and math.isfinite(number):
            return float(number)
        raise UsageError(f"{label} must be a finite number, got {value!r}")
    if kind is str:
        if isinstance(value, str):
            return value
        raise UsageError(f"{label} must be a string, got {value!r}")
    return value


def _number(value) -> int | float | None:
    """An int or float from a number or a numeric string (`"1e-2"`), None otherwise (bools too)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            pass
        try:
            return float(value)
        except ValueError:
            return None
    return None
