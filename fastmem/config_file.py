"""Settings from a YAML (.yaml/.yml) or TOML (.toml) file, for the CLI commands that take many."""

from __future__ import annotations

from pathlib import Path

from fastmem.errors import UsageError


def load_settings(path: str | Path, known: set[str], what: str) -> dict:
    """The file's top-level mapping, refusing keys outside `known` (a typo must not be ignored)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} config {path} not found")
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
    unknown = sorted(set(values) - known)
    if unknown:
        raise UsageError(f"{path}: unknown {what} setting(s) {unknown}; known: {sorted(known)}")
    return values
