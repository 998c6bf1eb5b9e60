"""The cross-entropy kernels' math built for the host (tests/csrc/ce_host_harness.cpp) behind
the same names and signatures as torch.ops.fastmem_cuda.ce_row_stats / ce_softmax_grad_."""

from __future__ import annotations

import ctypes
import re
from pathlib import Path

import torch

from tests.csrc.cuda_toolchain import CSRC, build_host_library

HARNESS = Path(__file__).with_name("ce_host_harness.cpp")
# fastmem_dtype in csrc/fastmem_kernels.h
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


def header_dtype_codes() -> dict[str, int]:
    text = (CSRC / "fastmem_kernels.h").read_text()
    return {name: int(value) for name, value in re.findall(r"FASTMEM_(\w+)\s*=\s*(\d+)", text)}


def build(out_dir: Path, cuda_include: Path) -> Path:
    return build_host_library(HARNESS, out_dir / "libce_host.so", cuda_include)


def _accum(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class CeHostKernels:
    """`threads` = 0 takes the kernels' own block size; else emulate blocks of that many threads."""

    def __init__(self, library: Path):
        lib = ctypes.CDLL(str(library))
        i64, ptr, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
        dbl = ctypes.c_double
        lib.fm_host_row_stats.argtypes = [c_int, ptr, i64, i64, i64, ptr, ctypes.POINTER(ptr), dbl, c_int]
        lib.fm_host_softmax_grad.argtypes = [c_int, ptr, i64, i64, i64, ptr, ptr, ptr, ptr, dbl, dbl, dbl, c_int]
        lib.fm_host_split_row.argtypes = [ctypes.c_uint64, i64, c_int, ctypes.POINTER(i64)]
        lib.fm_host_row_block_threads.argtypes = [i64, c_int]
        for name in ("fm_host_row_stats", "fm_host_softmax_grad", "fm_host_row_block_threads"):
            getattr(lib, name).restype = c_int
        lib.fm_host_split_row.restype = None
        self.lib = lib
        self.threads = 0

    @staticmethod
    def _check(logits: torch.Tensor, labels: torch.Tensor) -> None:
        assert logits.dim() == 2 and (logits.stride(1) == 1 or logits.shape[1] == 1)
        assert labels.dtype == torch.int64 and labels.is_contiguous() and labels.shape == logits.shape[:1]

    def ce_row_stats(self, logits: torch.Tensor, labels: torch.Tensor, softcap: float = 0.0):
        self._check(logits, labels)
        rows, cols = logits.shape
        outs = [torch.empty(rows, dtype=_accum(logits.dtype)) for _ in range(6)]
        pointers = (ctypes.c_void_p * 6)(*[o.data_ptr() for o in outs])
        status = self.lib.fm_host_row_stats(DTYPE_CODES[logits.dtype], logits.data_ptr(), rows, cols,
                                            logits.stride(0), labels.data_ptr(), pointers, softcap, self.threads)
        assert status == 0
        return tuple(outs)

    def ce_softmax_grad_(self, logits: torch.Tensor, labels: torch.Tensor, row_max: torch.Tensor,
                         log_sum: torch.Tensor, weight: torch.Tensor, softcap: float = 0.0,
                         label_smoothing: float = 0.0, lse_square_scale: float = 0.0) -> None:
        self._check(logits, labels)
        for row_vector in (row_max, log_sum, weight):
            assert row_vector.dtype == _accum(logits.dtype) and row_vector.is_contiguous()
        rows, cols = logits.shape
        status = self.lib.fm_host_softmax_grad(DTYPE_CODES[logits.dtype], logits.data_ptr(), rows, cols,
                                               logits.stride(0), labels.data_ptr(), row_max.data_ptr(),
                                               log_sum.data_ptr(), weight.data_ptr(), softcap, label_smoothing,
                                               lse_square_scale, self.threads)
        assert status == 0

    def split_row(self, address: int, n_cols: int, elem_bytes: int) -> tuple[int, int, int]:
        out = (ctypes.c_int64 * 3)()
        self.lib.fm_host_split_row(address, n_cols, elem_bytes, out)
        return out[0], out[1], out[2]

    def row_block_threads(self, n_cols: int, elem_bytes: int) -> int:
        return self.lib.fm_host_row_block_threads(n_cols, elem_bytes)
