"""Backend dispatch: one small function picks "cuda" | "triton" | "torch" per op.

`auto` takes the fastest backend available for the tensors' device (cuda > triton > torch
on a GPU; torch on the CPU, where Triton only runs through its slow interpreter) and says
which once in the log.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os

import torch

log = logging.getLogger("fastmem")

BACKENDS = ("torch", "triton", "cuda")


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def cuda_extension_loaded() -> bool:
    """True when the csrc/ extension loads: prebuilt by setup.py, or JIT-built on first use
    with a CUDA torch + nvcc + ninja (fastmem/_cuda_build.py; the outcome is cached)."""
    from fastmem._cuda_build import load_cuda_extension

    return load_cuda_extension().module is not None


def _backend_runs(backend: str, device: torch.device) -> bool:
    if backend == "cuda":
        return device.type == "cuda" and cuda_extension_loaded()
    if backend == "triton":
        return triton_installed() and (device.type == "cuda" or triton_interpreting())
    return True


def _unavailable_reason(backend: str, device: torch.device) -> str:
    if backend == "cuda":
        if device.type != "cuda":
            return "the CUDA backend runs on CUDA tensors only"
        from fastmem._cuda_build import load_cuda_extension

        return (f"the fastmem CUDA extension is unavailable: {load_cuda_extension().reason} "
                "(see FASTMEM_CUDA in setup.py)")
    if backend == "triton":
        if not triton_installed():
            return "triton is not installed"
        return "triton needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors"
    return "it is unavailable"


def available_backends(device: torch.device, supported: tuple[str, ...] = ("cuda", "triton", "torch")) -> list[str]:
    """Backends among `supported` that can run on `device`, in the op's order of preference
    (`supported` lists the fastest first). Only a backend an op supports is probed, so an op
    without a CUDA kernel never triggers the extension build."""
    return [b for b in supported if _backend_runs(b, device)]


_announced: set[tuple[str, str, str]] = set()


def resolve_backend(op: str, requested: str, device: torch.device, supported: tuple[str, ...]) -> str:
    """Return the backend `op` runs on, raising a clear error when `requested` cannot run."""
    if requested not in BACKENDS + ("auto",):
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {requested!r}")
    if requested == "auto":
        # On the CPU the Triton interpreter is correct but far slower than torch.
        chosen = available_backends(device, supported)[0] if device.type == "cuda" else "torch"
        key = (op, device.type, chosen)
        if key not in _announced:
            _announced.add(key)
            log.info("fastmem: %s runs on the %r backend (%s device)", op, chosen, device.type)
        return chosen
    if requested not in supported:
        raise ValueError(f"backend={requested!r} is not implemented for {op}; use one of {supported}")
    if not _backend_runs(requested, device):
        raise RuntimeError(f"backend={requested!r} cannot run {op} on {device.type} tensors: "
                           f"{_unavailable_reason(requested, device)}")
    return requested
