"""`fastmem bench`: the benchmark suite (pytest-benchmark) or one benchmark script, from a
source checkout's benchmarks/ folder; `--profile DIR` adds a torch profiler trace per case.

    fastmem bench suite --smoke                       # the CI subset, seconds
    fastmem bench suite -k "smollm2 and sft" --json out.json
    fastmem bench suite -k "tiny-N256-fp32-sft-fastmem-torch" --profile prof/
    fastmem bench cross-entropy --smoke               # a standalone script (args go to it)
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from fastmem.errors import UsageError

SUITE = "suite"
SCRIPTS = {"cross-entropy": "bench_cross_entropy.py", "lora": "bench_lora.py"}
# kernels worth a Nsight Compute look: fastmem's Triton / CUDA kernels and the GEMMs around them
NCU_KERNELS = "row_stats|softmax_grad|cross_entropy|ce_|lora_|rank_|dropout_keep|gemm|sm90"


def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


def benchmarks_dir() -> Path:
    return repo_root() / "benchmarks"


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench", help="time fastmem's kernels against the public anchors (pytest-benchmark suite)",
        description="Run the benchmark suite (benchmarks/test_bench_*.py, pytest-benchmark) or one "
                    "benchmark script from a source checkout. For `suite`, the options below apply; "
                    "for a script name, every argument after it goes to the script.",
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=[SUITE, *sorted(SCRIPTS)])
    parser.add_argument("script_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    parser.set_defaults(func=run)


def suite_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastmem bench suite")
    parser.add_argument("-k", dest="select", default=None, help="pytest -k expression choosing cases")
    parser.add_argument("--smoke", action="store_true", help="the tiny CI subset")
    parser.add_argument("--profile", type=Path, default=None, metavar="DIR",
                        help="write a torch profiler trace (Chrome/Perfetto JSON) of 3 steps of each case to DIR")
    parser.add_argument("--json", type=Path, default=None, help="pytest-benchmark JSON (then: benchmarks/report.py)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per case")
    return parser


def run(args) -> int:
    bench_dir = benchmarks_dir()
    if not bench_dir.is_dir():
        raise UsageError(f"{bench_dir} not found: the benchmarks run from a source checkout of fastmem")
    if args.name == SUITE:
        return run_suite(suite_parser().parse_args(args.script_args), bench_dir)
    return run_script(bench_dir / SCRIPTS[args.name], args.script_args)


def run_script(script: Path, script_args: list[str]) -> int:
    import runpy

    if not script.is_file():
        raise UsageError(f"{script} not found: benchmarks run from a source checkout of fastmem")
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = [str(script), *script_args]
    sys.path.insert(0, str(script.parent))
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as done:
        return int(done.code or 0) if not isinstance(done.code, str) else 2
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
    return 0


def pytest_command(opts, bench_dir: Path) -> list[str]:
    command = [sys.executable, "-m", "pytest", str(bench_dir), "-p", "no:cacheprovider", "-rs", "-q"]
    if opts.smoke:
        command.append("--smoke")
    if opts.select:
        command += ["-k", opts.select]
    if opts.rounds:
        command += ["--bench-rounds", str(opts.rounds)]
    if opts.json:
        command += ["--benchmark-json", str(opts.json)]
    if opts.profile:
        command += ["--profile-dir", str(opts.profile)]
        if not opts.json:  # profiling only: one untimed call per case, then the traced steps
            command.append("--benchmark-disable")
    return command


def ncu_command(opts, bench_dir: Path) -> str:
    """The Nsight Compute command that profiles the selected cases' kernels (3 launches each)."""
    inner = [sys.executable, "-m", "pytest", str(bench_dir), "-p", "no:cacheprovider", "--benchmark-disable", "-q"]
    if opts.smoke:
        inner.append("--smoke")
    if opts.select:
        inner += ["-k", opts.select]
    out = (opts.profile or Path(".")) / "ncu_report"
    return shlex.join(["ncu", "--set", "full", "--kernel-name", f"regex:{NCU_KERNELS}", "--launch-skip", "10",
                       "--launch-count", "3", "-o", str(out), *inner])


def run_suite(opts, bench_dir: Path) -> int:
    if opts.profile is not None:
        if opts.profile.exists() and not opts.profile.is_dir():
            raise UsageError(f"--profile {opts.profile}: exists and is not a directory")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo_root()), env.get("PYTHONPATH")]))
    before = set(opts.profile.glob("*.json")) if opts.profile and opts.profile.is_dir() else set()
    code = subprocess.call(pytest_command(opts, bench_dir), cwd=repo_root(), env=env)
    if opts.profile:
        traces = sorted(set(opts.profile.glob("*.json")) - before) if opts.profile.is_dir() else []
        print(f"\n{len(traces)} profiler trace(s) in {opts.profile}/ (open in https://ui.perfetto.dev or chrome://tracing)")
        for trace in traces:
            print(f"  {trace}")
        import torch

        if torch.cuda.is_available() and shutil.which("ncu"):
            print("\nKernel-level profile with Nsight Compute:\n  " + ncu_command(opts, bench_dir))
    if code == 5:  # pytest: no case selected
        raise UsageError(f"no benchmark case matches -k {opts.select!r} (list them: pytest benchmarks --collect-only -q)")
    return code
