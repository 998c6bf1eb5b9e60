"""Every Triton kernel compiles ahead of time for sm_80 and sm_90 at the configurations the
dispatch chooses (see tests/ops/triton_aot.py): a type, shape or shared-memory error that the
CPU interpreter tolerates fails here instead of on a user's first GPU run.

One subprocess per target, in parallel (the kernels must be real JITFunctions, so no
TRITON_INTERPRET), each with an empty Triton cache so every kernel is really compiled.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ARCHS = (80, 90)


@pytest.fixture(scope="module")
def aot_results(tmp_path_factory):
    try:
        import triton  # noqa: F401
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError as exc:
        pytest.fail(f"triton with its NVIDIA backend is a test dependency: {exc}")
    workdir = tmp_path_factory.mktemp("triton_aot")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    procs = {}
    for arch in ARCHS:
        out = workdir / f"sm_{arch}.json"
        run_env = dict(env, TRITON_CACHE_DIR=str(workdir / f"cache_{arch}"))
        procs[arch] = (subprocess.Popen([sys.executable, "-m", "tests.ops.triton_aot", "--arch", str(arch),
                                         "--json", str(out)], cwd=ROOT, env=run_env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True), out)
    results = {}
    for arch, (proc, out) in procs.items():
        log, _ = proc.communicate(timeout=900)
        assert out.exists(), f"sm_{arch}: the AOT compile run produced no summary (exit {proc.returncode}):\n{log[-4000:]}"
        results[arch] = (proc.returncode, json.loads(out.read_text()), log)
    return results


@pytest.mark.parametrize("arch", ARCHS)
def test_every_kernel_compiles_for_the_gpu(aot_results, arch):
    returncode, summary, log = aot_results[arch]
    assert summary["never_launched"] == [], f"kernels the dispatch grid never reached: {summary['never_launched']}"
    assert summary["failures"] == [], "\n".join(summary["failures"])
    assert returncode == 0, log[-4000:]
    target = summary["targets"][f"sm_{arch}"]
    # Both ops' kernels were compiled, several variants each.
    assert set(target["per_kernel"]) == set(summary["kernels"])
    assert target["compiled"] >= len(summary["kernels"]) * 2
