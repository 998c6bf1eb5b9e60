"""A run that fails says so, one trainer per run, nothing lost to a signal (issue 25):
non-finite values stop the run (never a recall), the run-directory lock, SIGTERM then resume,
a damaged newest checkpoint, a budget-exhausted run continued, a huge --max-steps refused
cheaply, a bug keeps its traceback."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastmem import locks
from fastmem.cli import main
from fastmem.errors import RunFailed, UsageError
from fastmem.train import train
from fastmem.train.checkpoint import checkpoint_candidates
from tests.train.test_cli_bad_input import GOOD, OTHER, TRAIN_FLAGS, _jsonl
from tests.train.tiny import make_samples, tiny_config, tiny_model
from tests.train.tiny_cli_model import save_tiny_checkpoint

REPO = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny_ckpt"))


def _adapter(out: Path) -> dict:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# --- non-finite values -------------------------------------------------------------------------

def test_a_non_finite_loss_fails_the_run_and_is_never_a_recall(tmp_path):
    # lr 1e37 (the largest accepted): the first update blows the adapter up and the next
    # forward's loss is NaN, which the stop rule would once have counted as "all recalled".
    with pytest.raises(RunFailed, match=r"step 2: the loss is not finite"):
        train(tiny_config(lr=1e37, max_steps=20, out=str(tmp_path)), make_samples(1), model=tiny_model())
    assert not (tmp_path / "summary.json").exists() and not (tmp_path / "adapter").exists()
    assert [row["decision"] for row in _metrics(tmp_path)] == ["train"]


def test_nan_is_stubborn_for_every_reader_of_the_recall_rule():
    from fastmem.constants import is_stubborn
    from fastmem.ops import TokenStats

    loss = torch.tensor([[0.1, float("nan"), float("inf"), 2.0]])
    assert is_stubborn(loss).tolist() == [[False, True, True, True]]
    stats = TokenStats(loss=loss, prob=torch.exp(-loss), correct=torch.ones_like(loss, dtype=torch.bool),
                       lse=loss, weight=loss, valid=torch.ones_like(loss, dtype=torch.bool),
                       first_error=torch.tensor([-1]))
    assert not stats.all_recalled() and int(stats.stubborn_mask().sum()) == 3


def test_cli_non_finite_run_is_one_line_and_exit_1(tmp_path, model_dir, capsys):
    data = _jsonl(tmp_path / "d.jsonl", GOOD)
    code = main(["train", "--data", data, "--model", str(model_dir), "--out", str(tmp_path / "run"),
                 *TRAIN_FLAGS, "--lr", "1e37", "--max-steps", "20"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith("fastmem train: failed: step ") and "not finite" in err[0]
    assert not (tmp_path / "run" / "summary.json").exists()


@pytest.mark.parametrize("flag, value, message", [("--lr", "inf", "lr must be a finite number"),
                                                  ("--alpha", "nan", "alpha must be a finite number"),
                                                  ("--rank", "4096", "rank 4096 is larger than down_proj")])
def test_non_finite_or_oversized_settings_are_refused(tmp_path, model_dir, capsys, flag, value, message):
    data = _jsonl(tmp_path / "d.jsonl", GOOD)
    before = sorted(tmp_path.iterdir())
    code = main(["train", "--data", data, "--model", str(model_dir), "--out", str(tmp_path / "run"),
                 *TRAIN_FLAGS, flag, value])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert sorted(tmp_path.iterdir()) == before


def test_a_bug_keeps_its_traceback_and_run_failed_is_one_line(tmp_path, model_dir, monkeypatch, capsys):
    import fastmem.train.loop as loop

    def broken(*args, **kwargs):
        raise ValueError("a bug deep in training")

    monkeypatch.setattr(loop, "train_step", broken)
    argv = ["train", "--data", _jsonl(tmp_path / "d.jsonl", GOOD), "--model", str(model_dir),
            "--out", str(tmp_path / "run"), *TRAIN_FLAGS]
    with pytest.raises(ValueError, match="a bug deep in training"):  # not mapped to "bad input"
        main(argv)
    assert locks.holder(tmp_path / "run") is None and not (tmp_path / "run" / locks.LOCK_NAME).exists()


# --- the lock, SIGTERM, resume ----------------------------------------------------------------

def _start_trainer(argv, cwd) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fastmem", *argv], env=ENV, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_steps(proc, metrics: Path, steps: int) -> None:
    deadline = time.time() + 240
    while time.time() < deadline and (not metrics.is_file() or len(metrics.read_text().splitlines()) < steps):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)


def test_second_trainer_is_refused_then_sigterm_checkpoints_and_resumes(tmp_path, model_dir, capsys):
    data = _jsonl(tmp_path / "d.jsonl", GOOD)
    out = tmp_path / "run"
    argv = ["train", "--data", data, "--model", str(model_dir), "--out", str(out), "--rank", "2",
            "--layers", "2,3", "--max-steps", "100000", "--no-progress"]
    proc = _start_trainer(argv, tmp_path)
    try:
        _wait_for_steps(proc, out / "metrics.jsonl", 3)
        lines_before = len((out / "metrics.jsonl").read_text().splitlines())
        # a second trainer on the same --out: refused at once, naming the first one's pid
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"is in use by process {proc.pid}" in err[0], err
        assert len((out / "metrics.jsonl").read_text().splitlines()) >= lines_before  # untouched, still going
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, stderr
    last = stderr.strip().splitlines()[-1]
    assert "terminated (SIGTERM) at step" in last and "resume with: fastmem train" in last, stderr
    steps = len((out / "metrics.jsonl").read_text().splitlines())
    assert checkpoint_candidates(out / "checkpoints")[0].name == f"step-{steps:07d}"
    assert not (out / locks.LOCK_NAME).exists()  # released on the way out
    # resumed by the printed command, with a budget of two more steps
    resume_argv = last.split("resume with: fastmem ", 1)[1].split()
    assert resume_argv == argv
    resume_argv[resume_argv.index("--max-steps") + 1] = str(steps + 2)
    assert main(resume_argv) == 0
    rows = _metrics(out)
    assert [row["step"] for row in rows] == list(range(1, len(rows) + 1)) and len(rows) <= steps + 2
    assert json.loads((out / "summary.json").read_text())["steps"] == len(rows)


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / locks.LOCK_NAME).write_text(f"{dead.pid} 2026-01-01T00:00:00\n")  # left by a SIGKILL
    assert locks.holder(tmp_path) is None
    result = train(tiny_config(max_steps=2, out=str(tmp_path)), make_samples(1), model=tiny_model())
    assert result.summary["steps"] == 2 and not (tmp_path / locks.LOCK_NAME).exists()


def test_a_live_holder_is_named_and_the_lock_is_reentrant(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, sys.argv[2]); from fastmem import locks; "
        "locks.acquire(sys.argv[1]); print('held', flush=True); time.sleep(60)"), str(tmp_path), str(REPO)],
        stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert locks.holder(tmp_path) == holder.pid
        with pytest.raises(UsageError, match=f"in use by process {holder.pid}"):
            locks.acquire(tmp_path)
        with pytest.raises(UsageError, match=f"in use by process {holder.pid}"):
            train(tiny_config(max_steps=2, out=str(tmp_path)), make_samples(1), model=tiny_model())
    finally:
        holder.kill()
        holder.wait()
    locks.acquire(tmp_path)
    locks.acquire(tmp_path)  # the same process again: no self-deadlock
    locks.release(tmp_path)
    assert (tmp_path / locks.LOCK_NAME).exists()
    locks.release(tmp_path)
    assert not (tmp_path / locks.LOCK_NAME).exists()


# --- checkpoints -------------------------------------------------------------------------------

def _halted_run(out: Path, steps: int = 3):
    config = tiny_config(objective="sw", sw_window=2, dropout=0.1, max_steps=6, checkpoint_every=1,
                         out=str(out), stop_on_recall=False)
    train(config, make_samples(2), model=tiny_model(), halt_after_steps=steps)
    return config


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(tmp_path, caplog):
    straight = tmp_path / "straight"
    config = _halted_run(tmp_path / "damaged")
    train(tiny_config(objective="sw", sw_window=2, dropout=0.1, max_steps=6, checkpoint_every=1,
                      out=str(straight), stop_on_recall=False), make_samples(2), model=tiny_model())
    checkpoints = tmp_path / "damaged" / "checkpoints"
    assert [p.name for p in checkpoint_candidates(checkpoints)] == ["step-0000003", "step-0000002"]  # two kept
    state = checkpoints / "step-0000003" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # truncated after the fact
    with caplog.at_level(logging.WARNING, logger="fastmem"):
        resumed = train(config, make_samples(2), model=tiny_model())
    assert any("step-0000003 is damaged" in r.getMessage() for r in caplog.records), caplog.text
    assert resumed.summary["steps"] == 6
    a, b = _adapter(straight), _adapter(tmp_path / "damaged")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # step 3 redone exactly


def test_latest_naming_a_missing_step_falls_back_instead_of_starting_over(tmp_path, caplog):
    config = _halted_run(tmp_path)
    import shutil

    shutil.rmtree(tmp_path / "checkpoints" / "step-0000003")
    with caplog.at_level(logging.WARNING, logger="fastmem"):
        resumed = train(config, make_samples(2), model=tiny_model())
    assert any("not there: resuming from step-0000002" in r.getMessage() for r in caplog.records), caplog.text
    rows = _metrics(tmp_path)
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5, 6] and resumed.summary["steps"] == 6


def test_every_checkpoint_damaged_is_refused_not_restarted(tmp_path):
    config = _halted_run(tmp_path)
    for folder in checkpoint_candidates(tmp_path / "checkpoints"):
        (folder / "adapter" / "adapter_model.safetensors").write_bytes(b"junk")
    with pytest.raises(UsageError, match="no readable checkpoint"):
        train(config, make_samples(2), model=tiny_model())


def test_library_resume_refuses_other_data(tmp_path):
    config = _halted_run(tmp_path)
    other = make_samples(2, seed=50)
    with pytest.raises(UsageError, match="trained on other data"):
        train(config, other, model=tiny_model())


def test_a_timed_checkpoint_is_written_without_checkpoint_every(tmp_path, monkeypatch):
    import fastmem.train.loop as loop

    clock = iter(range(0, 10 ** 6, 400))  # 400 s per call of the loop's clock: always due
    monkeypatch.setattr(loop.time, "monotonic", lambda: next(clock))
    train(tiny_config(max_steps=4, out=str(tmp_path), stop_on_recall=False, checkpoint_minutes=5),
          make_samples(1), model=tiny_model(), halt_after_steps=3)
    assert [p.name for p in checkpoint_candidates(tmp_path / "checkpoints")] == ["step-0000003", "step-0000002"]


# --- a budget-exhausted run continued ----------------------------------------------------------

def test_a_run_that_used_its_budget_is_continued_by_a_larger_one(tmp_path, model_dir, capsys):
    data = _jsonl(tmp_path / "d.jsonl", GOOD)
    out = tmp_path / "run"
    flags = [f for f in TRAIN_FLAGS if f not in ("--max-steps", "3")]
    argv = ["train", "--data", data, "--model", str(model_dir), "--out", str(out), *flags, "--lr", "1e-4"]
    assert main([*argv, "--max-steps", "3"]) == 0
    first = json.loads((out / "summary.json").read_text())
    assert first["steps"] == 3 and not first["stopped_on_recall"]
    rows_before = (out / "metrics.jsonl").read_text().splitlines()
    printed = capsys.readouterr()
    assert json.loads(printed.out)["steps"] == 3  # stdout: the one JSON line
    assert printed.err.strip().splitlines()[-1].startswith(  # stderr: a line for people
        "fastmem train: used its whole budget of 3 steps without recalling every token; exact match ")
    assert main([*argv, "--max-steps", "5"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 5 and summary["total_steps"] == 5
    rows = (out / "metrics.jsonl").read_text().splitlines()
    assert rows[:3] == rows_before and [json.loads(r)["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert json.loads((out / "run.json").read_text())["settings"]["max_steps"] == 5
    assert json.loads(rows[3])["lr"] > 0  # the LR decays over the new budget from step 3, not from 0
    # the same budget again, or other data: refused (one line), nothing changed
    snapshot = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main([*argv, "--max-steps", "5"]) == 2
    assert main([*argv[:2], _jsonl(tmp_path / "o.jsonl", OTHER), *argv[3:], "--max-steps", "7"]) == 2
    err = capsys.readouterr().err
    assert "holds a finished run" in err and "trained on other data" in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == snapshot


# --- a huge --max-steps --------------------------------------------------------------------------

def test_a_huge_max_steps_is_refused_before_the_model_loads_in_under_1_gb(tmp_path, model_dir):
    data = _jsonl(tmp_path / "d.jsonl", GOOD)
    out = tmp_path / "run"
    # VmHWM, not ru_maxrss: Linux carries the parent's (pytest's) peak RSS across exec into ru_maxrss
    code = ("import re, sys; from fastmem.cli import main; rc = main(sys.argv[1:]); "
            "print(re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read())[1]); sys.exit(rc)")
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, "train", "--data", data, "--model", str(model_dir),
                           "--out", str(out), "--max-steps", "99999999999999"],
                          env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    elapsed = time.perf_counter() - started
    peak_kib = int(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "fastmem train: error: max_steps must be an integer in [1, 1000000000] (a billion steps is years of "
        "training), got 99999999999999"]
    assert peak_kib * 1024 < 1 << 30, peak_kib  # peak RSS of the whole refusing process
    assert not out.exists() and elapsed < 120


def test_the_progress_bar_shows_no_false_total_under_the_stop_rule():
    from types import SimpleNamespace

    from fastmem.train.loop import _progress_bar

    def bar(stop_on_recall):
        config = SimpleNamespace(stop_on_recall=stop_on_recall, objective="sft", progress=True)
        return _progress_bar(SimpleNamespace(config=config, total_steps=6000, step=12,
                                             info=SimpleNamespace(is_main=True)))

    with bar(True) as stopping, bar(False) as budgeted:
        assert stopping.total is None and stopping.n == 12 and "budget 6000 steps" in stopping.desc
        assert budgeted.total == 6000  # no stop rule: the budget is the run's length
