"""`fastmem audit` and `fastmem bench` through the CLI entry point."""

import json

import torch

import fastmem
from fastmem.cli import main


def test_audit_passes_and_writes_json(tmp_path, capsys):
    out = tmp_path / "audit.json"
    assert main(["audit", "--device", "cpu", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    checked = {(check["op"], check["backend"]) for check in report["checks"]}
    for op in ("linear_cross_entropy", "lora_linear"):  # conftest sets TRITON_INTERPRET=1 on CPU
        assert (op, "torch") in checked and (op, "triton") in checked
    assert all(check["passed"] for check in report["checks"])
    assert "0 failed" in capsys.readouterr().out


def test_audit_reports_a_wrong_backend(monkeypatch, capsys):
    real = fastmem.linear_cross_entropy

    def off_by_a_bit(hidden, weight, labels, *args, backend="auto", **kwargs):
        loss = real(hidden, weight, labels, *args, backend=backend, **kwargs)
        return loss * 1.01 if backend == "triton" else loss

    monkeypatch.setattr(fastmem, "linear_cross_entropy", off_by_a_bit)
    assert main(["audit", "--device", "cpu"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_audit_rejects_missing_cuda(capsys):
    if torch.cuda.is_available():
        return
    assert main(["audit", "--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_bench_smoke_runs_and_prints_a_table(capsys):
    assert main(["bench", "cross-entropy", "--smoke", "--no-write", "--reps", "1"]) == 0
    table = capsys.readouterr().out
    assert "| smoke | 256 | 64 | 1000 | fastmem[torch] |" in table
    assert "torch eager" in table and "device: CPU" in table
