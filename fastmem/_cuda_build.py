"""Find the CUDA extension (csrc/): the prebuilt `fastmem._cuda_ext`, else a JIT build.

setup.py builds `fastmem._cuda_ext` when a CUDA build of torch and nvcc are present
(FASTMEM_CUDA=0/1/auto). Without it, the first use of the CUDA backend compiles the CUDA
sources with ninja through `torch.utils.cpp_extension.load`; torch caches the build under
TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions) and rebuilds only when a source or
flag changes. FASTMEM_CUDA=0 turns both off. When nothing loads, `reason` says why, and
`backend="cuda"` raises it; `backend="auto"` falls back to triton, then torch.

A JIT build takes minutes, so it starts only when asked: `backend="cuda"`, `fastmem audit
--build-cuda`, `fastmem.build_cuda_extension()`, or FASTMEM_CUDA=1 (build on first use).
`backend="auto"` uses the extension when it is prebuilt or a build of the current sources is
already cached (`cuda_extension_ready`), and otherwise says once in the log how to build it.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger("fastmem")

# Where the CUDA sources are: an installed package carries them as package data in
# fastmem/csrc/ (setup.py maps the repository's csrc/ there); a source checkout has them in
# csrc/ beside the package. The installed copy wins so a wheel never looks outside itself.
PACKAGED_CSRC_DIR = Path(__file__).resolve().parent / "csrc"
SOURCE_TREE_CSRC_DIR = Path(__file__).resolve().parent.parent / "csrc"


def find_csrc_dir(candidates: tuple[Path, ...] = (PACKAGED_CSRC_DIR, SOURCE_TREE_CSRC_DIR)) -> Path | None:
    """The first directory holding the binding (csrc/bindings.cpp), or None."""
    return next((d for d in candidates if (d / "bindings.cpp").is_file()), None)


CSRC_DIR = find_csrc_dir() or PACKAGED_CSRC_DIR
JIT_MODULE_NAME = "fastmem_cuda_ext"
# Shared with setup.py. No --use_fast_math: the kernels are memory-bound and the loss of a
# memorized token (lse - z_y) needs accurate exp/log. -lineinfo lets compute-sanitizer name
# source lines. The C++ standard is left to torch (C++20 for torch >= 2.10; the .cu files are
# also checked with C++17 in CI).
NVCC_FLAGS = ["-O3", "-lineinfo"]
CXX_FLAGS = ["-O3"]


@dataclass(frozen=True)
class CudaExtension:
    module: ModuleType | None
    reason: str  # why `module` is None ("" when it loaded)


def cuda_sources(csrc_dir: Path = CSRC_DIR) -> list[Path]:
    """Every CUDA kernel file and the one binding file, in a stable order."""
    return sorted(csrc_dir.glob("*.cu")) + sorted(csrc_dir.glob("*.cpp"))


def jit_build_blocker() -> str | None:
    """Why a JIT build cannot run here, or None when it can."""
    mode = os.environ.get("FASTMEM_CUDA", "auto").strip().lower()
    if mode == "0":
        return "FASTMEM_CUDA=0 turns the CUDA extension off"
    if mode not in ("1", "auto"):
        return f"FASTMEM_CUDA must be 0, 1 or auto, got {mode!r}"
    if not torch.version.cuda:
        return f"torch {torch.__version__} is not a CUDA build"
    if not (CSRC_DIR / "bindings.cpp").is_file():
        return (f"the CUDA sources are missing (looked in {PACKAGED_CSRC_DIR} and {SOURCE_TREE_CSRC_DIR}): "
                "reinstall fastmem from its wheel or sdist")
    from torch.utils.cpp_extension import CUDA_HOME, is_ninja_available

    if not (CUDA_HOME or shutil.which("nvcc")):
        return "nvcc was not found (install the CUDA toolkit or set CUDA_HOME)"
    if not is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    return None


STAMP_NAME = "fastmem_sources.sha256"


def sources_digest(csrc_dir: Path = CSRC_DIR) -> str:
    """Hash of everything a JIT build depends on: sources, headers, flags, torch version."""
    digest = hashlib.sha256()
    for path in sorted(csrc_dir.glob("*.cu")) + sorted(csrc_dir.glob("*.cpp")) + sorted(csrc_dir.glob("*.h")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    digest.update(repr((NVCC_FLAGS, CXX_FLAGS, torch.__version__, torch.version.cuda)).encode())
    return digest.hexdigest()


def _stamp_path() -> Path:
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(JIT_MODULE_NAME, verbose=False)) / STAMP_NAME


def jit_build_is_current() -> bool:
    """True when a JIT build of exactly these sources is cached (loading it compiles nothing)."""
    try:
        return _stamp_path().read_text().strip() == sources_digest()
    except (OSError, RuntimeError):
        return False


def _jit_build() -> ModuleType:
    from torch.utils.cpp_extension import load

    log.warning("fastmem: compiling the CUDA extension from %s (takes minutes once; cached afterwards)", CSRC_DIR)
    module = load(name=JIT_MODULE_NAME, sources=[str(p) for p in cuda_sources()],
                  extra_include_paths=[str(CSRC_DIR)], extra_cflags=CXX_FLAGS, extra_cuda_cflags=NVCC_FLAGS,
                  verbose=os.environ.get("FASTMEM_CUDA_VERBOSE", "0") not in ("", "0"))
    stamp = _stamp_path()
    tmp = stamp.with_suffix(".tmp")
    tmp.write_text(sources_digest())
    tmp.replace(stamp)  # atomic: a half-written stamp never claims a build
    return module


@functools.cache
def load_cuda_extension() -> CudaExtension:
    """Import the prebuilt extension, else JIT-build it (once per process; never raises)."""
    mode = os.environ.get("FASTMEM_CUDA", "auto").strip().lower()
    if mode == "0":
        return CudaExtension(None, "FASTMEM_CUDA=0 turns the CUDA extension off")
    try:
        return CudaExtension(importlib.import_module("fastmem._cuda_ext"), "")
    except ImportError as exc:
        prebuilt = f"no prebuilt fastmem._cuda_ext ({exc})"
    blocker = jit_build_blocker()
    if blocker is not None:
        return CudaExtension(None, f"{prebuilt}, and no JIT build: {blocker}")
    try:
        module = _jit_build()
    except Exception as exc:  # a compiler failure must leave backend="auto" working
        log.warning("fastmem: the CUDA extension failed to build; falling back (%s)", exc)
        return CudaExtension(None, f"{prebuilt}, and the JIT build failed: {exc}")
    return CudaExtension(module, "")


BUILD_HOWTO = ("build it once with `fastmem audit --build-cuda` or `fastmem.build_cuda_extension()` "
               "(minutes; cached afterwards), or set FASTMEM_CUDA=1 to build on first use")
_said_not_built = False


def cuda_extension_ready() -> bool:
    """Whether the extension is usable WITHOUT starting a compiler: already loaded, prebuilt, or
    a cached JIT build of the current sources. What `backend="auto"` asks; never builds unless
    FASTMEM_CUDA=1. The first time a buildable-but-unbuilt extension is skipped, the log says how
    to build it."""
    global _said_not_built
    if load_cuda_extension.cache_info().currsize:  # already decided in this process
        return load_cuda_extension().module is not None
    mode = os.environ.get("FASTMEM_CUDA", "auto").strip().lower()
    if mode == "0":
        return False
    if importlib.util.find_spec("fastmem._cuda_ext") is not None or mode == "1":
        return load_cuda_extension().module is not None
    if jit_build_blocker() is not None:
        return False
    if jit_build_is_current():
        return load_cuda_extension().module is not None
    if not _said_not_built:
        _said_not_built = True
        log.warning("fastmem: backend='auto' does not use the CUDA kernels: the extension is not built, and a "
                    "build takes minutes, so it never starts inside a training step unasked; %s", BUILD_HOWTO)
    return False


def build_cuda_extension() -> ModuleType:
    """Build (or load the cached build of) the CUDA extension now; raises with the reason when it
    cannot. Afterwards `backend="auto"` uses it, in this process and in later ones."""
    load_cuda_extension.cache_clear()
    extension = load_cuda_extension()
    if extension.module is None:
        raise RuntimeError(f"the fastmem CUDA extension is unavailable: {extension.reason}")
    return extension.module


OPS_NAMESPACE = "fastmem_cuda"


def cuda_ops_namespace():
    """`torch.ops.fastmem_cuda`, loading (or JIT-building) the extension first; raises with the
    reason when it is unavailable."""
    extension = load_cuda_extension()
    if extension.module is None:
        raise RuntimeError(f"backend='cuda' is unavailable: {extension.reason}")
    return getattr(torch.ops, OPS_NAMESPACE)


@functools.cache
def cuda_ops_with_fakes(register_fakes):
    """`cuda_ops_namespace()`, with `register_fakes()` (a module's shape-only impls of its ops in
    that namespace) run once per process, the first time the namespace loads for that module."""
    ops = cuda_ops_namespace()
    register_fakes()
    return ops


def cuda_gpu_skip_reason() -> str | None:
    """Why the GPU tests of the CUDA backend cannot run here (None when they can)."""
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (backend='cuda' runs the csrc/ kernels)"
    extension = load_cuda_extension()
    return None if extension.module is not None else f"the CUDA extension is unavailable: {extension.reason}"
