"""Plots of a law fit: predicted-vs-observed with residuals, and the 3-D / log-space views.

Drawn on matplotlib's object API with an Agg canvas (no pyplot, no global backend switch),
so they work headless and do not disturb a caller's own matplotlib state.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from fastmem.errors import UsageError
from fastmem.law.fit import LawFit
from fastmem.plotting import save_figure


def _runs(fit: LawFit):
    if not fit.ranks:
        raise UsageError("this fit carries no runs to plot (it was loaded without them)")
    rank = np.asarray(fit.ranks, dtype=np.float64)
    x = rank if fit.run_layers is None or fit.variable == "rank" else rank * np.asarray(fit.run_layers)
    return x, np.asarray(fit.lengths, dtype=np.float64), np.asarray(fit.delta_loss, dtype=np.float64)


def _x_label(fit: LawFit) -> str:
    return "rank × layers" if fit.variable == "effective_params" else "rank"


def _law_at(fit: LawFit, x, length):
    return fit.C * x ** fit.alpha * length ** -fit.beta + fit.b


def plot_residuals(fit: LawFit, path: str | Path) -> Path:
    """Predicted vs observed ΔL (with y = x) and residuals vs predicted, one PNG."""
    x, length, observed = _runs(fit)
    predicted = _law_at(fit, x, length)
    fig = Figure(figsize=(11, 4.4), layout="constrained")
    ax_fit, ax_res = fig.subplots(1, 2)
    points = ax_fit.scatter(observed, predicted, c=np.log2(length), cmap="viridis", s=22)
    lo, hi = float(min(observed.min(), predicted.min())), float(max(observed.max(), predicted.max()))
    ax_fit.plot([lo, hi], [lo, hi], color="grey", lw=1, ls="--")
    ax_fit.set(xlabel="observed ΔL", ylabel="predicted ΔL",
               title=f"R² = {fit.r2:.4f}, MAPE = {fit.mape:.2f}%  (n = {fit.n_used})")
    fig.colorbar(points, ax=ax_fit, label="log2 length")
    by_rank = ax_res.scatter(predicted, observed - predicted, c=np.log2(x), cmap="plasma", s=22)
    ax_res.axhline(0.0, color="grey", lw=1, ls="--")
    ax_res.set(xlabel="predicted ΔL", ylabel="observed − predicted", title="residuals")
    fig.colorbar(by_rank, ax=ax_res, label=f"log2 {_x_label(fit)}")
    fig.suptitle(f"ΔL = {fit.C:.4g}·{_x_label(fit)}^{fit.alpha:.3f}·ℓ^-{fit.beta:.3f} + {fit.b:.4g}")
    return save_figure(fig, path)


def plot_surface(fit: LawFit, path: str | Path) -> Path:
    """Left: ΔL over (log2 x, log2 ℓ), the fitted surface and the runs. Right: the log-space
    plane log(ΔL − b) = log C + α log x − β log ℓ (the paper's Fig. 2a view); runs with
    ΔL <= b have no log and are left out of that panel."""
    x, length, observed = _runs(fit)
    grid_x, grid_len = np.meshgrid(np.geomspace(x.min(), x.max(), 30),
                                   np.geomspace(length.min(), length.max(), 30))
    fig = Figure(figsize=(12, 5.2), layout="constrained")
    ax_lin = fig.add_subplot(1, 2, 1, projection="3d")
    ax_lin.plot_surface(np.log2(grid_x), np.log2(grid_len), _law_at(fit, grid_x, grid_len),
                        cmap="viridis", alpha=0.6, linewidth=0)
    ax_lin.scatter(np.log2(x), np.log2(length), observed, color="crimson", s=14, depthshade=False)
    ax_lin.set(xlabel=f"log2 {_x_label(fit)}", ylabel="log2 length", zlabel="ΔL",
               title="ΔL: fitted surface and runs")
    ax_lin.view_init(elev=22, azim=-130)  # ΔL peaks at high rank and short length: face it

    ax_log = fig.add_subplot(1, 2, 2, projection="3d")
    plane = np.log(fit.C) + fit.alpha * np.log(grid_x) - fit.beta * np.log(grid_len)
    ax_log.plot_surface(np.log(grid_x), np.log(grid_len), plane, cmap="cividis", alpha=0.45, linewidth=0)
    above = observed > fit.b
    ax_log.scatter(np.log(x[above]), np.log(length[above]), np.log(observed[above] - fit.b),
                   color="crimson", s=14, depthshade=False)
    omitted = int((~above).sum())
    ax_log.set(xlabel=f"ln {_x_label(fit)}", ylabel="ln length", zlabel="ln(ΔL − b)",
               title="log-space plane" + (f" ({omitted} runs with ΔL ≤ b omitted)" if omitted else ""))
    ax_log.view_init(elev=22, azim=-130)
    return save_figure(fig, path)
