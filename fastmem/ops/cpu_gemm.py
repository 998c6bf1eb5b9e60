"""fp32 CPU GEMMs of the fused loss: oneDNN or MKL, whichever this machine runs faster.

torch's fp32 `mm` runs MKL's sgemm; oneDNN's JIT kernels are reached through
`torch.ops.mkldnn._linear_pointwise` (the op inductor's CPU backend emits for linear layers),
IEEE fp32 both. Which is faster depends on the CPU, and not on its instruction set alone
(head GEMMs of SmolLM2, M = 128-512, H = 576, V = 49152, 2 cores):
* an AMD EPYC with AVX-512: oneDNN ~170 GFLOP/s against MKL's ~90;
* an AMD EPYC without AVX-512: oneDNN's fwd+bwd floor 2,059 ms against torch.mm's 1,456;
* an Intel Xeon with AVX-512 (benchmarks/results/cross_entropy_cpu_20261203.md): MKL ahead,
  312 vs 379 ms for M = 512.
So the route is measured, once: the first fp32 CPU GEMM of a process times both routes the
way the chunk loop runs them (512 head-like rows: oneDNN as four fresh 128-row products, MKL
as one 512-row product into a reused buffer; interleaved, best of CALIBRATION_ROUNDS) and
takes the faster, and
the answer is cached on disk per (CPU model, torch version, threads) so later processes start
decided. `FASTMEM_CPU_GEMM=onednn|mkl` overrides it (`auto`, the default, measures);
`cpu_gemm_route()` says which route runs and why (the benchmark prints it).

oneDNN's op has no `out=`, so its result is a fresh tensor: kept under glibc's mmap threshold
(32 MiB; cross_entropy/chunk_loop.CPU_ONEDNN_CHUNK_BYTES), a freed chunk is reused without new
page faults. Other dtypes and devices always take torch.mm.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import time
from pathlib import Path
from typing import Callable

import torch

ROUTES = ("onednn", "mkl")
ENV_VAR = "FASTMEM_CPU_GEMM"
# (M, K, N): 512 rows against a head-like [N, K] (~10 GFLOP, ~0.1 s a route on 2 cores)
CALIBRATION_SHAPE = (512, 576, 16384)
ONEDNN_CALIBRATION_ROWS = 128  # its chunk (cross_entropy/chunk_loop.CPU_ONEDNN_CHUNK_BYTES)
CALIBRATION_ROUNDS = 3


def _onednn_linear():
    try:
        if not torch.backends.mkldnn.is_available():
            return None
        return torch.ops.mkldnn._linear_pointwise.default
    except (AttributeError, RuntimeError):
        return None


def choose_route(requested: str, onednn_available: bool, measure: Callable[[], dict]) -> tuple[str, str]:
    """(route, why) for FASTMEM_CPU_GEMM=`requested`; `measure()` -> {route: seconds} is called
    only when the choice is left to the machine."""
    requested = requested.strip().lower() or "auto"
    if requested not in ROUTES + ("auto",):
        raise ValueError(f"{ENV_VAR} must be one of auto, onednn, mkl; got {requested!r}")
    if requested == "mkl":
        return "mkl", f"{ENV_VAR}=mkl"
    if not onednn_available:
        return "mkl", "this torch has no oneDNN linear op"
    if requested == "onednn":
        return "onednn", f"{ENV_VAR}=onednn"
    seconds = measure()
    route = min(ROUTES, key=lambda name: seconds[name])
    shown = ", ".join(f"{name} {seconds[name] * 1e3:.1f} ms" for name in ROUTES)
    return route, f"measured on this CPU at M, K, N = {CALIBRATION_SHAPE}: {shown}"


def _measure_routes() -> dict:
    """Best-of-rounds seconds of one CALIBRATION_SHAPE GEMM per route, interleaved."""
    m, k, n = CALIBRATION_SHAPE
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen)
    out = torch.empty(m, n)
    def onednn():
        for r0 in range(0, m, ONEDNN_CALIBRATION_ROWS):
            _ONEDNN_LINEAR(a[r0:r0 + ONEDNN_CALIBRATION_ROWS], b, None, "none", [], "")

    runs = {"onednn": onednn, "mkl": lambda: torch.mm(a, b.t(), out=out)}
    best = {name: float("inf") for name in ROUTES}
    with torch.no_grad():
        for name in ROUTES:  # warm-up (JIT, page faults)
            runs[name]()
        for _ in range(CALIBRATION_ROUNDS):
            for name in ROUTES:
                start = time.perf_counter()
                runs[name]()
                best[name] = min(best[name], time.perf_counter() - start)
    return best


def _cache_file() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "fastmem" / "cpu_gemm_route.json"


def cpu_model() -> str:
    """This machine's CPU model name (/proc/cpuinfo), or what `platform` knows."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), model)
    except OSError:
        pass
    return model


def _machine_key() -> str:
    return f"{cpu_model()} | torch {torch.__version__} | {torch.get_num_threads()} threads | {CALIBRATION_SHAPE}"


def _measured_with_cache() -> dict:
    """The calibration, read from / written to the on-disk cache (a failed write is harmless)."""
    path, key = _cache_file(), _machine_key()
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    if isinstance(cached.get(key), dict) and set(cached[key]) == set(ROUTES):
        return cached[key]
    seconds = _measure_routes()
    cached[key] = seconds
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(cached, indent=1))
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the new one
    except OSError:
        pass
    return seconds


@functools.cache
def cpu_gemm_route() -> tuple[str, str]:
    """The fp32 CPU GEMM route of this process and why, decided on first use."""
    return choose_route(os.environ.get(ENV_VAR, "auto"), _ONEDNN_LINEAR is not None, _measured_with_cache)


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
