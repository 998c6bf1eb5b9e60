"""Backend dispatch: one registry of every op's backends, and one function that picks
"cuda" | "triton" | "torch" per call.

`auto` takes the fastest backend available for the tensors' device (cuda > triton > torch
on a GPU; torch on the CPU, where Triton only runs through its slow interpreter) and says
which once in the log.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping

import torch

log = logging.getLogger("fastmem")

BACKENDS = ("torch", "triton", "cuda")


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def cuda_extension_loaded() -> bool:
    """True when the csrc/ extension is usable without compiling anything: prebuilt by setup.py,
    or a cached JIT build of the current sources (fastmem/_cuda_build.py). What `auto` asks: it
    never starts a minutes-long nvcc build inside a training step (the log says how to build)."""
    from fastmem._cuda_build import cuda_extension_ready

    return cuda_extension_ready()


# Probing imports modules and reads caches: under torch.compile it runs once while tracing and
# its answer is a constant of the graph, instead of Python the compiler cannot trace.
@torch.compiler.assume_constant_result
def _backend_runs(backend: str, device: torch.device) -> bool:
    """Whether `backend` runs on `device` as things are (what `auto` asks: nothing is built)."""
    if backend == "cuda":
        return device.type == "cuda" and cuda_extension_loaded()
    if backend == "triton":
        return triton_installed() and (device.type == "cuda" or triton_interpreting())
    return True


@torch.compiler.assume_constant_result
def _backend_runs_when_asked(backend: str, device: torch.device) -> bool:
    """As _backend_runs, for a backend asked for by name: backend="cuda" JIT-builds the extension
    on first use when needed (minutes, once; cached)."""
    if backend == "cuda" and device.type == "cuda":
        from fastmem import _cuda_build

        return _cuda_build.load_cuda_extension().module is not None
    return _backend_runs(backend, device)


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
        if key not in _announced and not torch.compiler.is_compiling():  # logging breaks a compiled graph
            _announced.add(key)
            log.info("fastmem: %s runs on the %r backend (%s device)", op, chosen, device.type)
        return chosen
    if requested not in supported:
        raise ValueError(f"backend={requested!r} is not implemented for {op}; use one of {supported}")
    if not _backend_runs_when_asked(requested, device):
        raise RuntimeError(f"backend={requested!r} cannot run {op} on {device.type} tensors: "
                           f"{_unavailable_reason(requested, device)}")
    return requested


# ---- the backend registry: op name -> {backend -> implementation}, in preference order ----
#
# Each op registers its implementations once, when its module is imported (fastmem.ops.*):
#     register_op("linear_cross_entropy", {"cuda": "fastmem.ops.cross_entropy.backend_cuda",
#                                          "triton": "fastmem.ops.cross_entropy.backend_triton",
#                                          "torch": "fastmem.ops.cross_entropy.backend_torch"})
# The dict order is the preference order `auto` follows on a GPU (fastest first). An
# implementation is a module path (imported on first use, so an op never imports a backend it
# does not run) or any object; the op decides what it expects of it (a `process_chunk`
# function, a `forward` / `backward` pair). Dispatch is then one call:
#     backend = choose_backend("linear_cross_entropy", requested, device, exclude=(...))
#     impl = implementation("linear_cross_entropy", backend)


@dataclass(frozen=True)
class OpBackends:
    """The implementations of one op, fastest first."""

    op: str
    implementations: dict[str, Any]

    @property
    def preference(self) -> tuple[str, ...]:
        return tuple(self.implementations)


_REGISTRY: dict[str, OpBackends] = {}
_LOADED: dict[tuple[str, str], Any] = {}


def register_op(op: str, implementations: Mapping[str, Any]) -> OpBackends:
    """Register (or re-register) `op` with `{backend: module path or object}`, fastest first."""
    unknown = [b for b in implementations if b not in BACKENDS]
    if unknown or not implementations:
        raise ValueError(f"register_op({op!r}): backends must be a non-empty subset of {BACKENDS}, got "
                         f"{list(implementations)}")
    entry = OpBackends(op, dict(implementations))
    _REGISTRY[op] = entry
    for key in [k for k in _LOADED if k[0] == op]:
        del _LOADED[key]
    return entry


def op_backends(op: str) -> tuple[str, ...]:
    """The backends `op` implements, in its preference order."""
    return _entry(op).preference


def _entry(op: str) -> OpBackends:
    try:
        return _REGISTRY[op]
    except KeyError:
        raise KeyError(f"no op {op!r} is registered; registered: {sorted(_REGISTRY)}") from None


def implementation(op: str, backend: str) -> Any:
    """The implementation of `op` on `backend` (a module path is imported once, then cached)."""
    entry = _entry(op)
    if backend not in entry.implementations:
        raise ValueError(f"backend={backend!r} is not implemented for {op}; use one of {entry.preference}")
    key = (op, backend)
    if key not in _LOADED:
        target = entry.implementations[backend]
        _LOADED[key] = importlib.import_module(target) if isinstance(target, str) else target
    return _LOADED[key]


@contextlib.contextmanager
def override_implementation(op: str, backend: str, replacement: Any) -> Iterator[None]:
    """Run `op`'s `backend` on `replacement` inside the block (tests: e.g. the CUDA chunk glue
    over a host build of the kernels)."""
    entry = _entry(op)
    saved = dict(entry.implementations)
    register_op(op, {**saved, backend: replacement})
    try:
        yield
    finally:
        register_op(op, saved)


def choose_backend(op: str, requested: str, device: torch.device, *, exclude: Iterable[str] = ()) -> str:
    """The backend `op` runs on for `requested` ("auto" or a name) on `device`.

    `exclude`: backends the op cannot use for this call (a dtype or size limit); `auto` skips
    them, and the op raises its own clear error when one is asked for by name.
    """
    excluded = set(exclude)
    supported = tuple(b for b in op_backends(op) if b not in excluded or b == requested)
    return resolve_backend(op, requested, device, supported)
