"""Fit the Parametric Memory Law ΔL(r, ℓ) = C·r^α·ℓ^-β + b to a sweep of runs.

Protocol (the paper "How LoRA Remembers? A Parametric Memory Law for LLM Finetuning"): runs whose final loss is below 0.69 sit past the recall
threshold, where the loss saturates and hides the scaling, so they are left out (and counted).
The fit is nonlinear least squares in linear ΔL space, started from a log-space linear fit
(log(ΔL - b) = log C + α log r - β log ℓ is a plane), with bootstrap 95% intervals, and checked
out of sample (leave-one-out R² and MAPE, beside the 3-parameter plane baseline: validation.py).
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy.optimize import OptimizeWarning, curve_fit

from fastmem.errors import MissingInput, UsageError
from fastmem.files import write_text_atomic
from fastmem.law.validation import PlaneFit, fit_plane, leave_one_out, mape_percent, r_squared

# The paper discards runs "where the final loss fell below 0.69" (≈ ln 2, the recall line).
EXCLUDE_FINAL_LOSS_BELOW = 0.69
PARAMETERS = ("C", "alpha", "beta", "b")
# Fewer bootstrap refits than this give no interval worth printing.
MIN_BOOTSTRAP_FITS = 20
# A leave-one-out refit on 5 runs often has its optimum at the law's plane limit (α, β → 0,
# b → −∞), which trust-region steps approach slowly (~10^5 evaluations on the reproduction's
# 6-run family); its prediction settles long before the parameters do.
LOO_MAX_NFEV = 200_000
# The fit-quality figures of LawFit and PlaneFit (NaN when not computed; null in JSON).
_FIGURES = ("r2", "mape", "r2_loo", "mape_loo")


def _law(xs, log_c, alpha, beta, b):
    # Parameterised by log C: C stays positive and the four parameters have similar scales.
    x, length = xs
    return np.exp(log_c + alpha * np.log(x) - beta * np.log(length)) + b


@dataclass
class LawFit:
    """A fitted law ΔL = C · x^alpha · length^-beta + b.

    `x` is the LoRA rank (`variable == "rank"`) or, when the runs differ in how many layers
    they adapt, the effective parameter count rank × layers (`variable == "effective_params"`).

    Attributes:
        C, alpha, beta, b: the parameters (floats).
        r2: coefficient of determination on the runs used, in ΔL space.
        mape: mean absolute percentage error on the runs used, in percent.
        r2_loo, mape_loo: the same, each run predicted by a refit on the other runs
            (leave-one-out, validation.py); NaN when a refit failed or was not run.
        loo_failed: leave-one-out refits that failed (too few runs left, no convergence).
        plane: the 3-parameter baseline ΔL = a + p·ln x + q·ln ℓ on the same runs, with its
            in-sample and leave-one-out R² and MAPE (validation.PlaneFit); None when not run.
        n_used, n_dropped: runs fitted / left out by the final-loss exclusion rule.
        ci: bootstrap 95% percentile intervals, `{"C": (lo, hi), ...}` for C, alpha, beta, b
            and for "r2" and "mape" (each refit's, on its resample); empty when bootstrap=0
            or too few resamples could be refitted.
        n_bootstrap: resamples successfully refitted.
        layers: the common layer count of the runs in "rank" mode, when it was given.
        ranks, lengths, delta_loss, run_layers: the runs used (for plots and reports).
    """

    C: float
    alpha: float
    beta: float
    b: float
    r2: float
    mape: float
    n_used: int
    n_dropped: int
    variable: str = "rank"
    layers: int | None = None
    ci: dict = field(default_factory=dict)
    n_bootstrap: int = 0
    exclude_final_loss_below: float = EXCLUDE_FINAL_LOSS_BELOW
    ranks: list = field(default_factory=list)
    lengths: list = field(default_factory=list)
    delta_loss: list = field(default_factory=list)
    run_layers: list | None = None
    r2_loo: float = math.nan
    mape_loo: float = math.nan
    loo_failed: int = 0
    plane: PlaneFit | None = None

    # -- the law ---------------------------------------------------------------------------
    def _x(self, rank, layers):
        rank = np.asarray(rank, dtype=np.float64)
        if self.variable == "effective_params":
            if layers is None:
                raise UsageError("layers is required: this law was fitted on effective parameters "
                                 "(rank × adapted layers)")
            return rank * np.asarray(layers, dtype=np.float64)
        if layers is not None and self.layers is not None and np.any(np.asarray(layers) != self.layers):
            raise UsageError(f"layers={layers!r}: this law was fitted on runs that all adapt "
                             f"{self.layers} layer(s); it cannot extrapolate to another count")
        return rank

    def predict(self, rank, length, layers=None):
        """Predicted loss drop ΔL for `rank` (and `layers` in effective-parameter mode) at answer
        `length` tokens. Scalars give a float, arrays (broadcast) a float64 ndarray."""
        x = self._x(rank, layers)
        length = np.asarray(length, dtype=np.float64)
        if np.any(x <= 0) or np.any(length <= 0):
            raise UsageError("rank, layers and length must be > 0")
        value = self.C * x ** self.alpha * length ** -self.beta + self.b
        return float(value) if np.ndim(value) == 0 else value

    def rank_for(self, length: float, delta_loss: float, layers: int | None = None,
                 max_rank: int | None = None) -> int | None:
        """Smallest integer rank r >= 1 whose predicted ΔL at `length` reaches `delta_loss`.

        Returns None when no rank does: the law's ΔL does not grow with rank (C·α <= 0) and
        rank 1 falls short, the target needs an infinite rank (ΔL above the law's reach), or the
        answer exceeds `max_rank`. In effective-parameter mode `layers` (the adapted layer
        count) is required and the rank is the effective parameter count divided by it.
        """
        if not (math.isfinite(length) and length > 0):
            raise UsageError(f"length must be a finite number > 0, got {length!r}")
        if not math.isfinite(delta_loss):
            raise UsageError(f"delta_loss must be finite, got {delta_loss!r}")
        per_rank = float(self._x(1.0, layers))
        if self.predict(1, length, layers) >= delta_loss:
            return 1
        scale = self.C * length ** -self.beta
        if scale <= 0 or self.alpha <= 0:
            return None
        with np.errstate(over="ignore"):
            x_needed = float(np.power((delta_loss - self.b) / scale, 1.0 / self.alpha))
        if not math.isfinite(x_needed) or x_needed / per_rank > 2 ** 62:
            return None
        rank = max(1, math.ceil(x_needed / per_rank * (1 - 1e-12)))
        # ceil of a float quotient can land one off the true answer: settle it on the law itself.
        # (bounded: where the law is flat to rounding, a few ranks either way do not matter)
        for _ in range(64):
            if self.predict(rank, length, layers) >= delta_loss:
                break
            rank += 1
        for _ in range(64):
            if rank == 1 or self.predict(rank - 1, length, layers) < delta_loss:
                break
            rank -= 1
        if max_rank is not None and rank > max_rank:
            return None
        return rank

    def extrapolation(self, rank: float | None, length: float) -> str:
        """Where (`rank`, `length`) lies outside the runs this law was fitted on, in words ("" when
        inside, or when the fit carries no runs): the law was not measured there."""
        outside = []
        for name, value, seen in (("length", length, self.lengths), ("rank", rank, self.ranks)):
            if value is None or not seen:
                continue
            low, high = min(seen), max(seen)
            if not low <= value <= high:
                outside.append(f"{name} {value:g} is {'above' if value > high else 'below'} the fitted "
                               f"{name}s {low:g}–{high:g}")
        return "; ".join(outside)

    # -- serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict:
        out = asdict(self)
        out["ci"] = {k: list(v) for k, v in self.ci.items()}
        # Strict JSON has no NaN: a figure that could not be computed is written as null.
        for figures in (out, out["plane"] or {}):
            for name in _FIGURES:
                if isinstance(figures.get(name), float) and not math.isfinite(figures[name]):
                    figures[name] = None
        out["formula"] = ("ΔL = C · (rank × layers)^alpha · length^-beta + b" if self.variable ==
                          "effective_params" else "ΔL = C · rank^alpha · length^-beta + b")
        return out

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, ensure_ascii=False)
        if path is not None:
            write_text_atomic(path, text + "\n")
        return text

    @classmethod
    def from_dict(cls, data: dict) -> "LawFit":
        names = set(cls.__dataclass_fields__)
        missing = [k for k in ("C", "alpha", "beta", "b") if k not in data]
        if missing:
            raise UsageError(f"not a law fit: missing {missing}")
        kwargs = {k: v for k, v in data.items() if k in names}
        kwargs.setdefault("r2", float("nan"))
        kwargs.setdefault("mape", float("nan"))
        kwargs.setdefault("n_used", 0)
        kwargs.setdefault("n_dropped", 0)
        kwargs["ci"] = {k: tuple(v) for k, v in data.get("ci", {}).items()}
        for name in _FIGURES:
            if name in kwargs and kwargs[name] is None:
                kwargs[name] = math.nan
        if kwargs.get("plane") is not None:
            kwargs["plane"] = PlaneFit(**{k: math.nan if v is None else v for k, v in kwargs["plane"].items()})
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path: str | Path) -> "LawFit":
        path = Path(path)
        if path.is_dir():
            path = path / "fit.json"
        if not path.is_file():
            raise MissingInput(f"no fit file at {path} (write one with `fastmem fit`)")
        try:
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except json.JSONDecodeError as err:
            raise UsageError(f"{path} is not valid JSON: {err}") from None


# -- input checks -------------------------------------------------------------------------
def _as_array(name: str, values, n: int | None) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise UsageError(f"{name} must be a sequence of numbers") from None
    if arr.ndim != 1:
        raise UsageError(f"{name} must be 1-D, got shape {arr.shape}")
    if n is not None and arr.shape[0] != n:
        raise UsageError(f"{name} has {arr.shape[0]} values but ranks has {n}")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise UsageError(f"{name} holds a non-finite value ({arr[bad[0]]}) at run {bad[0]}")
    return arr


def _positive(name: str, arr: np.ndarray, why: str) -> None:
    bad = np.flatnonzero(arr <= 0)
    if bad.size:
        raise UsageError(f"{name} must be > 0 ({why}); run {bad[0]} has {arr[bad[0]]}")


# -- fitting ------------------------------------------------------------------------------
def _log_space_start(x, length, y) -> np.ndarray:
    """Initial (log C, α, β, b): for b on a grid below min(ΔL), a linear least-squares plane
    through log(ΔL - b); keep the b whose plane fits best in ΔL space."""
    design = np.column_stack([np.ones_like(x), np.log(x), -np.log(length)])
    spread = float(y.max() - y.min()) or abs(float(y.min())) or 1.0
    candidates = [0.0] + [float(y.min()) - spread * q for q in (1e-3, 1e-2, 0.03, 0.1, 0.3, 1, 3, 10)]
    best, best_sse = None, math.inf
    for b0 in candidates:
        coef, *_ = np.linalg.lstsq(design, np.log(y - b0), rcond=None)
        params = np.array([coef[0], coef[1], coef[2], b0])
        with np.errstate(over="ignore", invalid="ignore"):
            sse = float(np.sum((_law((x, length), *params) - y) ** 2))
        if math.isfinite(sse) and sse < best_sse:
            best, best_sse = params, sse
    return best


def _curve_fit(x, length, y, start, max_nfev: int = 20000) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OptimizeWarning)
        with np.errstate(over="ignore", invalid="ignore"):
            params, _ = curve_fit(_law, (x, length), y, p0=start, method="trf", x_scale="jac",
                                  max_nfev=max_nfev)
    if not np.all(np.isfinite(params)):
        raise RuntimeError("the fit diverged")
    return params


def _identifiable(x, length) -> bool:
    return np.unique(x).size >= 2 and np.unique(length).size >= 2


def _quality(x, length, y, params) -> tuple[float, float]:
    """R² and MAPE (%) of the law with `params` on the runs (x, length, y), in ΔL space."""
    predicted = _law((x, length), *params)
    return r_squared(y, predicted), mape_percent(y, predicted)


def _leave_one_out(x, length, y) -> np.ndarray:
    """`[n]` predictions of each run by the law refitted, as fit_law fits it, on the others
    (NaN where that refit fails: fewer than 5 runs or one rank or length left, no convergence)."""
    def refit_predict(keep, i):
        if keep.sum() < len(PARAMETERS) + 1 or not _identifiable(x[keep], length[keep]):
            raise ValueError("too few runs left to refit")
        start = _log_space_start(x[keep], length[keep], y[keep])
        params = _curve_fit(x[keep], length[keep], y[keep], start, max_nfev=LOO_MAX_NFEV)
        with np.errstate(over="ignore"):
            return float(_law((x[i:i + 1], length[i:i + 1]), *params)[0])

    return leave_one_out(y.size, refit_predict)


def _bootstrap(x, length, y, start, n_resamples: int, seed: int) -> tuple[dict, int]:
    """Percentile 95% intervals of the parameters and of each refit's R² and MAPE on its resample."""
    rng = np.random.default_rng(seed)
    n = y.size
    draws = []
    for _ in range(n_resamples):
        idx = rng.integers(0, n, n)
        # A resample with one rank or one length cannot pin α or β: not a valid refit.
        if np.unique(idx).size <= len(PARAMETERS) or not _identifiable(x[idx], length[idx]):
            continue
        try:
            p = _curve_fit(x[idx], length[idx], y[idx], start)
        except (RuntimeError, ValueError):
            continue
        draws.append((math.exp(p[0]) if p[0] < 700 else math.inf, p[1], p[2], p[3],
                      *_quality(x[idx], length[idx], y[idx], p)))
    if len(draws) < MIN_BOOTSTRAP_FITS:
        return {}, len(draws)
    table = np.asarray(draws)
    lo, hi = np.nanpercentile(table, [2.5, 97.5], axis=0)
    return {name: (float(lo[i]), float(hi[i])) for i, name in enumerate((*PARAMETERS, "r2", "mape"))}, len(draws)


def fit_law(ranks, lengths, delta_loss, final_loss=None, *, layers=None, bootstrap: int = 1000,
            seed: int = 0, exclude_final_loss_below: float = EXCLUDE_FINAL_LOSS_BELOW,
            validate: bool = True) -> LawFit:
    """Fit ΔL(r, ℓ) = C·r^α·ℓ^-β + b over a sweep of runs.

    Args:
        ranks: `[n]` LoRA ranks (> 0).
        lengths: `[n]` answer lengths in tokens (> 0).
        delta_loss: `[n]` loss drops ΔL = base-model loss on the answer − final training
            loss. Must be > 0: a run whose loss did not fall failed, and the log-space start
            takes log ΔL.
        final_loss: optional `[n]` final training losses; runs below
            `exclude_final_loss_below` (the paper's 0.69) are dropped and counted in n_dropped.
        layers: optional `[n]` adapted layer counts. When they differ between runs the law is
            fitted on effective parameters rank × layers; when all equal, on rank.
        bootstrap: resamples for the 95% intervals (0: none).
        seed: seed of the bootstrap resampling.
        validate: also refit leaving each run out (r2_loo, mape_loo) and fit the plane baseline
            (plane); False leaves them NaN / None (n more refits of the law saved).

    Raises:
        ValueError: mismatched lengths, NaN/inf, non-positive values, fewer than 5 runs left
            (4 parameters + 1) or a single distinct rank or length after the exclusion.
    """
    rank_arr = _as_array("ranks", ranks, None)
    n = rank_arr.shape[0]
    length_arr = _as_array("lengths", lengths, n)
    y = _as_array("delta_loss", delta_loss, n)
    _positive("ranks", rank_arr, "a LoRA rank")
    _positive("lengths", length_arr, "an answer length in tokens")
    _positive("delta_loss", y, "the log-space initialisation takes log ΔL; a run whose loss did not fall failed")
    layer_arr = None if layers is None else _as_array("layers", layers, n)
    if layer_arr is not None:
        _positive("layers", layer_arr, "an adapted layer count")
    if bootstrap < 0:
        raise UsageError(f"bootstrap must be >= 0, got {bootstrap}")

    keep = np.ones(n, dtype=bool)
    if final_loss is not None:
        keep = _as_array("final_loss", final_loss, n) >= exclude_final_loss_below
    n_used = int(keep.sum())
    rank_arr, length_arr, y = rank_arr[keep], length_arr[keep], y[keep]
    layer_arr = None if layer_arr is None else layer_arr[keep]
    if n_used < len(PARAMETERS) + 1:
        raise UsageError(f"need at least {len(PARAMETERS) + 1} runs to fit {len(PARAMETERS)} parameters, "
                         f"got {n_used} ({n - n_used} dropped: final loss < {exclude_final_loss_below})")

    variable, common_layers, x = "rank", None, rank_arr
    if layer_arr is not None:
        if np.unique(layer_arr).size > 1:
            variable, x = "effective_params", rank_arr * layer_arr
        else:
            common_layers = int(layer_arr[0])
    if float(np.ptp(y)) == 0.0:
        raise UsageError(f"delta_loss is {y[0]} for every run used: no variation to fit")
    if not _identifiable(x, length_arr):
        raise UsageError(f"need at least 2 distinct {'ranks' if np.unique(x).size < 2 else 'lengths'} "
                         "among the runs used to fit both exponents")

    start = _log_space_start(x, length_arr, y)
    try:
        params = _curve_fit(x, length_arr, y, start)
    except (RuntimeError, ValueError) as err:
        raise UsageError(f"the law could not be fitted to these runs: {err}") from None
    log_c, alpha, beta, b = (float(p) for p in params)
    if log_c > 700:
        raise UsageError(f"the law could not be fitted to these runs: C = exp({log_c:.4g}) overflows")
    r2, mape = _quality(x, length_arr, y, params)
    ci, n_boot = _bootstrap(x, length_arr, y, params, bootstrap, seed) if bootstrap else ({}, 0)
    loo, plane = np.full(n_used, math.nan), None
    if validate:
        loo = _leave_one_out(x, length_arr, y)
        plane = fit_plane(x, length_arr, y)
    return LawFit(C=math.exp(log_c), alpha=alpha, beta=beta, b=b, r2=r2, mape=mape, n_used=n_used,
                  n_dropped=n - n_used, variable=variable, layers=common_layers, ci=ci,
                  n_bootstrap=n_boot, exclude_final_loss_below=exclude_final_loss_below,
                  ranks=rank_arr.tolist(), lengths=length_arr.tolist(), delta_loss=y.tolist(),
                  run_layers=None if layer_arr is None else layer_arr.tolist(),
                  r2_loo=r_squared(y, loo), mape_loo=mape_percent(y, loo),
                  loo_failed=int(np.isnan(loo).sum()) if validate else 0, plane=plane)
