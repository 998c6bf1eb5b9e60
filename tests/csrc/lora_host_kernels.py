"""The LoRA dropout GEMM built for the host (tests/csrc/lora_host_harness.cpp) behind the same
op names and signatures as torch.ops.fastmem_cuda.lora_* (csrc/bindings.cpp)."""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from tests.csrc.ce_host_kernels import DTYPE_CODES
from tests.csrc.cuda_toolchain import build_host_library

HARNESS = Path(__file__).with_name("lora_host_harness.cpp")
MASK_A, MASK_B, MASK_C = 1, 2, 3


class LoraGemm(ctypes.Structure):
    """fastmem_lora_gemm of csrc/fastmem_kernels.h, field for field."""

    _fields_ = [("dtype", ctypes.c_int), ("a", ctypes.c_void_p), ("a_row_stride", ctypes.c_int64),
                ("a_col_stride", ctypes.c_int64), ("b", ctypes.c_void_p), ("b_row_stride", ctypes.c_int64),
                ("b_col_stride", ctypes.c_int64), ("c", ctypes.c_void_p), ("c_row_stride", ctypes.c_int64),
                ("c_col_stride", ctypes.c_int64), ("c_split_stride", ctypes.c_int64), ("m", ctypes.c_int64),
                ("n", ctypes.c_int64), ("k", ctypes.c_int64), ("splits", ctypes.c_int64), ("alpha", ctypes.c_double),
                ("mask_on", ctypes.c_int), ("seed", ctypes.c_uint32), ("drop_below", ctypes.c_uint32),
                ("accumulate", ctypes.c_int), ("out_accum", ctypes.c_int)]


def build(out_dir: Path, cuda_include: Path) -> Path:
    return build_host_library(HARNESS, out_dir / "liblora_host.so", cuda_include)


def _accum(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class LoraHostKernels:
    """`splits` sets the rank-grad token split (the binding picks its own from N)."""

    def __init__(self, library: Path):
        lib = ctypes.CDLL(str(library))
        lib.fm_host_lora_gemm.argtypes = [ctypes.POINTER(LoraGemm)]
        lib.fm_host_lora_gemm.restype = ctypes.c_int
        lib.fm_host_lora_keep_mask.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint32,
                                               ctypes.c_uint32]
        lib.fm_host_lora_keep_mask.restype = None
        lib.fm_host_drop_below.argtypes = [ctypes.c_double]
        lib.fm_host_drop_below.restype = ctypes.c_uint32
        self.lib = lib
        self.splits = 3

    def drop_below(self, p: float) -> int:
        return self.lib.fm_host_drop_below(p)

    def gemm(self, a, b, c, *, alpha, mask_on, seed, p, accumulate=False, splits=1, partial=False):
        """c (+)= alpha * mask(a @ b) with (m, k) / (k, n) / (m, n) the strides of the views given."""
        params = LoraGemm(DTYPE_CODES[a.dtype], a.data_ptr(), a.stride(0), a.stride(1), b.data_ptr(), b.stride(0),
                          b.stride(1), c.data_ptr(), c.stride(-2), c.stride(-1), c.stride(0) if partial else 0,
                          a.shape[0], b.shape[1], a.shape[1], splits, alpha, mask_on, seed, self.drop_below(p),
                          int(accumulate), int(partial))
        assert self.lib.fm_host_lora_gemm(ctypes.byref(params)) == 0

    # ---- the op surface of torch.ops.fastmem_cuda.lora_* ----

    def lora_dropout_project(self, x, lora_A, seed, p, scale):
        xa = torch.empty(x.shape[0], lora_A.shape[0], dtype=x.dtype)
        self.gemm(x, lora_A.t(), xa, alpha=scale, mask_on=MASK_A, seed=seed, p=p)
        return xa

    def lora_dropout_expand_(self, out, c, d, seed, p, alpha):
        self.gemm(c, d, out, alpha=alpha, mask_on=MASK_C, seed=seed, p=p, accumulate=True)

    def lora_dropout_rank_grad(self, c, x, seed, p, alpha):
        splits = max(1, min(self.splits, x.shape[0]))
        partial = torch.empty(splits, c.shape[1], x.shape[1], dtype=_accum(x.dtype))
        self.gemm(c.t(), x, partial, alpha=alpha, mask_on=MASK_B, seed=seed, p=p, splits=splits, partial=True)
        return partial.sum(0)

    def lora_keep_mask(self, like, n_rows, n_cols, seed, p):
        out = torch.empty(n_rows, n_cols, dtype=torch.int8)
        self.lib.fm_host_lora_keep_mask(out.data_ptr(), n_rows, n_cols, seed, self.drop_below(p))
        return out
