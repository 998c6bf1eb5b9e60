"""Resumable sweeps of memorization runs into a shared SQLite results database."""

from fastmem.sweep.spec import Cell, SweepSpec
from fastmem.sweep.store import ResultsStore

__all__ = ["Cell", "SweepSpec", "ResultsStore", "run_worker"]


def __getattr__(name):
    if name == "run_worker":  # imports the trainer: only when asked
        from fastmem.sweep.worker import run_worker
        return run_worker
    raise AttributeError(name)
