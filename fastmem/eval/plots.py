"""Evaluator figures: the per-token probability grid (the paper's view) and training curves.

Object-oriented matplotlib on an Agg canvas: headless, and no global pyplot state touched.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from fastmem.constants import L_CRIT, P_RECALL
from fastmem.errors import MissingInput, UsageError
from fastmem.files import parse_json_object
from fastmem.plotting import save_figure

# matplotlib refuses images past 2^16 pixels a side: cap the figure height (inches at DPI).
DPI = 100
MAX_HEIGHT_IN = 600


# token text in the grid: a monospace font, so a token's box is as wide as its text
TEXT_FONT = 7  # points
CHAR_IN = 0.6 * TEXT_FONT / 72  # DejaVu Sans Mono advance: 0.6 em
ROW_IN = 0.26
MAX_LINE_CHARS = 120  # wrap a row here even before `width` tokens (the paper's figures: text lines)
MAX_TEXT_TOKENS = 20000  # beyond this, colours only (text would be unreadable and slow)


def _shown(text: str) -> str:
    """A token's text as drawn: whitespace made visible, never empty, and every character the
    grid's font cannot draw (CJK, emoji with the DejaVu fonts matplotlib ships) written as
    U+XXXX instead of an empty box."""
    text = text.replace("\n", "↵").replace("\t", "→").replace("\r", "")
    text = text if text.strip() else (text.replace(" ", "␣") or "·")
    drawable = _font_codepoints()
    return "".join(c if ord(c) in drawable or c == " " else f"U+{ord(c):04X}" for c in text)


@functools.lru_cache(maxsize=1)
def _font_codepoints() -> frozenset[int]:
    """The characters the grid's monospace font has glyphs for."""
    from matplotlib import font_manager, ft2font

    path = font_manager.findfont(font_manager.FontProperties(family="monospace"))
    return frozenset(ft2font.FT2Font(path).get_charmap())


@functools.lru_cache(maxsize=1)
def _byte_of_char() -> dict[str, int]:
    """Byte-level BPE vocabularies (GPT-2 style) spell byte b as one printable character: the
    printable Latin-1 bytes as themselves, the other bytes as chr(256 + n) in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + n): b for n, b in enumerate(others)}}


def token_label(tokenizer, token_id: int) -> str:
    """One token's text for the grid. A token holding part of a multi-byte character (CJK and
    emoji are split over tokens) decodes alone to "\ufffd"; it is shown as its bytes (\\xe6)."""
    text = tokenizer.decode([token_id])
    if "\ufffd" not in text:
        return text
    piece = tokenizer.convert_ids_to_tokens(int(token_id)) or ""
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):  # SentencePiece byte fallback
        return f"\\x{piece[3:5].lower()}"
    byte_of = _byte_of_char()
    if piece and all(c in byte_of for c in piece):
        return bytes(byte_of[c] for c in piece).decode("utf-8", errors="backslashreplace")
    return text


def _layout(texts: list[str], width: int) -> list[list[int]]:
    """Token indices per row: at most `width` tokens and MAX_LINE_CHARS characters a row."""
    rows, row, chars = [], [], 0
    for index, text in enumerate(texts):
        if row and (len(row) >= width or chars + len(text) > MAX_LINE_CHARS):
            rows.append(row)
            row, chars = [], 0
        row.append(index)
        chars += len(text)
    if row:
        rows.append(row)
    return rows


def _text_grid(p: np.ndarray, texts: list[str], width: int, first_error: int, title: str):
    """Tokens as text in boxes coloured by p, wrapped into rows like the paper's figures."""
    shown = [_shown(t)[:24] for t in texts]
    rows = _layout(shown, width)
    pad = 0.6  # characters of margin per box, so neighbouring texts never touch
    line_chars = max(sum(len(shown[i]) + pad for i in row) for row in rows)
    row_in = min(ROW_IN, MAX_HEIGHT_IN / len(rows))
    fig = Figure(figsize=(max(5.0, line_chars * CHAR_IN + 1.6), len(rows) * row_in + 1.3))
    ax = fig.add_subplot(1, 1, 1)
    cmap = colormaps["RdYlGn"]
    font = max(3.0, TEXT_FONT * row_in / ROW_IN)
    for y, row in enumerate(rows):
        x = 0
        for i in row:
            n = len(shown[i]) + pad
            stubborn = p[i] <= P_RECALL
            edge = "blue" if i == first_error else ("black" if stubborn else "white")
            colour = 0.3 + 0.7 * np.asarray(cmap(float(p[i])))  # lightened: black text stays readable
            ax.add_patch(Rectangle((x, y - 0.45), n, 0.9, facecolor=np.clip(colour, 0, 1), edgecolor=edge,
                                   linewidth=1.6 if i == first_error else (0.8 if stubborn else 0.3)))
            ax.text(x + n / 2, y, shown[i], ha="center", va="center", family="monospace", fontsize=font,
                    fontweight="bold" if stubborn else "normal")
            x += n
    ax.set_xlim(0, line_chars)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xticks([])
    step = max(1, len(rows) // 20)
    ax.set_yticks(range(0, len(rows), step), [str(rows[y][0]) for y in range(0, len(rows), step)], fontsize=7)
    ax.set_ylabel("first token of the row")
    for side in ("top", "right", "bottom"):
        ax.spines[side].set_visible(False)
    stubborn_count = int((p <= P_RECALL).sum())
    ax.set_title(title or f"{p.size} answer tokens, {stubborn_count} with p ≤ 0.5", fontsize=9)
    mappable = ScalarMappable(cmap=cmap)
    mappable.set_clim(0.0, 1.0)
    fig.colorbar(mappable, ax=ax, label="p(target)", fraction=0.03, pad=0.01)
    note = "bold, black box: p ≤ 0.5 (stubborn)" + ("; blue box: first error i*" if 0 <= first_error < p.size else "")
    ax.set_xlabel(note, fontsize=7)
    return fig


def plot_probability_grid(prob, path: str | Path, *, width: int = 50, first_error: int = -1,
                          title: str = "", tokens: list[str] | None = None) -> Path:
    """The per-token view of the paper's figures.

    With `tokens` (each answer token's text): the answer as text, wrapped into rows of at most
    `width` tokens (and ~120 characters), each token in a box coloured by its teacher-forced p
    (red 0 … green 1); stubborn tokens (p ≤ 0.5) bold in a black box, the first error i* in a
    blue box. Without `tokens`: rows of `width` coloured cells, stubborn cells dotted.

    prob: `[L]` probabilities (tensor or array). Returns the PNG path.
    """
    p = prob.detach().float().cpu().numpy() if isinstance(prob, torch.Tensor) else np.asarray(prob, float)
    if p.ndim != 1 or p.size == 0:
        raise ValueError(f"prob must be a non-empty 1-D sequence, got shape {p.shape}")
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    if tokens is not None and len(tokens) != p.size:
        raise ValueError(f"tokens has {len(tokens)} entries for {p.size} probabilities")
    if tokens is not None and p.size <= MAX_TEXT_TOKENS:
        return save_figure(_text_grid(p, list(tokens), width, first_error, title), path, dpi=DPI)
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
    step = max(1, rows // 20)
    ax.set_yticks(range(0, rows, step), [str(r * width) for r in range(0, rows, step)])
    ax.set_xlabel("position in row")
    ax.set_ylabel("first token of the row")
    ax.set_title(title or f"{p.size} answer tokens, {stubborn.size} with p ≤ 0.5", fontsize=9)
    fig.colorbar(image, ax=ax, label="p(target)", fraction=0.04)
    return save_figure(fig, path, dpi=DPI)


def read_metrics(path: str | Path) -> list[dict]:
    """The trainer's metrics JSONL: one JSON object per step (blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise MissingInput(f"metrics file {path} does not exist")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        rows.append(parse_json_object(line, f"{path}:{number}"))
    if not rows:
        raise UsageError(f"{path} holds no metrics")
    return rows


def _guide(key: str) -> float | None:
    """The recall line worth drawing on a curve: ln 2 on losses, 0.5 on minimum probabilities."""
    if "loss" in key:
        return L_CRIT
    if key in ("min_p", "min_prob"):
        return P_RECALL
    return None


# The curves a person reads a memorization run by (metrics.jsonl key, panel title).
CURVES = (("mean_loss", "answer loss (mean over tokens)"), ("min_p", "min p(target)"),
          ("stubborn_tokens", "stubborn tokens (p ≤ 0.5)"), ("token_acc", "token accuracy (teacher-forced)"))
SKIP_KEYS = {"step", "epoch", "lr", "update", "step_s", "tokens_per_s"}


def run_level(rows: list[dict]) -> list[dict]:
    """Per step, the whole run's figures: each batch's latest row stands for its samples (a
    step trains one batch, so raw rows alternate between samples and zig-zag)."""
    latest: dict[tuple, dict] = {}
    out = []
    for row in rows:
        latest[tuple(row.get("samples") or [id(row)])] = row
        batches = [r for r in latest.values() if isinstance(r.get("answer_tokens"), (int, float))]
        if not batches:
            out.append(row)
            continue
        tokens = sum(r["answer_tokens"] for r in batches) or 1
        merged = dict(row)
        for key in ("mean_loss", "token_acc"):
            if all(isinstance(r.get(key), (int, float)) for r in batches):
                merged[key] = sum(r[key] * r["answer_tokens"] for r in batches) / tokens
        if all(isinstance(r.get("min_p"), (int, float)) for r in batches):
            merged["min_p"] = min(r["min_p"] for r in batches)
        if all(isinstance(r.get("stubborn_tokens"), (int, float)) for r in batches):
            merged["stubborn_tokens"] = sum(r["stubborn_tokens"] for r in batches)
        out.append(merged)
    return out


def smooth(values: list[float], span: int) -> np.ndarray:
    """Exponential moving average over `span` points (span 1: unchanged)."""
    alpha = 2.0 / (span + 1)
    out, level = np.empty(len(values)), values[0] if values else 0.0
    for i, value in enumerate(values):
        level = value if i == 0 else alpha * value + (1 - alpha) * level
        out[i] = level
    return out


def plot_training_curves(metrics_path: str | Path, path: str | Path) -> Path:
    """The few curves that tell how memorization went: answer loss (ln 2 marked, log scale),
    min p (0.5 marked), stubborn-token count and token accuracy, over steps — the run's
    figures (every sample's latest state, not the batch of the step), raw in light and
    smoothed in bold. A metrics file without these keys gets one panel per numeric key."""
    rows = read_metrics(metrics_path)
    merged = run_level(rows)
    steps = [row.get("step", i) for i, row in enumerate(rows)]
    keys = [(key, title) for key, title in CURVES if any(isinstance(r.get(key), (int, float)) for r in rows)]
    if not keys:
        names = []
        for row in rows:
            for key, value in row.items():
                if (key not in SKIP_KEYS and key not in names and isinstance(value, (int, float))
                        and not isinstance(value, bool)):
                    names.append(key)
        keys = [(key, key) for key in names[:6]]
    if not keys:
        raise UsageError(f"{metrics_path} has no numeric metric besides 'step'")
    cols = min(2, len(keys))
    grid_rows = math.ceil(len(keys) / cols)
    fig = Figure(figsize=(5.0 * cols, 3.2 * grid_rows))
    axes = np.atleast_1d(fig.subplots(grid_rows, cols, squeeze=False)).ravel()
    span = max(1, len(rows) // 30)
    for ax, (key, title) in zip(axes, keys):
        pairs = [(s, r[key]) for s, r in zip(steps, merged)
                 if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        xs, ys = (list(v) for v in zip(*pairs)) if pairs else ([], [])
        if span > 1:
            ax.plot(xs, ys, lw=0.8, alpha=0.3, color="tab:blue")
        if ys:
            ax.plot(xs, smooth(ys, span), lw=1.8, color="tab:blue",
                    label=f"EMA over {span} steps" if span > 1 else None)
        if _guide(key) is not None:
            ax.axhline(_guide(key), color="grey", ls="--", lw=1,
                       label="ln 2 (recall line)" if "loss" in key else "p = 0.5 (recall line)")
        if "loss" in key and ys and min(ys) > 0:
            ax.set_yscale("log")
        ax.set(title=title, xlabel="step")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, frameon=False)
    for ax in axes[len(keys):]:
        ax.set_visible(False)
    fig.tight_layout()
    return save_figure(fig, path, dpi=DPI)
