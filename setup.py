"""Build decision for the optional CUDA extension (csrc/).

FASTMEM_CUDA=1 requires the extension, 0 skips it, auto (default) builds it when a CUDA build
of torch and nvcc are both present. Without them this is a pure-Python install.
"""

import glob
import os
import shutil

from setuptools import setup


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
            raise SystemExit("FASTMEM_CUDA=1 but no CUDA build of torch + nvcc (or no csrc/ sources) was found")
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


built = _cuda_extension()
if built is None:
    setup()
else:
    extension, build_ext = built
    setup(ext_modules=[extension], cmdclass={"build_ext": build_ext})
