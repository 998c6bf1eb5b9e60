"""Files fastmem writes for the user, written so that a kill never leaves half of one.

Every writer here puts the new content into a temporary file beside the target (the same
directory, so the rename stays on one filesystem), flushes it to disk and renames it over the
target with os.replace, which is atomic on POSIX: a reader sees the old file or the new one,
never a mix. A temporary is named `.<target name>.<random>.tmp`, so a run directory's orphans
(a writer killed between the two steps) match `.<name>.*` (train/checkpoint.clean_stale_temps).

One module for the run directory, the checkpoints, the evaluator's report and `save_jsonl`.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from fastmem.errors import UsageError


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Replace `path` with `text` (UTF-8) in one step; the parent directory must exist."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:  # Ctrl-C included: no temporary left behind
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | os.PathLike, data, *, indent: int | None = 2) -> Path:
    """`data` as JSON (non-ASCII kept as is), replacing `path` in one step."""
    return write_text_atomic(path, json.dumps(data, indent=indent, ensure_ascii=False) + "\n")


def write_jsonl_atomic(path: str | os.PathLike, rows) -> Path:
    """One JSON object per line (already-serialized strings are written as they are)."""
    lines = (row if isinstance(row, str) else json.dumps(row, ensure_ascii=False) for row in rows)
    return write_text_atomic(path, "".join(line + "\n" for line in lines))


def read_json(path: str | os.PathLike):
    """The JSON value in `path`, or None when it is missing, unreadable or not JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def check_nearest_parent(path, flag: str) -> None:
    """The nearest existing parent of `path` is a writable directory (where it, or a staging
    directory beside it, will be created); UsageError naming `flag` otherwise."""
    for parent in Path(path).parents:
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"{flag} {path}: {parent} is a file, not a directory")
            if not os.access(parent, os.W_OK):
                raise UsageError(f"{flag} {path}: {parent} is not writable")
            return


def parse_json_object(text: str, where: str, example: str = "") -> dict:
    """One JSON-lines record: a JSON object, or UsageError naming `where` (file:line)."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        raise UsageError(f"{where}: invalid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(record, dict):
        raise UsageError(f"{where}: expected a JSON object{example}, got {type(record).__name__}")
    return record
