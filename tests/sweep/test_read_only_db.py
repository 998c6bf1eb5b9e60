"""Results databases are read read-only (issue 25): `fit` and `sweep --status` open a database
in a read-only place, the repository's own shipped ones included, and create nothing beside it
(every sweep database is in WAL mode, which a plain read-only open cannot read there)."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from fastmem.cli import main
from fastmem.sweep import ResultsStore, SweepSpec

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted((REPO / "benchmarks" / "results" / "reproduce").rglob("law.sqlite"))


@pytest.fixture
def read_only_copy(tmp_path):
    """A shipped law database copied into a directory, both without write permission."""
    assert SHIPPED, "the repository ships its reproduction databases"
    folder = tmp_path / "ro"
    folder.mkdir()
    db = folder / "law.sqlite"
    shutil.copy(SHIPPED[0], db)
    assert db.read_bytes()[18:20] == b"\x02\x02"  # WAL mode, as every sweep database
    db.chmod(0o444)
    folder.chmod(0o555)
    yield db
    folder.chmod(0o755)


def test_fit_and_status_read_a_read_only_database_and_create_nothing(read_only_copy, tmp_path, capsys):
    before = sorted(p.name for p in read_only_copy.parent.iterdir())
    assert main(["sweep", "--db", str(read_only_copy), "--status"]) == 0
    out = capsys.readouterr().out
    assert '"done": ' in out and "smollm2|stress" in out
    assert main(["fit", "--db", str(read_only_copy), "--out", str(tmp_path / "fit"), "--bootstrap", "0"]) == 0
    assert (tmp_path / "fit" / "fit.json").is_file()
    assert sorted(p.name for p in read_only_copy.parent.iterdir()) == before  # no -shm, no -wal


def _can_mount_read_only(folder: Path) -> bool:
    if not shutil.which("unshare") or os.geteuid() != 0:
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount --bind {folder} {folder} && "
                            f"mount -o remount,bind,ro {folder}"], capture_output=True)
    return probe.returncode == 0


def test_on_a_read_only_mount(tmp_path):
    """Where the directory really cannot be written (root ignores permission bits, so a read-only
    bind mount stands in): a plain read-only open fails, `fit` and `--status` work."""
    folder = tmp_path / "mnt"
    folder.mkdir()
    shutil.copy(SHIPPED[0], folder / "law.sqlite")
    if not _can_mount_read_only(folder):
        pytest.skip("no read-only bind mount here (needs root and a mount namespace)")
    python = sys.executable
    script = (f"mount --bind {folder} {folder} && mount -o remount,bind,ro {folder} && "
              f"{python} -c \"import sqlite3; sqlite3.connect('file:{folder}/law.sqlite?mode=ro', uri=True)"
              f".execute('SELECT 1 FROM runs')\" 2>/dev/null; echo plain=$?; "
              f"{python} -m fastmem sweep --db {folder}/law.sqlite --status >/dev/null; echo status=$?; "
              f"{python} -m fastmem fit --db {folder}/law.sqlite --out {tmp_path}/fit --bootstrap 0 >/dev/null; "
              f"echo fit=$?")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.stdout.split() == ["plain=1", "status=0", "fit=0"], done.stdout + done.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["law.sqlite"]


def test_a_pending_write_ahead_log_is_seen(tmp_path):
    """A sweep still writing: its newest rows sit in the -wal file; a read-only store sees them."""
    db = tmp_path / "live.sqlite"
    store = ResultsStore(db)
    store.add_cells(SweepSpec(ranks=[1], lengths=[8]).cells())
    writer = sqlite3.connect(db)
    writer.execute("PRAGMA wal_autocheckpoint=0")
    writer.execute("UPDATE runs SET status='done'")
    writer.commit()
    assert Path(f"{db}-wal").stat().st_size > 0
    assert ResultsStore(db, read_only=True).status_counts() == {"done": 1}
    writer.close()


def test_status_of_a_database_without_runs_is_one_line(tmp_path, capsys):
    db = tmp_path / "other.sqlite"
    sqlite3.connect(db).execute("CREATE TABLE t (x)").connection.close()
    assert main(["sweep", "--db", str(db), "--status"]) == 2
    assert "is not a sweep results database (no table 'runs')" in capsys.readouterr().err
