"""The figures people read: the probability grid with token text, and the run-level curves."""

from __future__ import annotations

import json

import numpy as np
import pytest
from matplotlib.image import imread

from fastmem.eval.plots import _layout, plot_probability_grid, plot_training_curves, run_level, smooth


def test_text_grid_wraps_rows_and_marks_stubborn_tokens(tmp_path):
    tokens = [" the", " quick", "\n", " brown", " fox"] * 40
    prob = np.linspace(0.01, 1.0, len(tokens))
    path = plot_probability_grid(prob, tmp_path / "g.png", tokens=tokens, width=50, first_error=3)
    image = imread(path)
    assert image.shape[0] > 100 and image.shape[1] > 300  # several wrapped rows of text
    rows = _layout([t for t in tokens], 50)
    assert all(len(r) <= 50 for r in rows) and sum(len(r) for r in rows) == len(tokens)
    with pytest.raises(ValueError, match="tokens has 3 entries"):
        plot_probability_grid([0.5, 0.6], tmp_path / "x.png", tokens=["a", "b", "c"])


def test_run_level_figures_cover_every_sample_not_the_last_batch(tmp_path):
    rows = [{"step": 1, "samples": [0], "answer_tokens": 10, "mean_loss": 2.0, "token_acc": 0.4,
             "min_p": 0.1, "stubborn_tokens": 6},
            {"step": 2, "samples": [1], "answer_tokens": 30, "mean_loss": 0.1, "token_acc": 1.0,
             "min_p": 0.9, "stubborn_tokens": 0}]
    merged = run_level(rows)
    assert merged[1]["token_acc"] == pytest.approx((0.4 * 10 + 30) / 40)
    assert merged[1]["min_p"] == 0.1 and merged[1]["stubborn_tokens"] == 6
    assert list(smooth([1.0, 1.0, 4.0], 1)) == [1.0, 1.0, 4.0]
    metrics = tmp_path / "m.jsonl"
    metrics.write_text("".join(json.dumps(dict(r, epoch=0, lr=0.01)) + "\n" for r in rows))
    assert plot_training_curves(metrics, tmp_path / "c.png").is_file()


def test_non_ascii_tokens_are_drawn_not_boxes_or_replacement_marks(smollm2_tokenizer, tmp_path):
    """CJK and emoji split over byte-level tokens: a part of a character is shown as its bytes,
    a character the grid's font lacks as U+XXXX, and matplotlib draws every glyph it is given."""
    import warnings

    from fastmem.eval.plots import _shown, token_label

    tok = smollm2_tokenizer
    ids = tok("中文 日本 😀 café", add_special_tokens=False)["input_ids"]
    labels = [token_label(tok, i) for i in ids]
    assert "\ufffd" not in "".join(labels)
    assert "".join(labels).startswith("中文 \\xe6\\x97\\xa5本")  # 日 is split over three tokens
    assert labels[-1] == " café"
    shown = [_shown(label) for label in labels]
    assert shown[:2] == ["U+4E2D", "U+6587"] and shown[-1] == " café"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "Glyph ... missing from font" would raise here
        plot_probability_grid(np.linspace(0.1, 0.9, len(ids)), tmp_path / "cjk.png", tokens=labels)
