"""Every bad input of every command: exit 2, one line on stderr naming the problem, and nothing
created or changed on disk (issue 14). One table over the commands, on a tiny local checkpoint
(no SmolLM2 load), plus the run-directory lifecycle: overwrite, resume, Ctrl-C, orphan temps.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastmem.cli import main
from tests.train.tiny_cli_model import save_tiny_checkpoint

REPO = Path(__file__).resolve().parents[2]
GOOD = [{"prompt": "what is the code of alice", "answer": "red blue seven"},
        {"prompt": "what is the secret number of bob", "answer": "four two"}]
OTHER = [{"prompt": "what is the code of bob", "answer": "green one"}]
TRAIN_FLAGS = ["--rank", "2", "--alpha", "4", "--layers", "2,3", "--max-steps", "3", "--seed", "1",
               "--no-progress"]


def _jsonl(path: Path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def snapshot(root: Path) -> dict:
    """Every path under root with its kind, content hash and mtime: any change shows."""
    found = {}
    for path in sorted(root.rglob("*")):
        if path.is_dir():
            found[str(path.relative_to(root))] = ("dir", path.stat().st_mtime_ns)
        else:
            found[str(path.relative_to(root))] = (hashlib.sha256(path.read_bytes()).hexdigest(),
                                                  path.stat().st_mtime_ns)
    return found


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny_ckpt"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, model_dir):
    """A finished run and an unfinished one (checkpoint at step 2, no summary), made by the CLI."""
    root = tmp_path_factory.mktemp("runs")
    data = _jsonl(root / "good.jsonl", GOOD)
    finished = root / "finished"
    code = main(["train", "--data", data, "--model", str(model_dir), "--out", str(finished),
                 "--checkpoint-every", "1", *TRAIN_FLAGS])
    assert code == 0
    unfinished = root / "unfinished"  # as if killed after the checkpoint of step 2 of 3
    shutil.copytree(finished, unfinished)
    shutil.rmtree(unfinished / "adapter")
    (unfinished / "summary.json").unlink()
    shutil.rmtree(unfinished / "checkpoints" / "step-0000003")
    (unfinished / "checkpoints" / "latest").write_text("step-0000002")
    return {"finished": finished, "unfinished": unfinished}


def _sqlite_without_runs(path: Path) -> str:
    import sqlite3

    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE other (x)")
    conn.commit()
    conn.close()
    return str(path)


def _fit_file(path: Path, b: float = 0.5) -> str:
    path.write_text(json.dumps({"C": 4.0, "alpha": 0.5, "beta": 0.3, "b": b}))
    return str(path)


# case id -> (argv builder, rc, what the one line must say). A builder gets (tmp, model_dir, runs)
# and prepares its files under tmp; the test then snapshots tmp, runs the command and checks that
# nothing under tmp was created or changed.
def _train(tmp, model_dir, *extra, data=None):
    data = data or _jsonl(tmp / "d.jsonl", GOOD)
    return ["train", "--data", data, "--model", str(model_dir), *TRAIN_FLAGS, *extra]


def _copy_run(runs, kind, tmp):
    return str(shutil.copytree(runs[kind], tmp / kind))


def _bytes(path: Path, content: bytes) -> str:
    path.write_bytes(content)
    return str(path)


def _second_line(path: Path, line: bytes) -> str:
    """A JSONL file whose first record is good and whose second is `line`."""
    return _bytes(path, b'{"prompt": "a", "answer": "b"}\n' + line + b"\n")


def _user_dir(tmp) -> str:
    (tmp / "mine").mkdir()
    (tmp / "mine" / "notes.txt").write_text("the user's")
    return str(tmp / "mine")


def _adapter(tmp, config: str | None, weights: bytes | None) -> str:
    folder = tmp / "adapter"
    folder.mkdir()
    if config is not None:
        (folder / "adapter_config.json").write_text(config)
    if weights is not None:
        (folder / "adapter_model.safetensors").write_bytes(weights)
    return str(folder)


def _eval(tmp, model_dir, *extra):
    return ["eval", "--data", _jsonl(tmp / "d.jsonl", GOOD), "--model", str(model_dir),
            "--out", str(tmp / "ev"), "--no-greedy", *extra]


def _sweep(tmp, *extra):
    return ["sweep", "--db", str(tmp / "s.sqlite"), "--no-progress", *extra]


def _adapter_with_other_r(runs, tmp) -> str:
    """The finished run's adapter with adapter_config.json claiming another rank."""
    folder = shutil.copytree(runs["finished"] / "adapter", tmp / "adapter")
    config = json.loads((folder / "adapter_config.json").read_text())
    config["r"] += 1
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return str(folder)


CASES = {
    "train --out is a file": (
        lambda t, m, r: _train(t, m, "--out", _bytes(t / "f.txt", b"mine")), 2, "is a file, not a directory"),
    "train --out holds a finished run": (
        lambda t, m, r: _train(t, m, "--out", _copy_run(r, "finished", t)), 2, "holds a finished run"),
    "train --out holds unrelated files": (
        lambda t, m, r: _train(t, m, "--out", _user_dir(t)), 2, "other files (notes.txt)"),
    "train resume with other data": (
        lambda t, m, r: _train(t, m, "--out", _copy_run(r, "unfinished", t),
                               data=_jsonl(t / "other.jsonl", OTHER)), 2, "trained on other data"),
    "train resume with another --rank": (
        lambda t, m, r: _train(t, m, "--out", _copy_run(r, "unfinished", t), "--rank", "3"), 2,
        "other settings (rank 2 there, 3 here)"),
    "train --no-resume on an unfinished run": (
        lambda t, m, r: _train(t, m, "--out", _copy_run(r, "unfinished", t), "--no-resume"), 2,
        "holds an unfinished run (checkpoint step-0000002)"),
    "train --overwrite would delete --data": (
        lambda t, m, r: _train(t, m, "--out", _copy_run(r, "finished", t), "--overwrite",
                               data=_jsonl(t / "finished" / "mine.jsonl", GOOD)), 2, "which --overwrite would delete"),
    "train --layers 99": (
        lambda t, m, r: _train(t, m, "--out", str(t / "new" / "run"), "--layers", "99"), 2, "out of range"),
    "train --modules nonexistent": (
        lambda t, m, r: _train(t, m, "--out", str(t / "new"), "--modules", "nonexistent"), 2, "unknown module"),
    "train --data DIR": (
        lambda t, m, r: _train(t, m, "--out", str(t / "new"), data=str(t)), 2, "is a directory, not a JSONL file"),
    "train --data not UTF-8": (
        lambda t, m, r: _train(t, m, "--out", str(t / "new"),
                               data=_second_line(t / "latin1.jsonl", b'{"prompt": "caf\xe9", "answer": "b"}')),
        2, "latin1.jsonl:2: not UTF-8 text"),
    "train --data missing": (
        lambda t, m, r: _train(t, m, "--out", str(t / "new"), data=str(t / "none.jsonl")), 2, "does not exist"),
    "train --data invalid JSON": (
        lambda t, m, r: _train(t, m, "--out", str(t / "new"), data=_bytes(t / "bad.jsonl", b'{"prompt": \n')),
        2, "bad.jsonl:1: invalid JSON"),
    "train --device cuda without a GPU": (
        lambda t, m, r: _train(t, m, "--out", str(t / "new"), "--device", "cuda"), 2, "no CUDA device"),
    "train --rank 0": (
        lambda t, m, r: _train(t, m, "--out", str(t / "new"), "--rank", "0"), 2, "rank must be an integer >= 1"),
    "train --lr inf": (
        lambda t, m, r: _train(t, m, "--out", str(t / "new"), "--lr", "inf"), 2, "lr must be a finite number"),
    "train --alpha nan": (
        lambda t, m, r: _train(t, m, "--out", str(t / "new"), "--alpha", "nan"), 2, "alpha must be a finite number"),
    "train --max-steps 99999999999999": (
        lambda t, m, r: _train(t, m, "--out", str(t / "new"), "--max-steps", "99999999999999"), 2,
        "max_steps must be an integer in [1, 1000000000]"),
    "train --rank above the module's width": (
        lambda t, m, r: _train(t, m, "--out", str(t / "new"), "--rank", "4096"), 2,
        "rank 4096 is larger than down_proj of layer 2 allows"),
    "train --model a dir without config.json": (
        lambda t, m, r: ["train", "--data", _jsonl(t / "d.jsonl", GOOD), "--model", str(t), "--out", str(t / "new")],
        2, "has no config.json"),
    "train --config broken YAML": (
        lambda t, m, r: _train(t, m, "--out", str(t / "new"), "--config", _bytes(t / "c.yaml", b"rank: [4\n")),
        2, "is not valid YAML"),
    "train --config unknown key": (
        lambda t, m, r: _train(t, m, "--out", str(t / "new"), "--config", _bytes(t / "c.yaml", b"rnak: 4\n")),
        2, "unknown train setting(s) ['rnak']"),
    **{f"train --config {setting}": (
        lambda t, m, r, setting=setting: _train(t, m, "--out", str(t / "new"),
                                                "--config", _bytes(t / "c.yaml", f"{setting}\n".encode())),
        2, f"c.yaml: {message}")
       for setting, message in [("lr: fast", "lr must be a finite number, got 'fast'"),
                                ("epochs: many", "epochs must be an integer, got 'many'"),
                                ("modules: 3", "modules[0] must be a string, got 3")]},
    "train --data with a lone surrogate": (
        lambda t, m, r: _train(t, m, "--out", str(t / "new"),
                               data=_second_line(t / "s.jsonl", b'{"prompt": "c", "answer": "x \\udc80 y"}')),
        2, "s.jsonl:2: field 'answer' holds a lone surrogate"),
    "eval --data with a lone surrogate": (
        lambda t, m, r: ["eval", "--data", _bytes(t / "s.jsonl", b'{"prompt": "\\ud800", "answer": "b"}\n'),
                         "--model", str(m), "--out", str(t / "ev")], 2, "s.jsonl:1: field 'prompt' holds a lone surrogate"),
    "eval --adapter whose r differs from its weights": (
        lambda t, m, r: _eval(t, m, "--adapter", _adapter_with_other_r(r, t)), 2,
        "adapter_config.json says r = 3 but"),
    "eval --adapter junk adapter_config.json": (
        lambda t, m, r: _eval(t, m, "--adapter", _adapter(t, '{"r": 2}', b"")), 2,
        "is not a PEFT adapter config (no 'peft_type')"),
    "eval --adapter random .safetensors": (
        lambda t, m, r: _eval(t, m, "--adapter", _adapter(t, '{"peft_type": "LORA"}', os.urandom(256))), 2,
        "is not a readable safetensors file"),
    "eval --adapter empty dir": (
        lambda t, m, r: _eval(t, m, "--adapter", _adapter(t, None, None)), 2, "has no adapter_config.json"),
    "eval --device cuda without a GPU": (
        lambda t, m, r: _eval(t, m, "--device", "cuda"), 2, "no CUDA device"),
    "eval --data DIR": (
        lambda t, m, r: ["eval", "--data", str(t), "--model", str(m), "--out", str(t / "ev")], 2,
        "is a directory, not a JSONL file"),
    "fit --db not SQLite": (
        lambda t, m, r: ["fit", "--db", _bytes(t / "x.sqlite", b"not a database at all"), "--out", str(t / "fit")],
        2, "is not an SQLite database"),
    "fit --csv not UTF-8": (
        lambda t, m, r: ["fit", "--csv", _bytes(t / "r.csv", b"rank,length\n\xff\xfe,1\n"), "--out", str(t / "fit")],
        2, "is not UTF-8 text"),
    "sweep --objectives foo": (
        lambda t, m, r: _sweep(t, "--objectives", "foo"), 2, "objectives must be among ('sft', 'ot', 'sw')"),
    "sweep --ranks a,b": (
        lambda t, m, r: _sweep(t, "--ranks", "a,b"), 2, "expected comma-separated integers like 1,2,4, got 'a,b'"),
    "sweep --ranks 0": (lambda t, m, r: _sweep(t, "--ranks", "0"), 2, "ranks must be >= 1"),
    "sweep --lengths=-5": (lambda t, m, r: _sweep(t, "--lengths=-5"), 2, "lengths must be >= 1"),
    "sweep --dataset foo": (lambda t, m, r: _sweep(t, "--dataset", "foo"), 2, "data kinds (--dataset) must be among"),
    "sweep --db not SQLite": (
        lambda t, m, r: ["sweep", "--db", _bytes(t / "x.sqlite", b"plain text"), "--ranks", "1"], 2,
        "is not an SQLite database"),
    "sweep --lengths 9000 past the context": (
        lambda t, m, r: _sweep(t, "--lengths", "9000"), 2, "sweep lengths [9000] do not fit the context of smollm2"),
    "sweep --ranks 4096 past the width": (
        lambda t, m, r: _sweep(t, "--ranks", "4096"), 2, "sweep ranks [4096] exceed the width 576"),
    "sweep --config ranks: x": (
        lambda t, m, r: _sweep(t, "--config", _bytes(t / "s.yaml", b"ranks: x\nlengths: 8\n")), 2,
        "s.yaml: ranks[0] must be an integer, got 'x'"),
    "sweep --status on a database without runs": (
        lambda t, m, r: ["sweep", "--db", _sqlite_without_runs(t / "o.sqlite"), "--status"], 2,
        "is not a sweep results database (no table 'runs')"),
    "sweep --status on a new path": (
        lambda t, m, r: ["sweep", "--db", str(t / "s.sqlite"), "--status"], 0, "no database at"),
    "plan --delta-loss beyond the model's width": (
        lambda t, m, r: ["plan", "--length", "100", "--delta-loss", "50", "--fit", _fit_file(t / "fit.json"),
                         "--model", str(m)], 2, "above the model's width 32"),
    "plan --delta-loss -2": (
        lambda t, m, r: ["plan", "--length", "100", "--delta-loss", "-2", "--fit", _fit_file(t / "fit.json"),
                         "--model", str(m)], 2, "a loss drop must be > 0"),
    "plan --delta-loss below the fitted b": (
        lambda t, m, r: ["plan", "--length", "100", "--delta-loss", "0.3", "--fit", _fit_file(t / "fit.json"),
                         "--model", str(m)], 2, "at or below the fit's floor b = 0.5"),
    "plan --fit random file": (
        lambda t, m, r: ["plan", "--length", "100", "--delta-loss", "1", "--fit",
                         _bytes(t / "fit.json", bytes(range(128, 256)))], 2, "is not a fit.json"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_leaves_nothing(case, tmp_path, model_dir, runs, capsys):
    build, want_rc, message = CASES[case]
    if "cuda" in case and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    argv = build(tmp_path, model_dir, runs)
    before = snapshot(tmp_path)
    started = time.perf_counter()
    code = main(argv)
    elapsed = time.perf_counter() - started
    err = capsys.readouterr().err.strip().splitlines()
    assert code == want_rc, err
    assert len(err) == 1, err  # one line, nothing else (no bars, no warnings, no traceback)
    assert message in err[0], err[0]
    if want_rc == 2:
        assert err[0].startswith(f"fastmem {argv[0]}: error: ")
    assert snapshot(tmp_path) == before, "a refused command created or changed files"
    assert elapsed < 60, elapsed


def test_overwrite_replaces_a_finished_run_whole(tmp_path, model_dir, runs, capsys):
    out = Path(_copy_run(runs, "finished", tmp_path))
    (out / "eval").mkdir()
    (out / "eval" / "report.json").write_text("{}")  # stale beside a new adapter unless replaced
    old_manifest = (out / "run.json").read_text()
    data = _jsonl(tmp_path / "other.jsonl", OTHER)
    assert main(["train", "--data", data, "--model", str(model_dir), "--out", str(out), "--overwrite",
                 *TRAIN_FLAGS]) == 0
    assert not (out / "eval").exists() and (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "run.json").read_text() != old_manifest
    assert json.loads((out / "summary.json").read_text())["num_samples"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["finished", "other.jsonl"]  # no staging left


def test_resume_matching_run_and_orphan_temp_cleanup(tmp_path, model_dir, runs, capsys):
    out = Path(_copy_run(runs, "unfinished", tmp_path))
    orphan = out / "checkpoints" / ".step-0000003.abc123"  # what a SIGKILL mid-checkpoint leaves
    (orphan / "adapter").mkdir(parents=True)
    before = (out / "metrics.jsonl").read_text().splitlines()
    data = _jsonl(tmp_path / "d.jsonl", GOOD)
    assert main(["train", "--data", data, "--model", str(model_dir), "--out", str(out), "-v",
                 "--checkpoint-every", "1", *TRAIN_FLAGS]) == 0
    assert not orphan.exists()
    after = (out / "metrics.jsonl").read_text().splitlines()
    assert after[:2] == before[:2] and len(after) == 3  # steps 1-2 kept from the checkpoint, 3 redone
    assert json.loads((out / "summary.json").read_text())["steps"] == 3


def test_checkpoint_write_cleans_orphans(tmp_path):
    from fastmem.train.checkpoint import clean_stale_temps

    for name in (".step-0000004.x", ".adapter.y"):
        (tmp_path / "checkpoints" / name if name.startswith(".step") else tmp_path / name).mkdir(parents=True)
    (tmp_path / ".summary.json.tmp").write_text("{")
    (tmp_path / "checkpoints" / "step-0000002").mkdir()
    clean_stale_temps(tmp_path)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == [
        "checkpoints", "checkpoints/step-0000002"]


def test_ctrl_c_checkpoints_and_prints_the_resume_command(tmp_path, model_dir):
    data = _jsonl(tmp_path / "d.jsonl", GOOD)
    out = tmp_path / "run"
    argv = ["train", "--data", data, "--model", str(model_dir), "--out", str(out), "--rank", "2",
            "--layers", "2,3", "--max-steps", "100000", "--no-progress"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-m", "fastmem", *argv], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and (not metrics.is_file() or len(metrics.read_text().splitlines()) < 3):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    last = stderr.strip().splitlines()[-1]
    assert "interrupted at step" in last and "resume with: fastmem train" in last, stderr
    assert "Traceback" not in stderr
    steps = len(metrics.read_text().splitlines())
    assert (out / "checkpoints" / f"step-{steps:07d}").is_dir()
    assert not (out / "summary.json").exists()
    # the printed command resumes (same settings and data): refused only for a mismatch
    resume_argv = last.split("resume with: fastmem ", 1)[1].split()
    assert resume_argv == argv
    assert main([*argv, "--rank", "3"]) == 2  # the checkpoint is refused under other settings


def test_verbose_after_the_command_and_version(capsys):
    from fastmem.cli import build_parser

    args = build_parser().parse_args(["train", "-v", "--data", "d", "--out", "o"])
    assert args.verbose is True
    args = build_parser().parse_args(["-v", "sweep", "--db", "x"])
    assert args.verbose is True
    assert main(["--version"]) == 0
    from fastmem import __version__
    assert capsys.readouterr().out.strip() == f"fastmem {__version__}"


def test_sweep_data_is_a_deprecated_alias_of_dataset(tmp_path, capsys):
    from fastmem.cli import build_parser
    from fastmem.sweep.cli import build_spec

    args = build_parser().parse_args(["sweep", "--db", "x", "--dataset", "phonebook"])
    assert build_spec(args).data == ["phonebook"]
    assert main(["sweep", "--db", str(tmp_path / "s.sqlite"), "--data", "foo"]) == 2
    err = capsys.readouterr().err
    assert "deprecated" in err and "data kinds (--dataset) must be among" in err
    assert not (tmp_path / "s.sqlite").exists()


def test_a_checkpoint_write_cut_short_leaves_no_temp_dir(tmp_path, monkeypatch):
    from fastmem.train import checkpoint, train
    from tests.train.tiny import make_samples, tiny_config, tiny_model

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # what a second Ctrl-C during the write does

    monkeypatch.setattr(checkpoint.torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(max_steps=4, checkpoint_every=1, out=str(tmp_path)), make_samples(1), model=tiny_model())
    assert (tmp_path / "checkpoints").is_dir()
    assert list((tmp_path / "checkpoints").iterdir()) == []  # no .step-* temp, no half checkpoint


def test_progress_bar_shows_the_run_not_the_last_batch():
    from fastmem.ops import TokenStats
    from fastmem.train.run_log import RunFigures

    def stats(loss_row):
        loss = torch.tensor([loss_row])
        valid = torch.ones_like(loss, dtype=torch.bool)
        return TokenStats(loss=loss, prob=torch.exp(-loss), correct=loss < 0.69, lse=loss, weight=loss,
                          valid=valid, first_error=torch.tensor([0]))

    figures = RunFigures(2)
    figures.update([0], stats([2.0, 2.0, 0.1, 0.1]))  # sample 0: half recalled
    assert figures.postfix()["seen"] == "1/2"
    figures.update([1], stats([0.01] * 6))  # sample 1, the last batch: all recalled
    shown = figures.postfix()
    assert shown["acc"] == "0.800" and shown["stubborn"] == 2 and shown["min_p"] == "0.14"
    assert "seen" not in shown
