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
    """True when the compiled csrc/ extension imports (it is built only with a CUDA torch)."""
    try:
        from fastmem import _cuda_ext  # noqa: F401  (optional, built by setup.py)
    except ImportError:
        return False
    return True


def available_backends(device: torch.device) -> list[str]:
    """Backends that can run on `device`, fastest first."""
    found = []
    if device.type == "cuda" and cuda_extension_loaded():
        found.append("cuda")
    if triton_installed() and (device.type == "cuda" or triton_interpreting()):
        found.append("triton")
    found.append("torch")
    return found


_announced: set[tuple[str, str, str]] = set()


def resolve_backend(op: str, requested: str, device: torch.device, supported: tuple[str, ...]) -> str:
    """Return the backend `op` runs on, raising a clear error when `requested` cannot run."""
    if requested not in BACKENDS + ("auto",):
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {requested!r}")
    usable = [b for b in available_backends(device) if b in supported]
    if requested == "auto":
        # On the CPU the Triton interpreter is correct but far slower than torch.
        auto_order = usable if device.type == "cuda" else ["torch"]
        chosen = auto_order[0]
        key = (op, device.type, chosen)
        if key not in _announced:
            _announced.add(key)
            log.info("fastmem: %s runs on the %r backend (%s device)", op, chosen, device.type)
        return chosen
    if requested not in supported:
        raise ValueError(f"backend={requested!r} is not implemented for {op}; use one of {supported}")
    if requested not in usable:
        why = {
            "cuda": "the fastmem CUDA extension is not built (needs a CUDA build of torch and nvcc;"
            " see FASTMEM_CUDA in setup.py)",
            "triton": "triton needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors"
            if triton_installed()
            else "triton is not installed",
        }.get(requested, "it is unavailable")
        raise RuntimeError(f"backend={requested!r} cannot run {op} on {device.type} tensors: {why}")
    return requested
