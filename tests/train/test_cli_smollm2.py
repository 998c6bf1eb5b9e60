"""The real command on the embedded SmolLM2: a short answer, a few steps, the whole contract."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _env() -> dict:
    """The worktree first on PYTHONPATH (the venv's editable install may point elsewhere)."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_fastmem_train_on_smollm2(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "What is the secret code?", "answer": "4711-Blue"}) + "\n")
    out = tmp_path / "run"
    command = [sys.executable, "-m", "fastmem", "train", "--data", str(data), "--model", "smollm2",
               "--objective", "ot", "--rank", "4", "--alpha", "8", "--layers", "20,24", "--modules", "down_proj",
               "--lr", "1e-2", "--max-steps", "3", "--seed", "0", "--out", str(out), "--no-progress"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=580, env=_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    # --no-progress: no GGUF bars, no FutureWarning, nothing but the one line for people
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("fastmem train: "), proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    rows = (out / "metrics.jsonl").read_text().splitlines()
    assert 1 <= summary["steps"] <= 3 and len(rows) == summary["steps"]
    assert summary["layers"] == [20, 24] and summary["base_loss"] > summary["final_loss"]
    assert 0.0 <= summary["token_acc"] <= 1.0 and summary["exact_match"] in (0.0, 1.0)
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["target_modules"] == ["down_proj"]
    assert (out / "adapter" / "adapter_model.safetensors").stat().st_size > 0
    assert json.loads(proc.stdout.strip().splitlines()[-1])["steps"] == summary["steps"]

    # the same command again: the finished run is refused, in one line, before the model loads
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    started = time.perf_counter()
    again = subprocess.run(command, capture_output=True, text=True, timeout=580, env=_env())
    assert again.returncode == 2 and again.stderr.count("\n") == 1, again.stderr
    assert "holds a finished run" in again.stderr
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    assert time.perf_counter() - started < 15  # no model load (it takes ~20 s)

    # an empty adapter directory: refused at once, no hub retries, nothing written
    (tmp_path / "empty").mkdir()
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "fastmem", "eval", "--data", str(data), "--adapter",
                           str(tmp_path / "empty"), "--out", str(tmp_path / "ev")],
                          capture_output=True, text=True, timeout=580, env=_env())
    assert proc.returncode == 2 and "has no adapter_config.json" in proc.stderr and proc.stderr.count("\n") == 1
    assert not (tmp_path / "ev").exists() and time.perf_counter() - started < 15
