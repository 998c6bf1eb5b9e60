"""Evaluate memorization: teacher-forced p / rank / correctness, greedy exact match, i*,
stubborn tokens, probability grids and training curves."""

import importlib

# Resolved on first use: `fastmem --help` imports fastmem.eval.cli, which must stay light.
_EXPORTS = {"evaluate": "fastmem.eval.evaluator", "EvalReport": "fastmem.eval.evaluator",
            "RecordResult": "fastmem.eval.evaluator",
            "teacher_forced_scores": "fastmem.eval.teacher_forcing",
            "TokenScores": "fastmem.eval.teacher_forcing", "target_ranks": "fastmem.eval.teacher_forcing",
            "greedy_check": "fastmem.eval.greedy", "GreedyResult": "fastmem.eval.greedy",
            "plot_probability_grid": "fastmem.eval.plots", "plot_training_curves": "fastmem.eval.plots"}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'fastmem.eval' has no attribute {name!r}")
