"""fp32 CPU GEMMs of the fused loss: oneDNN or MKL, chosen by the machine.

torch's fp32 `mm` runs MKL's sgemm; oneDNN's JIT kernels are reached through
`torch.ops.mkldnn._linear_pointwise` (the op inductor's CPU backend emits for linear layers),
IEEE fp32 both (relative error vs float64 4e-7 / 2.5e-7 at the SmolLM2 head). Which is faster
depends on the CPU, measured at the SmolLM2 head GEMMs (M = 128-512, H = 576, V = 49152) on
2 cores:
* AVX-512 (an AMD EPYC, and the Intel Xeon of benchmarks/results/cross_entropy_cpu_20261203.md):
  oneDNN ~170 GFLOP/s against MKL's ~90;
* AVX2 only (a 2-core AMD EPYC without AVX-512): oneDNN's floor 2,059 ms against torch.mm's
  1,456 ms for the same fwd+bwd GEMMs, and the fused loss 1.78 s (oneDNN) vs 1.55 s (MKL).
So the route is oneDNN where torch's CPU capability is AVX-512 and MKL elsewhere, decided once
per process; `FASTMEM_CPU_GEMM=onednn|mkl` overrides it (`auto`, the default, decides).
`cpu_gemm_route()` says which route runs and why (the benchmark prints it).

oneDNN's op has no `out=`, so its result is a fresh tensor: kept under glibc's mmap threshold
(32 MiB; cross_entropy/chunk_loop.CPU_ONEDNN_CHUNK_BYTES), a freed chunk is reused without new
page faults. Other dtypes and devices always take torch.mm.
"""

from __future__ import annotations

import functools
import os

import torch

ROUTES = ("onednn", "mkl")
ENV_VAR = "FASTMEM_CPU_GEMM"


def _onednn_linear():
    try:
        if not torch.backends.mkldnn.is_available():
            return None
        return torch.ops.mkldnn._linear_pointwise.default
    except (AttributeError, RuntimeError):
        return None


def choose_route(requested: str, capability: str, onednn_available: bool) -> tuple[str, str]:
    """(route, why) for FASTMEM_CPU_GEMM=`requested` on a CPU whose torch capability is
    `capability` ("AVX512", "AVX2", ...)."""
    requested = requested.strip().lower() or "auto"
    if requested not in ROUTES + ("auto",):
        raise ValueError(f"{ENV_VAR} must be one of auto, onednn, mkl; got {requested!r}")
    if requested == "mkl":
        return "mkl", f"{ENV_VAR}=mkl"
    if not onednn_available:
        return "mkl", "this torch has no oneDNN linear op"
    if requested == "onednn":
        return "onednn", f"{ENV_VAR}=onednn"
    if capability.upper().startswith("AVX512"):
        return "onednn", f"CPU capability {capability}: oneDNN measured faster there"
    return "mkl", f"CPU capability {capability}: MKL measured faster without AVX-512"


@functools.cache
def cpu_gemm_route() -> tuple[str, str]:
    """The fp32 CPU GEMM route of this process and why, decided on first use."""
    return choose_route(os.environ.get(ENV_VAR, "auto"), torch.backends.cpu.get_cpu_capability(),
                        _onednn_linear() is not None)


_ONEDNN_LINEAR = _onednn_linear()


def onednn_serves(dtype: torch.dtype, device: torch.device) -> bool:
    """The chunk loop's GEMMs at this dtype / device go through oneDNN."""
    return (_ONEDNN_LINEAR is not None and device.type == "cpu" and dtype == torch.float32
            and cpu_gemm_route()[0] == "onednn")


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
