"""`fastmem fit` (fit the memory law to a sweep) and `fastmem plan` (the rank for a target)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fastmem.constants import L_CRIT
from fastmem.errors import UsageError

FIT_EPILOG = """examples:
  fastmem fit --db sweep.sqlite --out fit/
  fastmem fit --db sweep.sqlite --where objective=sft --out fit_sft/
  fastmem fit --csv runs.csv --bootstrap 200 --out fit/

Reads finished runs (status 'done') with columns rank, length, delta_loss (or base_loss and
final_loss), final_loss and optionally layers; runs whose final loss is below 0.69 are left
out (the paper's rule). Prints the in-sample R² and MAPE (in ΔL), the leave-one-out ones (each
run predicted by a refit on the others) and those of the 3-parameter plane baseline
ΔL = a + p·ln r + q·ln ℓ: a law that does not beat the plane out of sample has not shown its
power-law form. Writes OUT/fit.json, OUT/fit_residuals.png and OUT/fit_surface.png.
"""

PLAN_EPILOG = """examples:
  fastmem plan --length 10000 --delta-loss 2.5 --fit fit/fit.json
  fastmem plan --length 10000 --base-loss 3.4 --fit fit/          # drop the loss below ln 2
  fastmem plan --length 4000 --delta-loss 2 --layers 2 --fit fit/ # effective-parameter fits

Prints the smallest rank the law predicts reaches the loss drop on stdout (the reasoning on
stderr); exit 1 if no rank up to --max-rank does. Targets the fit cannot speak to are refused
(exit 2): a drop at or below the fitted floor b (every rank "reaches" it), or one that needs a
rank above the model's width (hidden size; a LoRA update cannot have a higher rank).
"""


def register(subparsers) -> None:
    fit = subparsers.add_parser("fit", help="fit the parametric memory law to sweep results",
                                description="Fit ΔL(r, ℓ) = C·r^α·ℓ^-β + b to a sweep's runs.",
                                epilog=FIT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = fit.add_mutually_exclusive_group(required=True)
    source.add_argument("--db", help="the sweep's results SQLite file (table runs)")
    source.add_argument("--csv", help="a CSV with the same columns as the runs table")
    fit.add_argument("--out", required=True, help="directory for fit.json and the plots")
    fit.add_argument("--where", action="append", metavar="COLUMN=VALUE",
                     help="keep runs with this column value (repeatable), e.g. objective=sft")
    fit.add_argument("--bootstrap", type=int, default=1000, help="resamples for the 95%% intervals")
    fit.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    fit.set_defaults(func=run_fit)

    plan = subparsers.add_parser("plan", help="the LoRA rank a fitted law predicts for a target",
                                 description="Smallest rank whose predicted loss drop reaches a target.",
                                 epilog=PLAN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    plan.add_argument("--length", type=float, required=True, help="answer length in tokens")
    target = plan.add_mutually_exclusive_group(required=True)
    target.add_argument("--delta-loss", type=float, help="the loss drop ΔL to reach")
    target.add_argument("--base-loss", type=float,
                        help=f"the base model's loss on the answer: target ΔL = base − ln 2 ({L_CRIT:.4f})")
    plan.add_argument("--fit", required=True, help="fit.json written by `fastmem fit` (or its directory)")
    plan.add_argument("--layers", type=int, help="adapted layer count (needed for effective-parameter fits)")
    plan.add_argument("--max-rank", type=int, help="report no rank above this")
    plan.add_argument("--model", default="smollm2",
                      help="'smollm2' (embedded) or a local HF checkpoint dir: its width caps the rank")
    plan.set_defaults(func=run_plan)


def _interval(fit, name: str) -> str:
    if name not in fit.ci:
        return ""
    lo, hi = fit.ci[name]
    return f"  [{lo:.4g}, {hi:.4g}]"


def run_fit(args) -> int:
    from fastmem.law.fit import fit_law
    from fastmem.law.plots import plot_residuals, plot_surface
    from fastmem.law.runs import load_runs

    from fastmem.cli_checks import check_out_dir, check_sqlite_file

    if args.db:
        check_sqlite_file(args.db)
    if args.bootstrap < 0:
        raise UsageError(f"--bootstrap must be >= 0, got {args.bootstrap}")
    check_out_dir(args.out)
    try:
        runs = load_runs(db=args.db, csv_path=args.csv, where=args.where)
    except UnicodeDecodeError:
        raise UsageError(f"--csv {args.csv} is not UTF-8 text (a CSV with the runs table's columns)") from None
    fit = fit_law(runs.rank, runs.length, runs.delta_loss, runs.final_loss, layers=runs.layers,
                  bootstrap=args.bootstrap, seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fit.to_json(out / "fit.json")
    residual_png = plot_residuals(fit, out / "fit_residuals.png")
    surface_png = plot_surface(fit, out / "fit_surface.png")

    x_name = "(rank×layers)" if fit.variable == "effective_params" else "r"
    print(f"ΔL = C·{x_name}^α·ℓ^-β + b   ({fit.n_used} runs used, {fit.n_dropped} dropped: "
          f"final loss < {fit.exclude_final_loss_below})")
    for name in ("C", "alpha", "beta", "b"):
        print(f"  {name:5s} = {getattr(fit, name):.6g}{_interval(fit, name)}")
    boot = f", 95% intervals from {fit.n_bootstrap} bootstrap refits" if fit.ci else ""
    print(f"  R² = {fit.r2:.4f}{_interval(fit, 'r2')}   MAPE = {fit.mape:.2f}%{_interval(fit, 'mape')}{boot}")
    failed = f"   ({fit.loo_failed} of {fit.n_used} refits failed)" if fit.loo_failed else ""
    print(f"  leave-one-out (each run predicted by a refit on the others): R² = {fit.r2_loo:.4f}   "
          f"MAPE = {fit.mape_loo:.2f}%{failed}")
    plane = fit.plane
    x_log = "ln(rank×layers)" if fit.variable == "effective_params" else "ln r"
    print(f"  plane baseline ΔL = a + p·{x_log} + q·ln ℓ (3 parameters): R² = {plane.r2:.4f}   "
          f"MAPE = {plane.mape:.2f}%;   leave-one-out R² = {plane.r2_loo:.4f}   MAPE = {plane.mape_loo:.2f}%")
    if runs.final_loss is None:
        print("  note: no final_loss column, so the final-loss exclusion rule was not applied")
    print(f"wrote {out / 'fit.json'}, {residual_png}, {surface_png}")
    return 0


def model_width(name: str) -> int:
    """The hidden size of the model (no weights are loaded): the highest useful LoRA rank."""
    from fastmem.cli_checks import model_dimensions

    return model_dimensions(name)[0]


def _load_fit(path: str):
    from fastmem.law.fit import LawFit

    try:
        return LawFit.from_json(path)
    except UnicodeDecodeError:
        raise UsageError(f"--fit {path} is not a fit.json written by `fastmem fit` (not UTF-8 text)") from None
    except ValueError as err:
        raise UsageError(f"--fit {path} is not a fit.json written by `fastmem fit` ({err})") from None


def run_plan(args) -> int:
    import math

    if not (math.isfinite(args.length) and args.length > 0):
        raise UsageError(f"--length must be > 0, got {args.length}")
    if args.max_rank is not None and args.max_rank < 1:
        raise UsageError(f"--max-rank must be >= 1, got {args.max_rank}")
    if args.layers is not None and args.layers < 1:
        raise UsageError(f"--layers must be >= 1, got {args.layers}")
    fit = _load_fit(args.fit)
    delta = args.delta_loss if args.delta_loss is not None else args.base_loss - L_CRIT
    if not math.isfinite(delta) or delta <= 0:
        why = f"--base-loss {args.base_loss:g} is not above ln 2 ({L_CRIT:.4f})" if args.delta_loss is None \
            else "a loss drop must be > 0"
        raise UsageError(f"target ΔL = {delta:.4g} cannot be planned: {why}")
    if delta <= fit.b:
        raise UsageError(f"target ΔL = {delta:.4g} is at or below the fit's floor b = {fit.b:.4g}: the law "
                         "predicts it at every rank, so it cannot choose one")
    width = model_width(args.model)
    unbounded = fit.rank_for(args.length, delta, layers=args.layers)
    if unbounded is None or unbounded > width:
        need = "no finite rank" if unbounded is None else f"rank {unbounded}"
        raise UsageError(f"target ΔL = {delta:.4g} at length {args.length:g} is beyond the fit's reach on "
                         f"{args.model}: it needs {need}, above the model's width {width} (hidden size)")
    rank = fit.rank_for(args.length, delta, layers=args.layers, max_rank=args.max_rank)
    if rank is None:
        limit = f" up to rank {args.max_rank}" if args.max_rank else ""
        print(f"no rank{limit} reaches ΔL = {delta:.4g} at length {args.length:g}: the fitted law "
              f"(C={fit.C:.4g}, α={fit.alpha:.4g}, β={fit.beta:.4g}, b={fit.b:.4g}) falls short")
        return 1
    outside = fit.extrapolation(rank, args.length)
    if outside:
        print(f"fastmem plan: warning: extrapolating: {outside}; the law was not measured there", file=sys.stderr)
    predicted = fit.predict(rank, args.length, args.layers)
    # The rank alone on stdout, so `$(fastmem plan ...)` can feed a script; the why on stderr.
    print(rank)
    print(f"rank {rank} predicts ΔL = {predicted:.4g} >= {delta:.4g} at length {args.length:g}"
          + (f" with {args.layers} layer(s)" if args.layers else ""), file=sys.stderr)
    return 0
