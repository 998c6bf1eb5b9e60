"""Open an SQLite results database for reading only: nothing is created beside it, nothing in
it changes, and a database in a read-only place (a shipped result, a shared mount) opens.

A WAL-mode database (every sweep database is one) normally needs a writable `-shm` file beside
it even to read, so a plain read-only open fails with "unable to open database file" where the
directory is not writable, and where it is writable leaves `-shm`/`-wal` files behind. With no
write-ahead log pending (no `-wal` file, or an empty one) everything is in the main file and it
is opened `immutable` (no locks, no side files); with one pending, a normal read-only open
sees it, and where that cannot open the main file alone is read (immutable) as a last resort.
"""

from __future__ import annotations

import sqlite3
import urllib.parse
from pathlib import Path

from fastmem.errors import UsageError


def _uri(path: Path, immutable: bool) -> str:
    return f"file:{urllib.parse.quote(str(path.resolve()))}?mode=ro" + ("&immutable=1" if immutable else "")


def connect_read_only(path: str | Path, what: str = "database") -> sqlite3.Connection:
    """A read-only connection to the SQLite file `path` (which must exist)."""
    path = Path(path)
    wal = path.with_name(path.name + "-wal")
    pending = wal.is_file() and wal.stat().st_size > 0
    try:
        if pending:
            try:
                conn = sqlite3.connect(_uri(path, immutable=False), uri=True, timeout=60.0)
                conn.execute("SELECT name FROM sqlite_master LIMIT 1").fetchall()
                return conn
            except sqlite3.OperationalError:
                pass  # e.g. no -shm and no right to create one: read what the main file holds
        conn = sqlite3.connect(_uri(path, immutable=True), uri=True)
        conn.execute("SELECT name FROM sqlite_master LIMIT 1").fetchall()
        return conn
    except sqlite3.DatabaseError as err:
        raise UsageError(f"{what} {path} cannot be read as SQLite ({err})") from None


def table_names(conn: sqlite3.Connection) -> set[str]:
    return {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
