"""Every csrc/*.cu compiles with nvcc alone (no torch headers), as CI's `make nvcc-check` does,
and the torch binding compiles against torch's headers; no GPU needed."""

from __future__ import annotations

import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

from tests.csrc.cuda_toolchain import (CSRC, CU_SOURCES, MAKEFILE_NVCC_FLAGS, STRICT_NVCC_FLAGS,
                                       TORCH_BUILD_NVCC_FLAGS, cuda_include_dir, find_nvcc)

NVCC = find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (set CUDA_HOME or put nvcc on PATH)")


def _compile(args: list[str], timeout: int = 300) -> None:
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(args)}\n{result.stdout}\n{result.stderr}"


def test_kernel_sources_exist_and_are_torch_free():
    names = {p.name for p in CU_SOURCES}
    assert "cross_entropy.cu" in names and (CSRC / "bindings.cpp").is_file()
    torch_include = re.compile(r'#include\s*[<"](torch|ATen|c10|pybind11)/')
    for path in list(CU_SOURCES) + sorted(CSRC.glob("*.h")):
        assert not torch_include.search(path.read_text()), f"{path.name} must not include torch headers"
    cpp_files = sorted(CSRC.glob("*.cpp"))
    assert [p.name for p in cpp_files] == ["bindings.cpp"], "one thin binding file, every kernel in a .cu"


@needs_nvcc
@pytest.mark.parametrize("flags", [MAKEFILE_NVCC_FLAGS, TORCH_BUILD_NVCC_FLAGS], ids=["makefile", "torch-build"])
@pytest.mark.parametrize("source", CU_SOURCES, ids=lambda p: p.name)
def test_cu_file_compiles_with_nvcc(source, flags, tmp_path):
    _compile([NVCC, "-c", *flags, *STRICT_NVCC_FLAGS, str(source), "-o", str(tmp_path / (source.stem + ".o"))])


@needs_nvcc
def test_row_kernels_use_128_bit_accesses(tmp_path):
    """The vectorized path really is one 16-byte access per thread (ld/st .v4.u32 or .v2.f64)."""
    ptx = tmp_path / "cross_entropy.ptx"
    _compile([NVCC, "-ptx", "-std=c++17", "-arch=compute_90a", str(CSRC / "cross_entropy.cu"), "-o", str(ptx)])
    text = ptx.read_text()
    assert re.search(r"ld\.global(\.nc)?\.v4\.u32", text), "no 128-bit load of 16-bit logits"
    assert re.search(r"st\.global\.v4\.u32", text), "no 128-bit store of 16-bit gradients"
    assert re.search(r"ld\.global(\.nc)?\.v2\.f64", text), "no 128-bit load of fp64 logits"


@pytest.mark.slow
def test_binding_compiles_against_torch_headers():
    """csrc/bindings.cpp with g++ and the CPU wheel's headers (they include c10/cuda), the
    way CUDAExtension compiles it; only linking and running need a CUDA torch."""
    import torch.utils.cpp_extension as cpp_extension

    include = cuda_include_dir()
    torch_includes = cpp_extension.include_paths()
    if shutil.which("g++") is None:
        pytest.skip("g++ not found")
    if include is None:
        pytest.skip("no CUDA toolkit headers (cuda_runtime_api.h) found")
    if not any((Path(p) / "c10" / "cuda" / "CUDAGuard.h").is_file() for p in torch_includes):
        pytest.skip("this torch wheel ships no c10/cuda headers")
    python_include = sysconfig.get_paths()["include"]
    args = ["g++", "-std=c++20", "-fsyntax-only", "-Wall", "-Wextra", "-Werror",
            # the CPU wheel lacks this generated header; it only sets export macros
            "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE", "-DTORCH_EXTENSION_NAME=_cuda_ext", "-DTORCH_API_INCLUDE_EXTENSION_H"]
    for path in [*torch_includes, str(include), python_include]:
        args += ["-isystem", path]
    args += [f"-I{CSRC}", str(CSRC / "bindings.cpp")]
    _compile(args, timeout=600)
