"""Out-of-sample checks of a law fit: leave-one-out R² and MAPE, and the plane baseline.

A 4-parameter law fitted to 6 or 7 runs can reach an in-sample R² near 1 whatever the true
shape, so the in-sample figures alone say little. Two checks say more:

- **Leave-one-out (LOO)**: each run is predicted by a refit on the other n − 1 runs, and
  R²_LOO = 1 − Σ(y_i − ŷ_(−i))² / Σ(y_i − ȳ)², MAPE_LOO = mean |y_i − ŷ_(−i)| / |y_i| (ȳ: the
  mean of all n runs). A refit that fails (too few runs left, one rank or one length left, no
  convergence) makes the LOO figures NaN; the failed folds are counted, never skipped.
- **The plane baseline**: ΔL = a + p·ln x + q·ln ℓ, 3 parameters, ordinary least squares in ΔL
  space (x: rank, or rank × layers in effective-parameter mode). It is the law's own limit
  α, β → 0 (C·x^α·ℓ^−β ≈ C + Cα·ln x − Cβ·ln ℓ), so a power law whose LOO figures do not beat
  the plane's has not shown its power-law form on those runs.

Every R² and MAPE here, like LawFit.r2 and LawFit.mape, is computed on ΔL itself (not on
log ΔL), over the runs the law was fitted on.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

PLANE_FORMULA = "ΔL = a + p·ln x + q·ln ℓ"
PLANE_PARAMETERS = 3


def r_squared(y: np.ndarray, predicted: np.ndarray) -> float:
    """1 − Σ(y − ŷ)² / Σ(y − ȳ)²; NaN when y is constant or any prediction is NaN."""
    y, predicted = np.asarray(y, dtype=np.float64), np.asarray(predicted, dtype=np.float64)
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    if ss_tot <= 0 or not np.all(np.isfinite(predicted)):
        return math.nan
    return 1.0 - float(np.sum((y - predicted) ** 2)) / ss_tot


def mape_percent(y: np.ndarray, predicted: np.ndarray) -> float:
    """Mean absolute percentage error, in percent; NaN when any prediction is NaN."""
    y, predicted = np.asarray(y, dtype=np.float64), np.asarray(predicted, dtype=np.float64)
    if not np.all(np.isfinite(predicted)):
        return math.nan
    return float(np.mean(np.abs(y - predicted) / np.abs(y)) * 100.0)


def leave_one_out(n: int, refit_predict: Callable[[np.ndarray, int], float]) -> np.ndarray:
    """`[n]` out-of-sample predictions: entry i is `refit_predict(keep, i)`, a model refitted on
    the runs where the boolean mask `keep` is True (every run but i) and evaluated at run i.
    A fold whose refit raises RuntimeError or ValueError, or predicts a non-finite value, is NaN."""
    predictions = np.full(n, math.nan)
    for i in range(n):
        keep = np.arange(n) != i
        try:
            value = float(refit_predict(keep, i))
        except (RuntimeError, ValueError):
            continue
        if math.isfinite(value):
            predictions[i] = value
    return predictions


def _plane_design(x: np.ndarray, length: np.ndarray) -> np.ndarray:
    return np.column_stack([np.ones_like(x), np.log(x), np.log(length)])


def _plane_coefficients(x: np.ndarray, length: np.ndarray, y: np.ndarray) -> np.ndarray:
    design = _plane_design(x, length)
    # A design of rank < 3 (one rank or one length) has no unique plane: not a valid fit.
    if y.size <= PLANE_PARAMETERS or np.linalg.matrix_rank(design) < PLANE_PARAMETERS:
        raise ValueError("the plane needs more runs than parameters and 2 distinct ranks and lengths")
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    return coef


@dataclass
class PlaneFit:
    """The baseline ΔL = a + p·ln x + q·ln ℓ on the same runs as a law fit.

    Attributes:
        a, p, q: the least-squares coefficients (ΔL space).
        r2, mape: in-sample R² and MAPE (%), on ΔL.
        r2_loo, mape_loo: leave-one-out R² and MAPE (%), on ΔL; NaN when a fold failed.
        loo_failed: folds whose refit failed.
    """

    a: float
    p: float
    q: float
    r2: float
    mape: float
    r2_loo: float
    mape_loo: float
    loo_failed: int = 0
    formula: str = PLANE_FORMULA

    def predict(self, x, length):
        """Predicted ΔL at `x` (rank, or rank × layers) and `length` (arrays broadcast)."""
        value = self.a + self.p * np.log(np.asarray(x, dtype=np.float64)) \
            + self.q * np.log(np.asarray(length, dtype=np.float64))
        return float(value) if np.ndim(value) == 0 else value


def fit_plane(x, length, y) -> PlaneFit:
    """Fit the plane baseline to runs (`x`, `length`, `y` = ΔL, each `[n]`, x and length > 0),
    with its in-sample and leave-one-out R² and MAPE.

    Raises:
        ValueError: fewer than 4 runs, or a single distinct x or length.
    """
    x, length, y = (np.asarray(v, dtype=np.float64) for v in (x, length, y))
    a, p, q = (float(c) for c in _plane_coefficients(x, length, y))
    in_sample = _plane_design(x, length) @ np.array([a, p, q])

    def refit_predict(keep, i):
        coef = _plane_coefficients(x[keep], length[keep], y[keep])
        return coef[0] + coef[1] * math.log(x[i]) + coef[2] * math.log(length[i])

    loo = leave_one_out(y.size, refit_predict)
    return PlaneFit(a=a, p=p, q=q, r2=r_squared(y, in_sample), mape=mape_percent(y, in_sample),
                    r2_loo=r_squared(y, loo), mape_loo=mape_percent(y, loo), loo_failed=int(np.isnan(loo).sum()))
