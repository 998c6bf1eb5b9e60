"""pytest-benchmark suite of fastmem's kernels (see docs/benchmarks.md).

    pytest benchmarks                              # every case this device can run (CPU: the CPU subset)
    pytest benchmarks --smoke                      # the CI subset: tiny shapes, seconds
    pytest benchmarks --benchmark-json out.json    # then: python benchmarks/report.py out.json
    pytest benchmarks -k "qwen3 and sft" --profile-dir prof/   # + a torch profiler trace per case

`pytest tests` never collects this folder (testpaths = tests) and this conftest never loads
there; here the tests/ conftest is not loaded either.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `benchmarks.suite` and the source tree's fastmem
    sys.path.insert(0, str(REPO))

import pytest  # noqa: E402
import torch  # noqa: E402

DEFAULT_ROUNDS = {"smoke": 2, "cpu": 3, "cuda": 20}


def pytest_addoption(parser):
    group = parser.getgroup("fastmem benchmarks")
    group.addoption("--smoke", action="store_true", help="only the tiny CI shapes (under a minute on a CPU)")
    group.addoption("--profile-dir", default=None,
                    help="also write a torch profiler trace (Chrome/Perfetto JSON) of a few steps of each case here")
    group.addoption("--bench-rounds", type=int, default=None,
                    help="timed rounds per case (default: smoke 2, CPU 3, GPU 20)")
    group.addoption("--bench-note", default=None,
                    help="a note stored with the run's machine info (e.g. 'CPU shared with other jobs')")


def bench_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def device() -> torch.device:
    return bench_device()


@pytest.fixture(scope="session")
def rounds(request, device) -> int:
    chosen = request.config.getoption("--bench-rounds")
    if chosen:
        return chosen
    return DEFAULT_ROUNDS["smoke" if request.config.getoption("--smoke") else device.type]


def skip_unless_runs_here(where: str, device: torch.device, what: str) -> None:
    """GPU-sized rows are collected everywhere and skipped on a CPU, so the pending list shows."""
    if where == "gpu" and device.type != "cuda":
        pytest.skip(f"GPU-sized case ({what}): pending a GPU run")


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores, torch threads {torch.get_num_threads()})"


def software_versions() -> dict:
    import fastmem

    found = {"python": platform.python_version(), "torch": torch.__version__, "fastmem": fastmem.__version__,
             "cuda": torch.version.cuda}
    for module in ("triton", "peft", "transformers", "liger_kernel", "cut_cross_entropy", "pytest_benchmark"):
        try:
            found[module] = getattr(__import__(module), "__version__", "installed")
        except ImportError:
            pass
    return found


_LOAD_AT_START = list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def pytest_benchmark_update_machine_info(config, machine_info):
    """What identifies the machine (compared by --benchmark-compare): device and versions."""
    device = bench_device()
    machine_info["fastmem"] = {"device": device_description(device), "device_type": device.type,
                               "versions": software_versions()}


_skipped: list[dict] = []


def pytest_runtest_logreport(report):
    """Remember every skipped case and why, for the JSON (the report lists them as pending)."""
    if report.skipped and report.when in ("setup", "call"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _skipped.append({"case": report.nodeid.split("::")[-1], "reason": reason.removeprefix("Skipped: ")})


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """What describes this run only: command, load, note, and the cases it skipped."""
    output_json["fastmem_run"] = {
        "command": "pytest " + " ".join(sys.argv[1:]),
        "load_average_at_start": _LOAD_AT_START,
        "smoke": bool(config.getoption("--smoke")),
        "note": config.getoption("--bench-note"),
    }
    output_json["fastmem_skipped"] = list(_skipped)
