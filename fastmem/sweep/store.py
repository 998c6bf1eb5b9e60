"""The results database: one row per sweep cell in SQLite, shared by any number of workers.

A cell moves pending -> running -> done (or failed). Claiming is one IMMEDIATE transaction,
so two workers never take the same cell; results are written with status 'done' in one
transaction, so a cell killed half-way is never counted. A 'running' cell is taken back when
its owner process is gone (same host) or its heartbeat is older than the lease.

Under the Ray executor the driver is the only writer: it claims cells as 'queued' (waiting
for a Ray slot; same lease rules as 'running'), marks one 'running' when its task starts, and
writes the task's result. Owners read "host:pid#worker"; liveness is the host:pid part.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
import time
from pathlib import Path

from fastmem.errors import UsageError
from fastmem.read_only_db import connect_read_only, table_names
from fastmem.sweep.spec import Cell

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    key TEXT PRIMARY KEY,
    model TEXT, data TEXT, ratio REAL, length INTEGER, rank INTEGER, objective TEXT, seed INTEGER,
    status TEXT NOT NULL DEFAULT 'pending',
    owner TEXT, claimed_at REAL, heartbeat REAL, finished_at REAL, attempts INTEGER DEFAULT 0,
    layers TEXT, base_loss REAL, final_loss REAL, delta_loss REAL, token_acc REAL, exact_match REAL,
    stubborn_tokens INTEGER, steps INTEGER, wall_s REAL, peak_mem_bytes INTEGER,
    config TEXT, versions TEXT, error TEXT, details TEXT
)
"""
RESULT_COLUMNS = ("layers", "base_loss", "final_loss", "delta_loss", "token_acc", "exact_match",
                  "stubborn_tokens", "steps", "wall_s", "peak_mem_bytes", "config", "versions")
# Everything else a cell reports (per-sample recall data, min p, ...) as one JSON object.
DETAILS_COLUMN = "details"


def owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _owner_alive(owner: str | None) -> bool:
    if not owner or ":" not in owner:
        return False
    host, pid = owner.partition("#")[0].rsplit(":", 1)  # "host:pid#worker"
    if host != socket.gethostname():
        return True  # another machine's worker: only its heartbeat can tell
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ResultsStore:
    """`read_only=True`: an existing database opened for reading (`--status`); nothing is
    created or changed, and one in a read-only place opens (fastmem.read_only_db)."""

    def __init__(self, path: str | Path, lease_s: float = 600.0, read_only: bool = False):
        self.path = Path(path)
        self.lease_s = lease_s
        self.read_only = read_only
        if read_only:
            with self._connect() as db:
                if "runs" not in table_names(db):
                    raise UsageError(f"--db {self.path} is not a sweep results database (no table 'runs')")
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(SCHEMA)
            columns = {row[1] for row in db.execute("PRAGMA table_info(runs)")}
            if DETAILS_COLUMN not in columns:  # a database from before the column existed
                db.execute(f"ALTER TABLE runs ADD COLUMN {DETAILS_COLUMN} TEXT")

    @contextlib.contextmanager
    def _connect(self):
        # Autocommit mode: every write below opens its own BEGIN IMMEDIATE ... COMMIT.
        db = (connect_read_only(self.path, "--db") if self.read_only
              else sqlite3.connect(self.path, timeout=60.0, isolation_level=None))
        try:
            db.execute("PRAGMA busy_timeout=60000")
            db.row_factory = sqlite3.Row
            yield db
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        finally:
            db.close()

    def add_cells(self, cells: list[Cell]) -> int:
        """Insert the cells not yet known; returns how many were new."""
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            before = db.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
            db.executemany(
                "INSERT OR IGNORE INTO runs (key, model, data, ratio, length, rank, objective, seed) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(c.key, c.model, c.data, c.ratio, c.length, c.rank, c.objective, c.seed) for c in cells])
            after = db.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
            db.execute("COMMIT")
        return after - before

    def claim(self, keys: list[str], owner: str | None = None) -> str | None:
        """Take the first claimable cell among `keys` (pending, or running with a dead owner or
        an expired lease); None when nothing is left."""
        owner = owner or owner_id()
        now = time.time()
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            by_key = self._claimable_rows(db)
            for key in keys:
                row = by_key.get(key)
                if row is None:
                    continue
                if self._is_claimable(row, now):
                    db.execute("UPDATE runs SET status='running', owner=?, claimed_at=?, heartbeat=?, "
                               "attempts=attempts+1, error=NULL WHERE key=?", (owner, now, now, key))
                    db.execute("COMMIT")
                    return key
            db.execute("COMMIT")
        return None

    def _claimable_rows(self, db) -> dict:
        rows = db.execute("SELECT key, status, owner, heartbeat FROM runs "
                          "WHERE status IN ('pending', 'queued', 'running')")
        return {row["key"]: row for row in rows}

    def _is_claimable(self, row, now: float) -> bool:
        if row["status"] == "pending":
            return True
        return not _owner_alive(row["owner"]) or now - (row["heartbeat"] or 0) > self.lease_s

    def queue_all(self, keys: list[str], owner: str) -> list[str]:
        """Claim every claimable cell among `keys` as 'queued' for `owner` (a Ray driver), in
        one transaction; returns the keys taken, in the order given. Attempts are counted when
        a task starts (`start`), not here."""
        now = time.time()
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            by_key = self._claimable_rows(db)
            taken = [key for key in keys if key in by_key and self._is_claimable(by_key[key], now)]
            db.executemany("UPDATE runs SET status='queued', owner=?, claimed_at=?, heartbeat=?, error=NULL "
                           "WHERE key=?", [(owner, now, now, key) for key in taken])
            db.execute("COMMIT")
        return taken

    def start(self, key: str, owner_prefix: str, owner: str) -> bool:
        """A task of driver `owner_prefix` started on cell `key`: it becomes 'running' under
        `owner` (which names where it runs) and its attempt is counted. False if the driver no
        longer holds the cell."""
        now = time.time()
        with self._connect() as db:
            return db.execute("UPDATE runs SET status='running', owner=?, heartbeat=?, attempts=attempts+1 "
                              "WHERE key=? AND status IN ('queued', 'running') AND substr(owner, 1, ?)=?",
                              (owner, now, key, len(owner_prefix), owner_prefix)).rowcount == 1

    def heartbeat_owned(self, owner_prefix: str) -> None:
        """Refresh the lease of every queued or running cell whose owner starts with `owner_prefix`."""
        with self._connect() as db:
            db.execute("UPDATE runs SET heartbeat=? WHERE status IN ('queued', 'running') AND substr(owner, 1, ?)=?",
                       (time.time(), len(owner_prefix), owner_prefix))

    def release(self, owner_prefix: str) -> int:
        """Put the queued and running cells of `owner_prefix` back to 'pending' (a driver that
        stops early); returns how many."""
        with self._connect() as db:
            return db.execute("UPDATE runs SET status='pending', owner=NULL WHERE status IN ('queued', 'running') "
                              "AND substr(owner, 1, ?)=?", (len(owner_prefix), owner_prefix)).rowcount

    def cell_states(self) -> list[dict]:
        """Every cell's state, for `--status`: key, status, attempts, owner, final_loss, error."""
        with self._connect() as db:
            return [dict(row) for row in db.execute(
                "SELECT key, status, attempts, owner, final_loss, wall_s, error FROM runs ORDER BY key")]

    def heartbeat(self, key: str, owner: str | None = None) -> None:
        with self._connect() as db:
            db.execute("UPDATE runs SET heartbeat=? WHERE key=? AND owner=?", (time.time(), key, owner or owner_id()))

    def complete(self, key: str, result: dict, owner: str | None = None) -> None:
        values = [json.dumps(result[c]) if isinstance(result.get(c), (dict, list)) else result.get(c)
                  for c in RESULT_COLUMNS]
        values.append(json.dumps({k: v for k, v in result.items() if k not in RESULT_COLUMNS}, sort_keys=True))
        assignments = ", ".join(f"{c}=?" for c in (*RESULT_COLUMNS, DETAILS_COLUMN))
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            db.execute(f"UPDATE runs SET {assignments}, status='done', finished_at=? WHERE key=? AND owner=?",
                       (*values, time.time(), key, owner or owner_id()))
            db.execute("COMMIT")

    def fail(self, key: str, error: str, owner: str | None = None) -> None:
        with self._connect() as db:
            db.execute("UPDATE runs SET status='failed', error=?, finished_at=? WHERE key=? AND owner=?",
                       (error[:2000], time.time(), key, owner or owner_id()))

    def status_counts(self) -> dict[str, int]:
        with self._connect() as db:
            return {row[0]: row[1] for row in db.execute("SELECT status, COUNT(*) FROM runs GROUP BY status")}

    def rows(self, status: str = "done") -> list[dict]:
        with self._connect() as db:
            return [dict(row) for row in db.execute("SELECT * FROM runs WHERE status=? ORDER BY key", (status,))]

    def retry_failed(self) -> int:
        with self._connect() as db:
            return db.execute("UPDATE runs SET status='pending' WHERE status='failed'").rowcount
