"""load_runs: the sweep's SQLite / CSV columns, status filter, ΔL from losses, layer lists."""

import csv
import sqlite3

import pytest

from fastmem.law import load_runs


def write_csv(path, header, rows):
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_status_filter_delta_from_losses_and_layer_lists(tmp_path):
    path = write_csv(tmp_path / "runs.csv", ["rank", "length", "base_loss", "final_loss", "layers", "status"], [
        [1, 64, 4.0, 1.5, "20,24", "done"],
        [2, 64, 4.0, 1.0, "[18]", "done"],
        [4, 64, 4.0, "", 3, "running"],
    ])
    runs = load_runs(csv_path=path)
    assert len(runs) == 2
    assert runs.delta_loss == [2.5, 3.0] and runs.final_loss == [1.5, 1.0]
    assert runs.layers == [2.0, 1.0]


def test_sqlite_where_filter_and_optional_columns(tmp_path):
    path = tmp_path / "s.sqlite"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE runs (rank INT, length INT, objective TEXT, delta_loss REAL, status TEXT)")
        conn.executemany("INSERT INTO runs VALUES (?, ?, ?, ?, ?)",
                         [(1, 32, "sft", 1.0, "done"), (2, 32, "ot", 2.0, "done"), (4, 32, "ot", 3.0, "done")])
    runs = load_runs(db=path, where=["objective=ot"])
    assert runs.rank == [2.0, 4.0] and runs.final_loss is None and runs.layers is None
    with pytest.raises(ValueError, match="several objectives"):
        load_runs(db=path)
    with pytest.raises(ValueError, match="no column 'model'"):
        load_runs(db=path, where=["model=x"])
    with pytest.raises(ValueError, match="COLUMN=VALUE"):
        load_runs(db=path, where=["objective"])
    with pytest.raises(ValueError, match="no finished runs"):
        load_runs(db=path, where=["objective=sw"])


@pytest.mark.parametrize("header, row, message", [
    (["rank", "delta_loss"], [1, 2.0], "no column 'length'"),
    (["rank", "length", "final_loss"], [1, 32, 0.5], "needs a delta_loss column"),
    (["rank", "length", "delta_loss"], ["two", 32, 1.0], "'rank' holds 'two'"),
    (["rank", "length", "delta_loss", "layers"], [1, 32, 1.0, "a,b"], "neither a count nor"),
])
def test_bad_columns_are_named(tmp_path, header, row, message):
    path = write_csv(tmp_path / "bad.csv", header, [row])
    with pytest.raises(ValueError, match=message):
        load_runs(csv_path=path)


def test_exactly_one_source(tmp_path):
    with pytest.raises(ValueError, match="exactly one"):
        load_runs()
    with pytest.raises(FileNotFoundError):
        load_runs(csv_path=tmp_path / "missing.csv")
