"""Time, peak extra memory and the FLOP floor of one case; its profile on request.

Time: pytest-benchmark times `step` (wall clock; on a GPU the step ends with a synchronize, so
that is the real latency); on a GPU `triton.testing.do_bench` (CUDA events, L2 flushed between
runs) also gives `device_ms`, the figure the report uses there.
Peak extra memory: on a GPU `max_memory_allocated` above what was allocated before the step;
on a CPU the process's RSS high-water mark above its RSS before the step (reset through
/proc/self/clear_refs; large blocks are mmap-ed and returned on free, see `use_mmap_for_large_blocks`).
Floor: the case's unavoidable GEMMs, both as FLOPs and as the measured time of those GEMMs
alone on this device; `floor_fraction` = floor time / case time (1.0 = at the floor).
"""

from __future__ import annotations

import ctypes
import functools
import gc
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


@functools.cache
def use_mmap_for_large_blocks() -> bool:
    """glibc: blocks >= 64 KiB through mmap and freed memory returned at once, so the RSS
    high-water mark sees every large allocation of a step and none is reused unseen."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 0))


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(key))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_extra_mib(step: Callable[[], None], device: torch.device) -> tuple[float | None, str]:
    """Peak memory one step adds above what exists before it, and how it was measured."""
    gc.collect()
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20, "cuda max_memory_allocated"
    if not (use_mmap_for_large_blocks() and Path("/proc/self/clear_refs").exists()):
        return None, "unavailable on this OS"
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # VmHWM := VmRSS
    base = _proc_status_kib("VmRSS:")
    step()
    return (_proc_status_kib("VmHWM:") - base) / 1024, "RSS high-water mark"


def median_ms(fn: Callable[[], None], device: torch.device, reps: int) -> float:
    """Median wall/device time of `fn` (do_bench on a GPU), one warm-up first."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=5, rep=100))
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


@dataclass(frozen=True)
class Floor:
    """The GEMMs a case cannot avoid: `flops` in total, `ms` measured alone here, `what` in words."""

    flops: float
    ms: float
    what: str


_floor_cache: dict[tuple, Floor] = {}


def cached_floor(key: tuple, measure: Callable[[], Floor]) -> Floor:
    """One measurement per shape/dtype per session (several contenders share it)."""
    if key not in _floor_cache:
        _floor_cache[key] = measure()
    return _floor_cache[key]


def head_floor(hidden: torch.Tensor, weight: torch.Tensor, active_fraction: float, reps: int) -> Floor:
    """Frozen-head step: the logits GEMM over all N rows + grad_hidden over the active rows,
    (1 + a) * 2*N*H*V FLOPs, timed as two unchunked torch.mm."""
    n, h = hidden.shape
    v = weight.shape[0]
    n_active = max(1, round(n * active_fraction))
    logits = torch.empty(n, v, device=hidden.device, dtype=hidden.dtype)

    def gemms():
        torch.mm(hidden, weight.t(), out=logits)
        torch.mm(logits[:n_active], weight)

    ms = median_ms(gemms, hidden.device, reps)
    del logits
    return Floor((n + n_active) * 2.0 * h * v, ms, f"logits GEMM + grad_hidden GEMM over {active_fraction:.0%} of rows")


def lora_floor(x: torch.Tensor, weight: torch.Tensor, grad_out: torch.Tensor, reps: int) -> Floor:
    """Frozen-base LoRA layer: x W^T forward + dy W backward (no dW), 4*N*I*O FLOPs."""
    n, i = x.shape
    o = weight.shape[0]

    def gemms():
        torch.mm(x, weight.t())
        torch.mm(grad_out, weight)

    return Floor(4.0 * n * i * o, median_ms(gemms, x.device, reps), "base GEMMs x W^T + dy W")


def gemm_rate_floor(flops: float, m: int, k: int, n: int, dtype: torch.dtype, device: torch.device,
                    what: str, reps: int) -> Floor:
    """A floor without one GEMM to time: `flops` at the rate this device reaches on an [m, k] x [k, n]
    GEMM of the case's typical size."""
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    gemm_ms = median_ms(lambda: torch.mm(a, b), device, reps)
    rate = 2.0 * m * k * n / gemm_ms
    return Floor(flops, flops / rate, what)


def profile_steps(step: Callable[[], None], device: torch.device, out_dir: Path, name: str,
                  iterations: int = 3) -> Path:
    """A torch profiler trace (Chrome / Perfetto JSON) of `iterations` steps after one warm-up."""
    from torch.profiler import ProfilerActivity, profile, record_function

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    step()
    _sync(device)
    with profile(activities=activities, record_shapes=True) as prof:
        for i in range(iterations):
            with record_function(f"step {i}"):
                step()
            _sync(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / (re.sub(r"[^A-Za-z0-9_.%+-]+", "_", name).strip("_") + ".json")
    prof.export_chrome_trace(str(path))
    return path


def run_case(benchmark, request, step: Callable[[], None], device: torch.device, floor: Floor | None,
             info: dict, rounds: int) -> None:
    """Time `step` with pytest-benchmark, then record memory, floor and profile in extra_info."""
    timed = step
    if device.type == "cuda":
        def timed():
            step()
            torch.cuda.synchronize(device)
    benchmark.extra_info.update(info)
    benchmark.extra_info["device"] = device.type
    benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=1)
    profile_dir = request.config.getoption("--profile-dir")
    if profile_dir:
        path = profile_steps(step, device, Path(profile_dir), request.node.name)
        benchmark.extra_info["profile_trace"] = str(path)
    if benchmark.disabled:
        return
    ms = benchmark.stats.stats.median * 1e3
    if device.type == "cuda":
        ms = median_ms(step, device, rounds)
        benchmark.extra_info["device_ms"] = ms
    benchmark.extra_info["ms"] = ms
    mib, how = peak_extra_mib(step, device)
    benchmark.extra_info["peak_extra_mib"] = mib
    benchmark.extra_info["peak_extra_method"] = how
    if floor is not None:
        benchmark.extra_info.update(floor_flops=floor.flops, floor_ms=floor.ms, floor_what=floor.what,
                                    floor_fraction=floor.ms / ms, achieved_tflops=floor.flops / ms / 1e9)
