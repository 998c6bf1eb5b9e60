"""Read sweep runs (rank, length, ΔL, final loss, layers) from the sweep's SQLite or a CSV.

The sweep writes a table `runs` with at least the columns rank, length, objective, base_loss,
final_loss, delta_loss and status; only rows with status 'done' are finished runs. A CSV with
the same column names is read the same way. `delta_loss` may be absent when base_loss and
final_loss are present (ΔL = base_loss − final_loss); `layers` is optional: the adapted layer
count, or the layer indices ("20,24" or "[20, 24]") whose count is taken.
"""

from __future__ import annotations

import csv
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from fastmem.errors import UsageError

DONE = "done"
# Columns that name what a run trained; fitting across several values mixes different laws.
CONFIG_COLUMNS = ("objective",)


@dataclass
class Runs:
    """Finished runs, one entry per run in every list (layers is None when no run has it)."""

    rank: list[float]
    length: list[float]
    delta_loss: list[float]
    final_loss: list[float] | None
    layers: list[float] | None

    def __len__(self) -> int:
        return len(self.rank)


def _number(column: str, value, row_no: int) -> float | None:
    if value is None or (isinstance(value, str) and value.strip() == ""):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise UsageError(f"run {row_no}: column {column!r} holds {value!r}, not a number") from None


def _layer_count(value, row_no: int) -> float | None:
    """`layers` holds a count, or the adapted layer indices as "20,24" / "[20, 24]"."""
    if isinstance(value, str) and ("," in value or value.strip().startswith("[")):
        indices = [v for v in value.strip().strip("[]").split(",") if v.strip()]
        if not all(v.strip().lstrip("-").isdigit() for v in indices):
            raise UsageError(f"run {row_no}: column 'layers' holds {value!r}, neither a count nor "
                             "a list of layer indices")
        return float(len(indices))
    return _number("layers", value, row_no)


def _read_sqlite(path: Path) -> list[dict]:
    # mode=ro: reading a results database must never create or change one.
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        conn.row_factory = sqlite3.Row
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "runs" not in tables:
            raise UsageError(f"{path} has no table 'runs' (tables: {sorted(tables) or 'none'})")
        return [dict(row) for row in conn.execute("SELECT * FROM runs")]


def _read_csv(path: Path) -> list[dict]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _parse_filters(filters: list[str] | None) -> dict[str, str]:
    parsed = {}
    for item in filters or []:
        column, sep, value = item.partition("=")
        if not sep or not column:
            raise UsageError(f"--where takes COLUMN=VALUE, got {item!r}")
        parsed[column.strip()] = value.strip()
    return parsed


def _select(rows: list[dict], filters: dict[str, str], source: Path) -> list[dict]:
    columns = set(rows[0]) if rows else set()
    for column in filters:
        if column not in columns:
            raise UsageError(f"--where {column}=...: {source} has no column {column!r} "
                             f"(columns: {', '.join(sorted(columns))})")
    if "status" in columns:
        rows = [r for r in rows if str(r["status"]).strip() == DONE]
    rows = [r for r in rows if all(str(r[c]).strip() == v for c, v in filters.items())]
    for column in CONFIG_COLUMNS:
        if column in columns and column not in filters:
            values = sorted({str(r[column]) for r in rows})
            if len(values) > 1:
                raise UsageError(f"runs of several {column}s ({', '.join(values)}) follow different "
                                 f"laws: pick one with --where {column}=NAME")
    return rows


def load_runs(db: str | Path | None = None, csv_path: str | Path | None = None,
              where: list[str] | None = None) -> Runs:
    """Finished runs from a sweep SQLite file (`db`) or a CSV (`csv_path`), exactly one of them.

    `where` holds COLUMN=VALUE filters (e.g. ["objective=sft"]). Rows whose status is not
    'done' are skipped (a half-written cell never counts).
    """
    if (db is None) == (csv_path is None):
        raise UsageError("give exactly one of --db or --csv")
    source = Path(db if db is not None else csv_path)
    if not source.is_file():
        raise FileNotFoundError(f"no such file: {source}")
    rows = _read_sqlite(source) if db is not None else _read_csv(source)
    rows = _select(rows, _parse_filters(where), source)
    if not rows:
        raise UsageError(f"{source} has no finished runs ('done') matching the filters")
    columns = set(rows[0])
    for needed in ("rank", "length"):
        if needed not in columns:
            raise UsageError(f"{source} has no column {needed!r}")
    if "delta_loss" not in columns and not {"base_loss", "final_loss"} <= columns:
        raise UsageError(f"{source} needs a delta_loss column, or base_loss and final_loss")

    ranks, lengths, deltas, finals, layers = [], [], [], [], []
    for i, row in enumerate(rows):
        values = {c: _number(c, row.get(c), i) for c in ("rank", "length", "delta_loss",
                                                          "base_loss", "final_loss")}
        values["layers"] = _layer_count(row.get("layers"), i)
        for needed in ("rank", "length"):
            if values[needed] is None:
                raise UsageError(f"run {i}: column {needed!r} is empty")
        delta = values["delta_loss"]
        if delta is None:
            if values["base_loss"] is None or values["final_loss"] is None:
                raise UsageError(f"run {i}: no delta_loss and no base_loss/final_loss to form it")
            delta = values["base_loss"] - values["final_loss"]
        ranks.append(values["rank"])
        lengths.append(values["length"])
        deltas.append(delta)
        finals.append(values["final_loss"])
        layers.append(values["layers"])
    return Runs(rank=ranks, length=lengths, delta_loss=deltas,
                final_loss=_all_or_none("final_loss", finals),
                layers=_all_or_none("layers", layers))


def _all_or_none(column: str, values: list[float | None]) -> list[float] | None:
    if all(v is None for v in values):
        return None
    missing = [i for i, v in enumerate(values) if v is None]
    if missing:
        raise UsageError(f"column {column!r} is empty for run {missing[0]} but set for others")
    return values
