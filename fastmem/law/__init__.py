"""The Parametric Memory Law: fit ΔL(r, ℓ) = C·r^α·ℓ^-β + b to a sweep and plan ranks with it."""

import importlib

# Resolved on first use: `fastmem --help` imports fastmem.law.cli, which must not pay for scipy.
_EXPORTS = {"fit_law": "fastmem.law.fit", "LawFit": "fastmem.law.fit",
            "EXCLUDE_FINAL_LOSS_BELOW": "fastmem.law.fit",
            "load_runs": "fastmem.law.runs", "Runs": "fastmem.law.runs"}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'fastmem.law' has no attribute {name!r}")
