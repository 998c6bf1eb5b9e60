"""`fastmem bench`: run a benchmark script of the source tree's benchmarks/ folder."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

from fastmem.cli import UsageError

BENCHMARKS = {"cross-entropy": "bench_cross_entropy.py", "lora": "bench_lora.py"}


def benchmarks_dir() -> Path:
    return Path(__file__).resolve().parents[1] / "benchmarks"


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench", help="time fastmem's kernels against the public anchors",
        description="Run a benchmark from benchmarks/ (a source checkout); the table is printed and "
                    "written to benchmarks/results/. Arguments after the name go to the script.",
        epilog="examples:\n  fastmem bench cross-entropy --smoke\n  fastmem bench cross-entropy --n 8192 16384\n"
               "  fastmem bench lora --smoke",
        formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=sorted(BENCHMARKS))
    parser.add_argument("script_args", nargs="...", help="passed to the benchmark script (see its --help)")
    parser.set_defaults(func=run)


def run(args) -> int:
    script = benchmarks_dir() / BENCHMARKS[args.name]
    if not script.is_file():
        raise UsageError(f"{script} not found: benchmarks run from a source checkout of fastmem")
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = [str(script), *args.script_args]
    sys.path.insert(0, str(script.parent))
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as done:
        return int(done.code or 0)
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
    return 0
