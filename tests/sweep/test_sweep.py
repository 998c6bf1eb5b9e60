"""Sweeps: exclusive claims, crash-safe results, resume after a kill, several workers."""

import json
import logging
import multiprocessing
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
import torch

from fastmem.cli import main
from fastmem.sweep import ResultsStore, SweepSpec
from fastmem.sweep.worker import run_worker

DEAD_PID = 2**22 + 12345  # above pid_max's default: no such process


@pytest.fixture
def spec():
    return SweepSpec(ranks=[1, 2], lengths=[8, 12], max_steps=2, ratios=[0.25])


def test_spec_cells_and_config_file(tmp_path):
    spec = SweepSpec(ranks=[1, 4], lengths=[32], objectives=["sft", "ot"], data=["stress", "phonebook"],
                     ratios=[0.0, 0.5])
    cells = spec.cells()
    assert len(cells) == 2 * 2 * (2 + 1)  # phonebook has no ratio axis
    assert len({c.key for c in cells}) == len(cells)
    (tmp_path / "s.yaml").write_text("ranks: [2, 3]\nlengths: [16]\nmax_steps: 7\n")
    (tmp_path / "s.toml").write_text("ranks = [5]\nlengths = [8]\n")
    assert SweepSpec.from_file(tmp_path / "s.yaml", max_steps=9).max_steps == 9
    assert SweepSpec.from_file(tmp_path / "s.toml").ranks == [5]
    (tmp_path / "bad.yaml").write_text("rankz: [1]\n")
    with pytest.raises(ValueError, match="unknown sweep setting"):
        SweepSpec.from_file(tmp_path / "bad.yaml")
    with pytest.raises(ValueError, match="ranks must be >= 1"):
        SweepSpec(ranks=[0]).cells()


def test_claims_are_exclusive_and_dead_owners_lose_their_cell(tmp_path, spec):
    store = ResultsStore(tmp_path / "r.sqlite", lease_s=3600)
    keys = [c.key for c in spec.cells()]
    assert store.add_cells(spec.cells()) == 4 and store.add_cells(spec.cells()) == 0
    first, second = store.claim(keys, owner="me:1#0"), store.claim(keys, owner="me:1#1")
    assert first != second
    # a live owner (this process) with a fresh heartbeat keeps its cell
    live = f"{os.uname().nodename}:{os.getpid()}#0"
    third = store.claim(keys, owner=live)
    fourth = store.claim(keys, owner=live)
    assert store.claim(keys, owner=live) is None
    # a worker on this host that died (no such pid) loses its running cell to the next claim
    with sqlite3.connect(store.path) as db:
        db.execute("UPDATE runs SET owner=? WHERE key=?", (f"{os.uname().nodename}:{DEAD_PID}", third))
    assert store.claim(keys, owner=live) == third
    # a worker on another host is judged by its heartbeat only
    with sqlite3.connect(store.path) as db:
        db.execute("UPDATE runs SET owner='elsewhere:1', heartbeat=? WHERE key=?", (time.time() - 7200, fourth))
    assert store.claim(keys, owner=live) == fourth
    assert store.status_counts() == {"running": 4}


def test_a_dead_ray_drivers_queued_and_running_cells_are_claimable_again(tmp_path, spec):
    store = ResultsStore(tmp_path / "r.sqlite")
    keys = [c.key for c in spec.cells()]
    store.add_cells(spec.cells())
    live = f"{os.uname().nodename}:{os.getpid()}#ray"
    assert store.queue_all(keys, live) == keys and store.queue_all(keys, "other:1#ray") == []
    assert store.start(keys[0], live, f"{live}@node:7") and not store.start(keys[1], "other:1#ray", "x")
    assert store.status_counts() == {"queued": 3, "running": 1}
    assert store.claim(keys, owner="me:1#0") is None  # a live driver keeps its cells
    dead = f"{os.uname().nodename}:{DEAD_PID}#ray"
    with sqlite3.connect(store.path) as db:
        db.execute("UPDATE runs SET owner=? || substr(owner, ?)", (dead, len(live) + 1))
    assert store.queue_all(keys, live) == keys  # its owner is gone: every cell is taken back
    assert store.release(live) == 4 and store.status_counts() == {"pending": 4}


def _claim_all(db_path, keys, worker, out):
    store = ResultsStore(db_path)
    owner = f"{os.uname().nodename}:{os.getpid()}#{worker}"
    while (key := store.claim(keys, owner)) is not None:
        store.complete(key, {"final_loss": 1.0, "delta_loss": 0.5, "steps": worker}, owner)
        out.put(key)


def test_several_processes_share_the_database(tmp_path):
    spec = SweepSpec(ranks=list(range(1, 9)), lengths=[8, 16, 32], max_steps=1)
    keys = [c.key for c in spec.cells()]
    ResultsStore(tmp_path / "r.sqlite").add_cells(spec.cells())
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    procs = [context.Process(target=_claim_all, args=(tmp_path / "r.sqlite", keys, i, queue)) for i in range(3)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
    done = [queue.get(timeout=10) for _ in range(len(keys))]
    assert sorted(done) == sorted(keys)  # every cell exactly once
    assert ResultsStore(tmp_path / "r.sqlite").status_counts() == {"done": len(keys)}


def test_worker_trains_every_cell_and_a_rerun_skips_them(tmp_path, spec, tiny_model_dir):
    from fastmem.models import load_model

    spec.model = str(tiny_model_dir)
    spec.adapters = str(tmp_path / "adapters")
    model, tokenizer = load_model(str(tiny_model_dir))
    db = tmp_path / "r.sqlite"
    assert run_worker(spec, db, model=model, tokenizer=tokenizer, progress=False) == 4
    for cell in spec.cells():  # --adapters: each cell's adapter as safetensors, under its own name
        assert (tmp_path / "adapters" / cell.slug / "adapter" / "adapter_model.safetensors").is_file()
    rows = ResultsStore(db).rows()
    assert len(rows) == 4
    for row in rows:
        assert row["steps"] == 2 and row["base_loss"] > 0 and row["final_loss"] > 0
        assert row["delta_loss"] == pytest.approx(row["base_loss"] - row["final_loss"])
        assert row["layers"] == "[2, 3]" and '"torch"' in row["versions"] and '"cpu"' in row["versions"]
        details = json.loads(row["details"])  # the recall data of each sample, decoded on request only
        assert len(details["min_p_per_sample"]) == len(details["teacher_forced_em_per_sample"]) == 1
        assert 0.0 <= details["min_p_per_sample"][0] <= 1.0 and details["decoded_em_per_sample"] in ([None], [False])
    assert not any("lora" in name for name, _ in model.named_modules())  # the base came back clean
    finished = {row["key"]: row["finished_at"] for row in rows}
    assert run_worker(spec, db, model=model, tokenizer=tokenizer, progress=False) == 0
    assert {row["key"]: row["finished_at"] for row in ResultsStore(db).rows()} == finished


def test_decode_check_decodes_every_sample_and_agrees_with_teacher_forcing(tmp_path, tiny_model_dir):
    from fastmem.models import load_model

    spec = SweepSpec(model=str(tiny_model_dir), ranks=[2], lengths=[8], max_steps=3, ratios=[0.25],
                     data=["stress", "phonebook"], decode_check=True)
    model, tokenizer = load_model(str(tiny_model_dir))
    db = tmp_path / "r.sqlite"
    assert run_worker(spec, db, model=model, tokenizer=tokenizer, progress=False) == 2
    for row in ResultsStore(db).rows():
        details = json.loads(row["details"])
        decoded, forced = details["decoded_em_per_sample"], details["teacher_forced_em_per_sample"]
        assert None not in decoded and decoded == forced and len(decoded) >= 1
        assert len(details["min_p_per_sample"]) == len(decoded) == len(details["answer_len_per_sample"])


def test_a_database_from_before_the_details_column_gains_it(tmp_path):
    db = tmp_path / "old.sqlite"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE runs (key TEXT PRIMARY KEY, model TEXT, data TEXT, ratio REAL, length INTEGER, "
                     "rank INTEGER, objective TEXT, seed INTEGER, status TEXT NOT NULL DEFAULT 'pending', owner TEXT, "
                     "claimed_at REAL, heartbeat REAL, finished_at REAL, attempts INTEGER DEFAULT 0, layers TEXT, "
                     "base_loss REAL, final_loss REAL, delta_loss REAL, token_acc REAL, exact_match REAL, "
                     "stubborn_tokens INTEGER, steps INTEGER, wall_s REAL, peak_mem_bytes INTEGER, config TEXT, "
                     "versions TEXT, error TEXT)")
        conn.execute("INSERT INTO runs (key, status, final_loss) VALUES ('old-cell', 'done', 1.5)")
    rows = ResultsStore(db).rows()
    assert rows[0]["final_loss"] == 1.5 and rows[0]["details"] is None


def test_killed_sweep_resumes_and_redoes_the_half_done_cell(tmp_path, tiny_model_dir):
    db = tmp_path / "r.sqlite"
    command = [sys.executable, "-m", "fastmem", "sweep", "--db", str(db), "--model", str(tiny_model_dir),
               "--ranks", "1,2,3", "--lengths", "8", "--max-steps", "40", "--no-progress"]
    env = dict(os.environ, TRITON_INTERPRET="0", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    counts = {}
    while time.time() < deadline:  # kill it while a cell is running after at least one is done
        counts = ResultsStore(db).status_counts() if db.exists() else {}
        if counts.get("done", 0) >= 1 and counts.get("running", 0) == 1:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert counts.get("done", 0) >= 1 and counts.get("running") == 1, counts
    done_before = {row["key"]: row["finished_at"] for row in ResultsStore(db).rows()}
    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    rows = ResultsStore(db).rows()
    assert len(rows) == 3 and ResultsStore(db).status_counts() == {"done": 3}
    for row in rows:
        if row["key"] in done_before:
            assert row["finished_at"] == done_before[row["key"]]  # finished cells were skipped
        else:
            assert row["attempts"] >= 1
    assert any(row["attempts"] == 2 for row in rows)  # the killed cell was redone


def test_cli_status_and_bad_input(tmp_path, capsys):
    assert main(["sweep", "--db", str(tmp_path / "r.sqlite"), "--status"]) == 0
    assert "{}" in capsys.readouterr().out
    assert not (tmp_path / "r.sqlite").exists()  # --status never creates a database
    assert main(["sweep", "--db", str(tmp_path / "r.sqlite"), "--ranks", "0"]) == 2
    assert "ranks must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "r.sqlite").exists()


def test_a_database_held_by_a_ray_driver_refuses_another_sweep(tmp_path, tiny_model_dir, capsys):
    """A Ray driver is its database's only writer and holds its lock: another sweep on it is
    refused (one line naming the driver's pid), and nothing is created or changed."""
    db = tmp_path / "r.sqlite"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    driver = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, sys.argv[2]); from fastmem import locks; "
        "locks.acquire(sys.argv[1], '--db'); print('held', flush=True); time.sleep(60)"), str(db), root],
        stdout=subprocess.PIPE, text=True)
    try:
        assert driver.stdout.readline().strip() == "held"
        before = sorted(p.name for p in tmp_path.iterdir())
        assert main(["sweep", "--db", str(db), "--model", str(tiny_model_dir), "--ranks", "1", "--lengths", "8",
                     "--max-steps", "1", "--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"is in use by process {driver.pid}" in err[0], err
        assert sorted(p.name for p in tmp_path.iterdir()) == before and not db.exists()
    finally:
        driver.kill()
        driver.wait()


def test_train_table_passes_trainer_settings_to_every_cell(tmp_path):
    """Issue 22: the authors' protocol in a sweep ([train] table), and the grid's own settings refused there."""
    from fastmem.sweep.worker import cell_config

    (tmp_path / "spec.toml").write_text('ranks = [2]\nlengths = [8]\n[train]\nmax_grad_norm = 1.0\n'
                                        'adapter = "mlp_block"\nstop_on = "em"\n')
    spec = SweepSpec.from_file(tmp_path / "spec.toml")
    config = cell_config(spec.cells()[0], spec)
    assert (config.max_grad_norm, config.adapter, config.stop_on, config.rank) == (1.0, "mlp_block", "em", 2)
    with pytest.raises(ValueError, match="not allowed"):
        SweepSpec(train={"rank": 4}).cells()
    with pytest.raises(ValueError, match="not allowed"):
        SweepSpec(train={"no_such_setting": 1}).cells()


def test_a_checkpointed_cell_resumes_where_it_was_killed(tmp_path, tiny_model_dir, caplog):
    """With --adapters and [train] checkpoint_every, a cell taken up again (its worker killed)
    continues from its newest checkpoint and ends as the cell run in one go."""
    from safetensors.torch import load_file

    from fastmem.models import load_model
    from fastmem.sweep.worker import cell_config, cell_samples, train_cell
    from fastmem.train import train

    def spec_in(name):
        return SweepSpec(model=str(tiny_model_dir), ranks=[2], lengths=[8], max_steps=6, ratios=[0.25],
                         adapters=str(tmp_path / name), train={"checkpoint_every": 2})

    whole, killed = spec_in("whole"), spec_in("killed")
    cell = whole.cells()[0]
    expected = train_cell(cell, whole, *load_model(str(tiny_model_dir)))
    # the killed worker: 3 steps, then gone without a final checkpoint (the last one is step 2's)
    model, tokenizer = load_model(str(tiny_model_dir))
    samples = cell_samples(cell, tokenizer)
    assert train(cell_config(cell, killed, len(samples)), samples, model=model, overwrite=True,
                 halt_after_steps=3).summary["halted"]
    assert any((tmp_path / "killed" / cell.slug / "checkpoints").iterdir())
    with caplog.at_level(logging.INFO, logger="fastmem"):
        resumed = train_cell(cell, killed, *load_model(str(tiny_model_dir)))
    assert "at step 2 of 6" in caplog.text  # continued, not started over (which would end the same)

    assert resumed["steps"] == expected["steps"] == 6
    assert resumed["final_loss"] == pytest.approx(expected["final_loss"], rel=1e-6, abs=1e-7)
    got, want = (load_file(tmp_path / name / cell.slug / "adapter" / "adapter_model.safetensors")
                 for name in ("killed", "whole"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
