"""`fastmem fit` and `fastmem plan` through fastmem.cli.main."""

import csv
import json
import sqlite3

import numpy as np
import pytest

from fastmem.cli import main
from fastmem.law import LawFit

COLUMNS = ("rank", "length", "objective", "base_loss", "final_loss", "delta_loss", "status")


def sweep_rows():
    rows = []
    for rank in (1, 2, 4, 8, 16):
        for length in (64, 128, 256, 512, 1024):
            delta = 30.0 * rank ** 0.5 * length ** -0.7 + 0.4
            rows.append((rank, length, "sft", 10.0, 10.0 - delta, delta, "done"))
    rows.append((32, 64, "sft", 4.0, 0.2, 3.8, "done"))           # saturated: excluded
    rows.append((32, 128, "sft", 4.0, None, None, "running"))     # half-written: never counted
    rows.append((2, 64, "ot", 4.0, 1.0, 3.0, "done"))             # another objective
    return rows


@pytest.fixture
def sweep_db(tmp_path):
    path = tmp_path / "sweep.sqlite"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE runs (id INTEGER PRIMARY KEY, rank INT, length INT, objective TEXT, "
                     "base_loss REAL, final_loss REAL, delta_loss REAL, status TEXT)")
        conn.executemany(f"INSERT INTO runs ({', '.join(COLUMNS)}) VALUES (?, ?, ?, ?, ?, ?, ?)", sweep_rows())
    return path


def test_fit_from_sqlite_writes_report_and_plots(sweep_db, tmp_path, capsys):
    out = tmp_path / "fit"
    assert main(["fit", "--db", str(sweep_db), "--where", "objective=sft", "--out", str(out),
                 "--bootstrap", "50"]) == 0
    report = capsys.readouterr().out
    assert "25 runs used, 1 dropped" in report and "R² = 1.0000" in report
    # The runs lie exactly on a law: out of sample too; the plane cannot follow the power law.
    assert "leave-one-out (each run predicted by a refit on the others): R² = 1.0000" in report
    assert "plane baseline ΔL = a + p·ln r + q·ln ℓ (3 parameters): R² = 0.8192" in report
    data = json.loads((out / "fit.json").read_text())
    assert data["r2_loo"] == pytest.approx(1.0) and data["plane"]["r2_loo"] < 0.99
    assert data["n_used"] == 25 and data["n_dropped"] == 1
    assert data["alpha"] == pytest.approx(0.5, abs=1e-3) and data["beta"] == pytest.approx(0.7, abs=1e-3)
    for png in ("fit_residuals.png", "fit_surface.png"):
        assert (out / png).stat().st_size > 10_000


def test_fit_refuses_to_mix_objectives(sweep_db, tmp_path, capsys):
    assert main(["fit", "--db", str(sweep_db), "--out", str(tmp_path / "x")]) == 2
    assert "--where objective=NAME" in capsys.readouterr().err


def test_fit_from_csv_with_layers_and_base_loss_only(tmp_path, capsys):
    path = tmp_path / "runs.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["rank", "length", "base_loss", "final_loss", "layers"])
        for i, (rank, length) in enumerate((r, n) for r in (1, 2, 4, 8) for n in (50, 100, 200, 400)):
            layers = 1 + i % 2
            delta = 20.0 * (rank * layers) ** 0.3 * length ** -0.5 + 0.2
            writer.writerow([rank, length, 5.0, 5.0 - delta, layers])
    out = tmp_path / "fit"
    assert main(["fit", "--csv", str(path), "--out", str(out), "--bootstrap", "0"]) == 0
    fit = LawFit.from_json(out / "fit.json")
    assert fit.variable == "effective_params"
    assert fit.alpha == pytest.approx(0.3, abs=1e-3)
    assert "(rank×layers)" in capsys.readouterr().out


def test_plan_prints_the_rank(sweep_db, tmp_path, capsys):
    out = tmp_path / "fit"
    assert main(["fit", "--db", str(sweep_db), "--where", "objective=sft", "--out", str(out),
                 "--bootstrap", "0"]) == 0
    capsys.readouterr()
    fit = LawFit.from_json(out / "fit.json")
    assert main(["plan", "--length", "10000", "--delta-loss", "1.0", "--fit", str(out / "fit.json")]) == 0
    rank = int(capsys.readouterr().out.strip())
    assert rank == fit.rank_for(10000, 1.0)
    assert fit.predict(rank, 10000) >= 1.0 > fit.predict(rank - 1, 10000)
    # --base-loss: the drop needed to bring the loss under ln 2.
    assert main(["plan", "--length", "10000", "--base-loss", str(1.0 + np.log(2)), "--fit", str(out)]) == 0
    assert int(capsys.readouterr().out.strip()) == rank
    # Unreachable under a cap: exit 1 with the reason.
    assert main(["plan", "--length", "10000", "--delta-loss", "1.0", "--fit", str(out),
                 "--max-rank", str(rank - 1)]) == 1
    assert "no rank up to rank" in capsys.readouterr().out


def test_cli_bad_input_exits_2(tmp_path, capsys):
    assert main(["fit", "--csv", str(tmp_path / "nope.csv"), "--out", str(tmp_path)]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["plan", "--length", "100", "--delta-loss", "1", "--fit", str(tmp_path)]) == 2
    assert "no fit file" in capsys.readouterr().err
    empty = tmp_path / "empty.sqlite"
    sqlite3.connect(empty).close()
    assert main(["fit", "--db", str(empty), "--out", str(tmp_path / "o")]) == 2
    assert "no table 'runs'" in capsys.readouterr().err


def test_plan_warns_when_it_extrapolates(sweep_db, tmp_path, capsys):
    """Lengths 64-1024 and ranks 1-16 were fitted: an answer outside them says so, on one line."""
    out = tmp_path / "fit"
    assert main(["fit", "--db", str(sweep_db), "--where", "objective=sft", "--out", str(out),
                 "--bootstrap", "0"]) == 0
    capsys.readouterr()
    assert main(["plan", "--length", "512", "--delta-loss", "1.0", "--fit", str(out)]) == 0
    assert "extrapolating" not in capsys.readouterr().err  # inside the measured grid: no warning
    assert main(["plan", "--length", "10000", "--delta-loss", "1.0", "--fit", str(out)]) == 0
    captured = capsys.readouterr()
    warning = [line for line in captured.err.splitlines() if "extrapolating" in line]
    assert len(warning) == 1 and warning[0].startswith("fastmem plan: warning: extrapolating: length 10000 is "
                                                       "above the fitted lengths 64–1024")
    rank = int(captured.out.strip())
    assert (f"rank {rank} is above the fitted ranks 1–16" in warning[0]) == (rank > 16)
    assert LawFit(C=1, alpha=1, beta=1, b=0, r2=1, mape=0, n_used=0, n_dropped=0).extrapolation(4, 1e6) == ""
