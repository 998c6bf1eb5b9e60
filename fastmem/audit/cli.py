"""`fastmem audit`: what this installation can run, and whether each backend is right here."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fastmem.audit.selfcheck import environment_report, run_self_checks
from fastmem.errors import UsageError


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "audit", help="check the installation: backends, versions, numerics vs the reference",
        description="Print the environment (torch, triton, CUDA extension, backends per device) and run "
                    "every fused op on every available backend against the float64 torch reference. "
                    "Exit code 1 if any check fails.",
        epilog="examples:\n  fastmem audit\n  fastmem audit --device cuda --json audit.json\n"
               "  TRITON_INTERPRET=1 fastmem audit   # also checks the Triton kernels on the CPU\n"
               "  fastmem audit --build-cuda         # compile the CUDA extension once (JIT, cached)",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if present")
    parser.add_argument("--json", type=Path, default=None, help="also write the report as JSON")
    parser.add_argument("--build-cuda", action="store_true",
                        help="build the CUDA extension now if it is not built (minutes, once; cached). backend='auto' "
                             "never starts that build inside a training step")
    parser.set_defaults(func=run)


def run(args) -> int:
    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA device is visible to torch")
    if args.build_cuda:
        from fastmem._cuda_build import build_cuda_extension

        try:
            build_cuda_extension()
        except RuntimeError as exc:
            print(f"fastmem audit --build-cuda: {exc}")
            return 1
        print("fastmem audit --build-cuda: the CUDA extension is built and cached; backend='auto' will use it")
    env = environment_report()
    for key, value in env.items():
        print(f"{key:>18}: {value}")
    results = run_self_checks(args.device)
    print(f"\n{'op':<22}{'backend':<9}{'dtype':<10}{'case':<6}{'rel err':>10}{'tol':>9}  result")
    for r in results:
        err = "-" if r.rel_err is None else f"{r.rel_err:.2e}"
        verdict = "ok" if r.passed else f"FAIL {r.error or ''}"
        print(f"{r.op:<22}{r.backend:<9}{r.dtype:<10}{r.case:<6}{err:>10}{r.tolerance:>9.0e}  {verdict}")
    if args.json:
        args.json.write_text(json.dumps({"environment": env, "checks": [r.to_dict() for r in results]}, indent=2))
    failed = sum(not r.passed for r in results)
    print(f"\n{len(results) - failed} passed, {failed} failed")
    return 1 if failed else 0
