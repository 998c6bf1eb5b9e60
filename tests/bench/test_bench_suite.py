"""The pytest-benchmark suite in benchmarks/: kept apart from tests/, its JSON turns into the
Markdown + PNG report, two runs compare, and `fastmem bench suite --profile` writes a trace."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# two cheap smoke cases: the fused loss on the torch backend and PEFT's LoRA layer
FEW_CASES = "tiny-N256-fp32-sft-fastmem-torch or tiny-N256-r8-fp32-peft"


def run_python(*args: str, cwd: Path = REPO, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_default_run_collects_tests_only_and_the_suite_collects_benchmarks_only(request):
    # a bare `pytest` walks testpaths only, and no conftest above both folders joins them
    assert request.config.getini("testpaths") == ["tests"]
    assert not (REPO / "conftest.py").exists() and (REPO / "benchmarks" / "conftest.py").is_file()
    suite = run_python("-m", "pytest", "benchmarks", "--smoke", "--collect-only", "-q", "-p", "no:cacheprovider")
    assert suite.returncode == 0, suite.stdout + suite.stderr
    ids = [line for line in suite.stdout.splitlines() if "::" in line]
    assert ids and all(line.startswith("benchmarks/test_bench_") for line in ids)
    for op in ("test_cross_entropy[", "test_lora_linear[", "test_train_step["):
        assert any(op in line for line in ids), op
    for case in ("-sft-", "-ot-5%-", "-ot-50%-", "-sw-"):
        assert any(case in line for line in ids), case


def test_full_suite_lists_every_preset_and_contender():
    suite = run_python("-m", "pytest", "benchmarks", "--collect-only", "-q", "-p", "no:cacheprovider")
    ids = suite.stdout
    for preset in ("smollm2-N2048", "llama3-8b-N16384", "qwen3-8b-N32768", "qwen3-8b-down-N16384-r64",
                   "smollm2-A1000", "local-8b-A10000"):
        assert preset in ids, preset
    for contender in ("fastmem-torch", "fastmem-triton", "fastmem-cuda", "-eager]", "torch.compile", "torch-native",
                      "-liger]", "-cut-ce]", "-peft]", "-authors]", "-peft-hf]"):
        assert contender in ids, contender
    assert "tiny-" not in ids  # the smoke shapes only under --smoke


def test_json_report_compare_and_skips(tmp_path):
    storage = "file://./storage"  # pytest-benchmark wants its storage under the working directory
    out = tmp_path / "run.json"
    bench_dir = str(REPO / "benchmarks")
    first = run_python("-m", "pytest", bench_dir, "--smoke", "-k", FEW_CASES + " or tiny-N256-fp32-sft-fastmem-cuda",
                       "-p", "no:cacheprovider", "-q", "--benchmark-json", str(out), "--benchmark-storage", storage,
                       "--benchmark-autosave", "--bench-note", "test run", cwd=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    data = json.loads(out.read_text())
    cases = {b["name"]: b for b in data["benchmarks"]}
    assert set(cases) == {"test_cross_entropy[tiny-N256-fp32-sft-fastmem-torch]", "test_lora_linear[tiny-N256-r8-fp32-peft]"}
    for bench in cases.values():
        info = bench["extra_info"]
        assert info["ms"] > 0 and info["floor_ms"] > 0 and info["floor_flops"] > 0 and 0 < info["floor_fraction"]
        assert "peak_extra_mib" in info and info["peak_extra_method"]
    ce = cases["test_cross_entropy[tiny-N256-fp32-sft-fastmem-torch]"]["extra_info"]
    assert ce["floor_flops"] == 2 * 2 * 256 * 64 * 1000  # (1 + a) * 2NHV with a = 1
    assert data["fastmem_run"]["note"] == "test run" and data["fastmem_run"]["smoke"]
    assert data["machine_info"]["fastmem"]["versions"]["torch"]
    if not data["machine_info"]["fastmem"]["device_type"] == "cuda":
        assert any(s["case"].endswith("fastmem-cuda]") for s in data["fastmem_skipped"])

    second = run_python("-m", "pytest", bench_dir, "--smoke", "-k", FEW_CASES, "-p", "no:cacheprovider", "-q",
                        "--benchmark-storage", storage, "--benchmark-compare", cwd=tmp_path)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "Comparing against benchmarks from" in second.stdout + second.stderr
    assert "machine_info is different" not in second.stdout + second.stderr
    assert "(0001" in second.stdout and "(NOW)" in second.stdout  # both runs' rows in one table

    report = run_python(str(REPO / "benchmarks" / "report.py"), str(out))
    assert report.returncode == 0, report.stderr
    markdown = (tmp_path / "run.md").read_text()
    assert "- device: " in markdown and '"torch": ' in markdown and "- date: " in markdown
    assert "| fastmem-torch |" in markdown and "| peft |" in markdown and "**test run**" in markdown
    charts = sorted((tmp_path / "run").glob("*.png"))
    assert len(charts) == 2 and all(c.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for c in charts)
    for chart in charts:
        assert f"run/{chart.name}" in markdown


def test_fastmem_bench_suite_profile_writes_a_chrome_trace(tmp_path):
    prof = tmp_path / "prof"
    done = run_python("-m", "fastmem", "bench", "suite", "--smoke", "-k", "tiny-N256-fp32-sft-fastmem-torch",
                      "--profile", str(prof))
    assert done.returncode == 0, done.stdout + done.stderr
    traces = list(prof.glob("*.json"))
    assert len(traces) == 1 and "profiler trace(s)" in done.stdout
    events = json.loads(traces[0].read_text())["traceEvents"]
    assert {"step 0", "step 1", "step 2"} <= {e.get("name") for e in events}


def test_fastmem_bench_suite_refuses_an_empty_selection():
    done = run_python("-m", "fastmem", "bench", "suite", "-k", "no-such-case")
    assert done.returncode == 2 and "no benchmark case matches" in done.stderr


@pytest.mark.parametrize("gpu,ncu", [(True, True)])
def test_ncu_command_names_the_selected_cases(gpu, ncu):
    from argparse import Namespace

    from fastmem import bench_cli

    command = bench_cli.ncu_command(Namespace(smoke=False, select="qwen3 and sft", profile=Path("prof")),
                                    REPO / "benchmarks")
    assert command.startswith("ncu --set full --kernel-name 'regex:") and "-o prof/ncu_report" in command
    assert "-k 'qwen3 and sft'" in command and "--benchmark-disable" in command


def test_every_contender_computes_the_same_loss_as_eager():
    """A timing is only a comparison when the contenders compute the same thing: on small inputs
    every contender that runs here (torch.compile is eager compiled, left out for time) matches
    the eager full-logits loss for every loss case of the table."""
    import torch

    from benchmarks.suite.cases import LOSS_CASES
    from benchmarks.suite.contenders import loss_contenders

    torch.manual_seed(0)
    hidden, weight = torch.randn(96, 32), torch.randn(301, 32) / 4
    labels = torch.randint(0, 301, (96,))
    contenders = {c.id: c for c in loss_contenders()}
    device = torch.device("cpu")
    compared = 0
    for case in LOSS_CASES:
        threshold = 5.5 if case.objective == "ot" else 0.6931471805599453
        reference = contenders["eager"].make(case, threshold)(hidden, weight, labels)
        for contender in contenders.values():
            if contender.id in ("eager", "torch.compile") or not contender.implements(case) \
                    or contender.skip_reason(device):
                continue
            got = contender.make(case, threshold)(hidden, weight, labels)
            torch.testing.assert_close(got.float(), reference.float(), rtol=1e-5, atol=1e-5,
                                       msg=f"{contender.id} on {case.id}")
            compared += 1
    assert compared >= len(LOSS_CASES) + 1  # fastmem-torch on every case, torch-native on sft
