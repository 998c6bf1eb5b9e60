"""Settings from a YAML (.yaml/.yml) or TOML (.toml) file, for the CLI commands that take many."""

from __future__ import annotations

import tomllib
from pathlib import Path


def load_settings(path: str | Path, known: set[str], what: str) -> dict:
    """The file's top-level mapping, refusing keys outside `known` (a typo must not be ignored)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} config {path} not found")
    if path.suffix == ".toml":
        values = tomllib.loads(path.read_text())
    elif path.suffix in (".yaml", ".yml"):
        import yaml
        values = yaml.safe_load(path.read_text()) or {}
    else:
        raise ValueError(f"{what} config must be .yaml, .yml or .toml, got {path.name}")
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of {what} settings, got {type(values).__name__}")
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{path}: unknown {what} setting(s) {unknown}; known: {sorted(known)}")
    return values
