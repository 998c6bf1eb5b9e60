"""fp32 CPU GEMMs of the fused loss through oneDNN, where torch ships it.

On the AVX-512 AMD EPYC CI machine torch's fp32 `mm` (MKL sgemm) runs the SmolLM2 head
GEMMs (M=128-512, H=576, V=49152) at ~90 GFLOP/s on 2 cores; oneDNN's JIT kernels, reached
through `torch.ops.mkldnn._linear_pointwise` (the op inductor's CPU backend emits for
linear layers), run the same products at ~170 GFLOP/s in IEEE fp32 (relative error 4e-7
against float64, MKL's 2.5e-7). That op has no `out=`, so its result is a fresh tensor:
kept under glibc's mmap threshold (32 MiB; cross_entropy_chunked.CPU_ONEDNN_CHUNK_BYTES),
a freed chunk is reused without new page faults.

Everything else (other dtypes, devices, a torch without the op) takes torch.mm.
`FASTMEM_CPU_GEMM=mkl` forces torch.mm (for comparisons).
"""

from __future__ import annotations

import os

import torch


def _linear_pointwise():
    if os.environ.get("FASTMEM_CPU_GEMM", "onednn") != "onednn":
        return None
    try:
        if not torch.backends.mkldnn.is_available():
            return None
        return torch.ops.mkldnn._linear_pointwise.default
    except (AttributeError, RuntimeError):
        return None


_ONEDNN_LINEAR = _linear_pointwise()


def onednn_serves(dtype: torch.dtype, device: torch.device) -> bool:
    """The chunk loop's GEMMs at this dtype / device go through oneDNN."""
    return _ONEDNN_LINEAR is not None and device.type == "cpu" and dtype == torch.float32


def onednn_applies(a: torch.Tensor, b: torch.Tensor) -> bool:
    # The op has no autograd formula: only where no graph is being recorded (the chunk loop
    # runs inside autograd.Function.forward / a custom op, both without grad mode).
    # oneDNN takes the left operand row-major only (a transposed view has no primitive).
    return (onednn_serves(a.dtype, a.device) and b.dtype == torch.float32 and a.dim() == 2 and a.stride(1) == 1
            and not torch.is_grad_enabled())


def _into(result: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    return result if out is None else out.copy_(result)


def matmul_nt(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None, *,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b.T (+ bias): a `[M, K]`, b `[N, K]` -> `[M, N]`, into `out` when given (torch.mm
    writes there directly; oneDNN's fresh result is copied in), else a new tensor."""
    if onednn_applies(a, b) and (bias is None or bias.dtype == torch.float32):
        return _into(_ONEDNN_LINEAR(a, b, bias, "none", [], ""), out)
    if bias is not None:
        return torch.addmm(bias, a, b.t(), out=out) if out is not None else torch.addmm(bias, a, b.t())
    return torch.mm(a, b.t(), out=out) if out is not None else torch.mm(a, b.t())


def matmul_nn(a: torch.Tensor, b: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b: a `[M, K]`, b `[K, N]` -> `[M, N]`, into `out` when given (as matmul_nt)."""
    if onednn_applies(a, b):
        return _into(_ONEDNN_LINEAR(a, b.t(), None, "none", [], ""), out)
    return torch.mm(a, b, out=out) if out is not None else torch.mm(a, b)
