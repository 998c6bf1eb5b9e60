"""Where the CUDA toolchain and the csrc/ sources are, for the no-GPU checks of csrc/."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CSRC = REPO / "csrc"
CU_SOURCES = sorted(CSRC.glob("*.cu"))

# The Makefile's nvcc-check flags (what CI runs), and the defines torch's extension build adds
# to every nvcc call (torch.utils.cpp_extension.COMMON_NVCC_FLAGS) with its C++20.
MAKEFILE_NVCC_FLAGS = ["-std=c++17", "-gencode=arch=compute_90a,code=sm_90a"]
TORCH_BUILD_NVCC_FLAGS = ["-std=c++20", "-gencode=arch=compute_90a,code=sm_90a", "-D__CUDA_NO_HALF_OPERATORS__",
                          "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
                          "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr"]
# Warnings are errors here: a sloppy kernel fails before it reaches a GPU.
STRICT_NVCC_FLAGS = ["-Werror", "all-warnings", "-Xcompiler", "-Wall,-Wextra,-Werror"]


def find_nvcc() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def cuda_include_dir() -> Path | None:
    """A CUDA toolkit include dir with cuda_bf16.h (for host builds of the kernels' math)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = find_nvcc()
    if nvcc:
        candidates.append(str(Path(os.path.realpath(nvcc)).parent.parent))
    for home in filter(None, candidates):
        include = Path(home) / "include"
        if (include / "cuda_bf16.h").is_file():
            return include
    return None


def build_host_library(harness: Path, library: Path, cuda_include: Path) -> Path:
    """g++-build a host harness of the kernels' math into a shared library (strict warnings)."""
    args = ["g++", "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC", f"-I{CSRC}",
            f"-I{cuda_include}", str(harness), "-o", str(library)]
    result = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(args)}\n{result.stderr}"
    return library


def register_host_ops(namespace: str, op_module, kernels):
    """Define `op_module.SCHEMAS` in `namespace`, implemented on the CPU by the host build
    `kernels`, with the op module's own fake impls; returns (ops, library to _destroy())."""
    import torch

    library = torch.library.Library(namespace, "DEF")
    for name, schema in op_module.SCHEMAS.items():
        library.define(schema)
        library.impl(name, getattr(kernels, name), "CPU")
    op_module.register_fake_impls(namespace)
    return getattr(torch.ops, namespace), library
