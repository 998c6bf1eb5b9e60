"""fit_law: parameter recovery, the exclusion rule, degenerate input, the planner, plots."""

import json
import math

import numpy as np
import pytest

from fastmem.law import LawFit, fit_law
from fastmem.law.plots import plot_residuals, plot_surface

TRUE = dict(C=40.0, alpha=0.4, beta=0.6, b=0.5)
RANKS = [1, 2, 4, 8, 16, 32]
LENGTHS = [50, 100, 200, 500, 1000, 2000]


def law(rank, length, C=TRUE["C"], alpha=TRUE["alpha"], beta=TRUE["beta"], b=TRUE["b"]):
    return C * np.asarray(rank, float) ** alpha * np.asarray(length, float) ** -beta + b


def grid(noise=0.01, seed=1):
    rank, length = (a.ravel() for a in np.meshgrid(RANKS, LENGTHS))
    rng = np.random.default_rng(seed)
    delta = law(rank, length) * (1 + noise * rng.standard_normal(rank.size))
    return rank, length, delta


def test_recovers_known_parameters_from_noisy_data():
    rank, length, delta = grid(noise=0.01)
    fit = fit_law(rank, length, delta, bootstrap=200, seed=3)
    assert fit.C == pytest.approx(TRUE["C"], rel=0.1)
    assert fit.alpha == pytest.approx(TRUE["alpha"], abs=0.03)
    assert fit.beta == pytest.approx(TRUE["beta"], abs=0.03)
    assert fit.b == pytest.approx(TRUE["b"], abs=0.05)
    assert fit.r2 > 0.99 and 0 < fit.mape < 3.0
    assert fit.n_used == rank.size and fit.n_dropped == 0 and fit.variable == "rank"
    # 1% noise: the bootstrap intervals are narrow and cover the truth.
    assert fit.n_bootstrap >= 150
    for name, value in TRUE.items():
        lo, hi = fit.ci[name]
        assert lo <= value <= hi, (name, lo, hi)
        assert lo < getattr(fit, name) < hi
    # R² and MAPE get intervals too (each refit's on its resample), around the fit's own
    assert 0.99 < fit.ci["r2"][0] <= fit.ci["r2"][1] <= 1.0
    assert 0 < fit.ci["mape"][0] < fit.mape < fit.ci["mape"][1] < 3.0


def test_exact_data_fits_exactly_and_r2_mape_match_definitions():
    rank, length, _ = grid()
    delta = law(rank, length)
    fit = fit_law(rank, length, delta, bootstrap=0)
    assert fit.r2 == pytest.approx(1.0, abs=1e-8)
    assert fit.mape < 1e-4
    assert fit.ci == {} and fit.n_bootstrap == 0
    # A deliberately wrong law: r2 and mape recomputed by hand from its predictions.
    noisy = delta + np.where(np.arange(delta.size) % 2, 0.05, -0.05)
    fit = fit_law(rank, length, noisy, bootstrap=0)
    pred = fit.predict(rank, length)
    assert fit.r2 == pytest.approx(1 - np.sum((noisy - pred) ** 2) / np.sum((noisy - noisy.mean()) ** 2))
    assert fit.mape == pytest.approx(100 * np.mean(np.abs(noisy - pred) / noisy))


def test_exclusion_rule_drops_runs_below_069_and_counts_them():
    rank, length, delta = grid(noise=0.0)
    final = np.full(rank.size, 1.5)
    saturated = np.arange(rank.size) % 5 == 0
    final[saturated] = 0.3
    final[1] = 0.69  # on the line: kept ("below 0.69" is excluded)
    corrupted = delta.copy()
    corrupted[saturated] = 50.0  # would wreck the fit if the rule did not drop them
    fit = fit_law(rank, length, corrupted, final, bootstrap=0)
    assert fit.n_dropped == int(saturated.sum())
    assert fit.n_used == rank.size - int(saturated.sum())
    assert fit.alpha == pytest.approx(TRUE["alpha"], abs=1e-3)
    assert len(fit.ranks) == fit.n_used


@pytest.mark.parametrize("kwargs, message", [
    (dict(ranks=[1, 2, 4, 8], lengths=[10, 20, 40, 80], delta_loss=[1, 2, 3, 4]), "at least 5 runs"),
    (dict(ranks=[1, 2, 4, 8, 16], lengths=[10, 20, 40, 80, 160], delta_loss=[1, 2, 0, 3, 4]), "delta_loss must be > 0"),
    (dict(ranks=[1, 2, 4, 8, 16], lengths=[10, 20, 40, 80, 160], delta_loss=[1, -2, 1, 3, 4]), "delta_loss must be > 0"),
    (dict(ranks=[1, 2, 4, 8, 16], lengths=[10, 20, 40, 80, 160], delta_loss=[1, 2, float("nan"), 3, 4]), "non-finite"),
    (dict(ranks=[1, 2, 4, 8, 16], lengths=[10, 20, float("inf"), 80, 160], delta_loss=[1, 2, 3, 3, 4]), "lengths holds a non-finite"),
    (dict(ranks=[1, 2, 4, 8, 16], lengths=[10, 20, 40, 80], delta_loss=[1, 2, 3, 3, 4]), "lengths has 4 values but ranks has 5"),
    (dict(ranks=[1, 2, 4, 8, 16], lengths=[10, 20, 40, 80, 160], delta_loss=[1, 2, 3, 4]), "delta_loss has 4"),
    (dict(ranks=[0, 2, 4, 8, 16], lengths=[10, 20, 40, 80, 160], delta_loss=[1, 2, 3, 3, 4]), "ranks must be > 0"),
    (dict(ranks=[4] * 6, lengths=[10, 20, 40, 80, 160, 320], delta_loss=[1, 2, 3, 3, 4, 5]), "2 distinct ranks"),
    (dict(ranks=[1, 2, 4, 8, 16, 32], lengths=[100] * 6, delta_loss=[1, 2, 3, 3, 4, 5]), "2 distinct lengths"),
    (dict(ranks=[1, 2, 4, 8, 16], lengths=[10, 20, 40, 80, 160], delta_loss=[2.0] * 5), "no variation"),
])
def test_degenerate_input_raises_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        fit_law(**kwargs, bootstrap=0)


def test_too_few_runs_left_after_exclusion():
    rank, length, delta = grid()
    final = np.full(rank.size, 0.1)
    final[:4] = 2.0
    with pytest.raises(ValueError, match=r"got 4 \(32 dropped"):
        fit_law(rank, length, delta, final, bootstrap=0)
    with pytest.raises(ValueError, match="final_loss holds a non-finite"):
        fit_law(rank, length, delta, np.full(rank.size, np.nan), bootstrap=0)


def test_rank_for_is_the_inverse_of_predict():
    rank, length, delta = grid(noise=0.0)
    fit = fit_law(rank, length, delta, bootstrap=0)
    for target_len in (100, 777, 10_000):
        for target in (1.0, 1.7, 3.0):
            r = fit.rank_for(target_len, target)
            assert r is not None and r >= 1
            assert fit.predict(r, target_len) >= target
            if r > 1:
                assert fit.predict(r - 1, target_len) < target
    # A drop already reached by rank 1, one only the intercept could never pass, a cap.
    assert fit.rank_for(100, 0.1) == 1
    needed = fit.rank_for(10_000, 3.0)
    assert fit.rank_for(10_000, 3.0, max_rank=needed - 1) is None
    assert fit.rank_for(10_000, 3.0, max_rank=needed) == needed
    flat = LawFit(C=1.0, alpha=-0.2, beta=0.5, b=0.1, r2=1, mape=0, n_used=5, n_dropped=0)
    assert flat.rank_for(100, 5.0) is None  # ΔL falls with rank: unreachable
    with pytest.raises(ValueError, match="length must be"):
        fit.rank_for(0, 1.0)


def test_effective_parameter_mode_when_layer_counts_differ():
    rank, length, _ = grid()
    layers = np.where(np.arange(rank.size) % 2, 1, 2)
    delta = law(rank * layers, length)
    fit = fit_law(rank, length, delta, layers=layers, bootstrap=0)
    assert fit.variable == "effective_params" and fit.layers is None
    assert fit.alpha == pytest.approx(TRUE["alpha"], abs=1e-4)
    assert fit.predict(4, 500, layers=2) == pytest.approx(float(law(8, 500)), rel=1e-5)
    with pytest.raises(ValueError, match="layers is required"):
        fit.predict(4, 500)
    r = fit.rank_for(1000, 2.0, layers=3)
    assert fit.predict(r, 1000, layers=3) >= 2.0 > fit.predict(r - 1, 1000, layers=3)
    # Fitting on plain rank instead mixes two laws and fits worse.
    assert fit_law(rank, length, delta, bootstrap=0).r2 < fit.r2

    same = fit_law(rank, length, law(rank, length), layers=[2] * rank.size, bootstrap=0)
    assert same.variable == "rank" and same.layers == 2
    with pytest.raises(ValueError, match="all adapt 2 layer"):
        same.predict(4, 500, layers=3)


def test_json_round_trip(tmp_path):
    rank, length, delta = grid()
    fit = fit_law(rank, length, delta, np.full(rank.size, 1.0), bootstrap=30)
    fit.to_json(tmp_path / "fit.json")
    data = json.loads((tmp_path / "fit.json").read_text())
    assert {"C", "alpha", "beta", "b", "r2", "mape", "n_used", "n_dropped", "ci", "formula"} <= set(data)
    again = LawFit.from_json(tmp_path)  # a directory resolves to its fit.json
    assert again.predict(8, 300) == pytest.approx(fit.predict(8, 300))
    assert again.ci.keys() == fit.ci.keys()
    with pytest.raises(FileNotFoundError):
        LawFit.from_json(tmp_path / "missing.json")


def test_plots_are_written_and_non_empty(tmp_path):
    rank, length, delta = grid()
    fit = fit_law(rank, length, delta, bootstrap=0)
    for plot, name in ((plot_residuals, "res.png"), (plot_surface, "surf.png")):
        path = plot(fit, tmp_path / "sub" / name)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert path.stat().st_size > 10_000
    assert math.isfinite(fit.r2)
