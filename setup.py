"""Packages, the CUDA sources as package data, and the optional prebuilt CUDA extension.

The wheel always ships csrc/ (the .cu/.cpp/.h files) as the package data `fastmem/csrc/`, so
an installed fastmem can JIT-build the extension on first use (fastmem/_cuda_build.py); csrc/
itself stays at the repository root, where nvcc-check and the tests/csrc harnesses read it.

FASTMEM_CUDA=1 requires the prebuilt extension, 0 skips it, auto (default) builds it when a CUDA
build of torch and nvcc are both present. torch is not a build requirement (that would pull a
multi-GB CUDA torch into every isolated build), so building the extension from the sdist needs
the user's own torch: `pip install --no-build-isolation fastmem_lora-X.tar.gz`. Without them this
is a pure-Python install.
"""

import glob
import os
import shutil

from setuptools import find_packages, setup

CSRC_PACKAGE = "fastmem.csrc"
CSRC_PATTERNS = ["*.cu", "*.cuh", "*.cpp", "*.h"]


def _cuda_extension():
    mode = os.environ.get("FASTMEM_CUDA", "auto").lower()
    if mode not in ("0", "1", "auto"):
        raise SystemExit(f"FASTMEM_CUDA must be 0, 1 or auto, got {mode!r}")
    if mode == "0":
        return None
    sources = sorted(glob.glob("csrc/*.cu")) + sorted(glob.glob("csrc/*.cpp"))
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        torch = None
    has_cuda = bool(torch is not None and torch.version.cuda and (CUDA_HOME or shutil.which("nvcc")))
    if not (has_cuda and sources):
        if mode == "1":
            raise SystemExit("FASTMEM_CUDA=1 but no CUDA build of torch + nvcc (or no csrc/ sources) was found "
                             "(an isolated build sees no torch: pip install --no-build-isolation)")
        return None
    # The same flags as the JIT build (fastmem/_cuda_build.py NVCC_FLAGS / CXX_FLAGS): no
    # --use_fast_math (the loss of a memorized token needs accurate exp/log), -lineinfo for
    # compute-sanitizer, and the C++ standard left to torch (C++20 for torch >= 2.10).
    ext = CUDAExtension(
        name="fastmem._cuda_ext",
        sources=sources,
        include_dirs=[os.path.abspath("csrc")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
    )
    return ext, BuildExtension


PACKAGING = dict(
    packages=find_packages(include=["fastmem", "fastmem.*"]) + [CSRC_PACKAGE],
    package_dir={CSRC_PACKAGE: "csrc"},
    package_data={CSRC_PACKAGE: CSRC_PATTERNS},
)

built = _cuda_extension()
if built is None:
    setup(**PACKAGING)
else:
    extension, build_ext = built
    setup(ext_modules=[extension], cmdclass={"build_ext": build_ext}, **PACKAGING)
