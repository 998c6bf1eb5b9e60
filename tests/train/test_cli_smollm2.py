"""The real command on the embedded SmolLM2: a short answer, a few steps, the whole contract."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_fastmem_train_on_smollm2(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "What is the secret code?", "answer": "4711-Blue"}) + "\n")
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "fastmem", "train", "--data", str(data), "--model", "smollm2",
         "--objective", "ot", "--rank", "4", "--alpha", "8", "--layers", "20,24", "--modules", "down_proj",
         "--lr", "1e-2", "--max-steps", "3", "--seed", "0", "--out", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=580)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    rows = (out / "metrics.jsonl").read_text().splitlines()
    assert 1 <= summary["steps"] <= 3 and len(rows) == summary["steps"]
    assert summary["layers"] == [20, 24] and summary["base_loss"] > summary["final_loss"]
    assert 0.0 <= summary["token_acc"] <= 1.0 and summary["exact_match"] in (0.0, 1.0)
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["target_modules"] == ["down_proj"]
    assert (out / "adapter" / "adapter_model.safetensors").stat().st_size > 0
    assert json.loads(proc.stdout.strip().splitlines()[-1])["steps"] == summary["steps"]
