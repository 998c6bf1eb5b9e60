"""Evaluator figures: the per-token probability grid (the paper's view) and training curves.

Object-oriented matplotlib on an Agg canvas: headless, and no global pyplot state touched.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from fastmem.constants import L_CRIT, P_RECALL

# matplotlib refuses images past 2^16 pixels a side: cap the figure height (inches at DPI).
DPI = 100
MAX_HEIGHT_IN = 600


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path


def plot_probability_grid(prob, path: str | Path, *, width: int = 50, first_error: int = -1,
                          title: str = "") -> Path:
    """Answer tokens laid out in rows of `width`, each cell coloured by its teacher-forced p
    (red 0 … green 1); cells with p ≤ 0.5 are marked with a black dot, the first error i*
    is outlined in blue.

    prob: `[L]` probabilities (tensor or array). Returns the PNG path.
    """
    p = prob.detach().float().cpu().numpy() if isinstance(prob, torch.Tensor) else np.asarray(prob, float)
    if p.ndim != 1 or p.size == 0:
        raise ValueError(f"prob must be a non-empty 1-D sequence, got shape {p.shape}")
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    width = min(width, p.size)
    rows = math.ceil(p.size / width)
    cells = np.full(rows * width, np.nan)
    cells[:p.size] = p
    cell_in = min(0.22, MAX_HEIGHT_IN / rows)
    fig = Figure(figsize=(max(4.0, width * 0.22 + 1.5), rows * cell_in + 1.2))
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(cells.reshape(rows, width), cmap="RdYlGn", vmin=0.0, vmax=1.0,
                      aspect="auto", interpolation="nearest")
    stubborn = np.flatnonzero(p <= P_RECALL)
    if stubborn.size:
        ax.scatter(stubborn % width, stubborn // width, s=max(2.0, 30 * cell_in / 0.22), c="black",
                   marker="o", label=f"p ≤ 0.5 ({stubborn.size})")
        ax.legend(loc="upper right", bbox_to_anchor=(1.0, -0.02), fontsize=8, frameon=False)
    if 0 <= first_error < p.size:
        ax.add_patch(Rectangle((first_error % width - 0.5, first_error // width - 0.5), 1, 1,
                               fill=False, edgecolor="blue", linewidth=2))
    ax.set_xlabel("position in row")
    ax.set_ylabel(f"row (× {width} tokens)")
    ax.set_title(title or f"{p.size} answer tokens, {stubborn.size} with p ≤ 0.5", fontsize=9)
    fig.colorbar(image, ax=ax, label="p(target)", fraction=0.04)
    return _save(fig, path)


def read_metrics(path: str | Path) -> list[dict]:
    """The trainer's metrics JSONL: one JSON object per step (blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"metrics file {path} does not exist")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{number}: expected a JSON object per line")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path} holds no metrics")
    return rows


def _guide(key: str) -> float | None:
    """The recall line worth drawing on a curve: ln 2 on losses, 0.5 on minimum probabilities."""
    if "loss" in key:
        return L_CRIT
    if key in ("min_p", "min_prob"):
        return P_RECALL
    return None


def plot_training_curves(metrics_path: str | Path, path: str | Path) -> Path:
    """One panel per numeric metric of the trainer's JSONL (mean_loss, token_acc, min_p,
    stubborn_tokens, ...) against `step` (or the line index); ln 2 on losses and 0.5 on min_p
    for reference. Non-numeric values (lists, strings) are skipped."""
    rows = read_metrics(metrics_path)
    steps = [row.get("step", i) for i, row in enumerate(rows)]
    keys = []
    for row in rows:
        for key, value in row.items():
            if key != "step" and key not in keys and isinstance(value, (int, float)) and not isinstance(value, bool):
                keys.append(key)
    if not keys:
        raise ValueError(f"{metrics_path} has no numeric metric besides 'step'")
    cols = min(3, len(keys))
    grid_rows = math.ceil(len(keys) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.0 * grid_rows))
    axes = np.atleast_1d(fig.subplots(grid_rows, cols, squeeze=False)).ravel()
    for ax, key in zip(axes, keys):
        pairs = [(s, r[key]) for s, r in zip(steps, rows)
                 if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        xs, ys = zip(*pairs) if pairs else ((), ())
        ax.plot(xs, ys, lw=1.3)
        if _guide(key) is not None:
            ax.axhline(_guide(key), color="grey", ls="--", lw=1)
        if "loss" in key and ys and min(ys) > 0:
            ax.set_yscale("log")
        ax.set(title=key, xlabel="step")
    for ax in axes[len(keys):]:
        ax.set_visible(False)
    fig.tight_layout()
    return _save(fig, path)
