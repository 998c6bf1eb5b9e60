"""Tables and figures of the reproduction, read back from the stages' databases and runs."""

from __future__ import annotations

import json
import math
import shutil
import statistics
from pathlib import Path

from matplotlib.figure import Figure

from fastmem.law.fit import EXCLUDE_FINAL_LOSS_BELOW
from fastmem.plotting import save_figure
from fastmem.sweep.store import ResultsStore

LN2 = math.log(2.0)


def rows(db: Path) -> list[dict]:
    """Finished cells of a sweep database, `details` parsed (empty list when there is none)."""
    if not db.exists():
        return []
    found = []
    for row in ResultsStore(db).rows():
        row["details"] = json.loads(row["details"]) if row.get("details") else {}
        found.append(row)
    return found


def _fmt(value, spec=".3g") -> str:
    return "–" if value is None else format(value, spec)


def law_table(root: Path, families: dict, figures: Path, fit_dir: str = "fit", prefix: str = "law") -> list[str]:
    """One row per family's fit.json: the law's parameters and in-sample R² / MAPE (bootstrap 95%
    intervals in brackets), its leave-one-out R² / MAPE, and the plane baseline's in-sample and
    leave-one-out ones (fastmem/law/validation.py; every figure on ΔL)."""
    empty = " |" * 11
    lines = ["| family | runs used (dropped) | C | α | β | b | R² | MAPE % | LOO R² | LOO MAPE % "
             "| plane R² (LOO) | plane MAPE % (LOO) |", "|---" * 12 + "|"]
    for name in families:
        fit_file, refused = root / fit_dir / name / "fit.json", root / fit_dir / name / "not_fitted.txt"
        if refused.exists():
            lines.append(f"| {name} | not fitted: {refused.read_text().strip()}{empty}")
            continue
        if not fit_file.exists():
            lines.append(f"| {name} | not fitted yet{empty}")
            continue
        fit = json.loads(fit_file.read_text())
        ci = fit.get("ci", {})
        cell = lambda k: f"{fit[k]:.3g} [{ci[k][0]:.3g}, {ci[k][1]:.3g}]" if k in ci else f"{fit[k]:.3g}"  # noqa: E731
        plane = fit.get("plane") or {}
        failed = f" ({fit['loo_failed']} refits failed)" if fit.get("loo_failed") else ""
        lines.append(f"| {name} | {fit['n_used']} ({fit['n_dropped']}) | {cell('C')} | {cell('alpha')} | "
                     f"{cell('beta')} | {cell('b')} | {cell('r2')} | {cell('mape')} | "
                     f"{_fmt(fit.get('r2_loo'))}{failed} | {_fmt(fit.get('mape_loo'))} | "
                     f"{_fmt(plane.get('r2'))} ({_fmt(plane.get('r2_loo'))}) | "
                     f"{_fmt(plane.get('mape'))} ({_fmt(plane.get('mape_loo'))}) |")
        for plot in ("fit_surface.png", "fit_residuals.png"):
            if (fit_file.parent / plot).exists():
                shutil.copy(fit_file.parent / plot, figures / f"{prefix}_{name}_{plot}")
    return lines


def plateau_cells_table(found: list[dict]) -> list[str]:
    """Every plateau cell: steps, how it ended, base and final loss, ΔL, and whether the fit
    keeps it (final loss >= 0.69: the paper's exclusion rule drops the saturated ones)."""
    lines = ["| ℓ | rank | steps | ended | base loss | final loss | ΔL | in the fit |", "|---" * 8 + "|"]
    for r in sorted(found, key=lambda r: (r["length"], r["rank"])):
        ended = "plateau" if r["details"].get("stopped_on_plateau") else "cap"
        kept = "yes" if (r["final_loss"] or 0.0) >= EXCLUDE_FINAL_LOSS_BELOW else "no (saturated)"
        lines.append(f"| {r['length']} | {r['rank']} | {r['steps']} | {ended} | {_fmt(r['base_loss'], '.3g')} | "
                     f"{_fmt(r['final_loss'], '.3g')} | {_fmt(r['delta_loss'], '.3g')} | {kept} |")
    return lines


def recall_table(law_rows: list[dict]) -> tuple[list[str], dict]:
    """Item 2: every decoded sequence, by its minimum token p."""
    sequences = []
    for row in law_rows:
        d = row["details"]
        for i, min_p in enumerate(d.get("min_p_per_sample", [])):
            sequences.append({"min_p": min_p, "mean_loss": d["mean_loss_per_sample"][i],
                              "forced": d["teacher_forced_em_per_sample"][i],
                              "decoded": d["decoded_em_per_sample"][i]})
    bins = [(0.0, 0.1), (0.1, 0.3), (0.3, 0.5), (0.5, 0.5 + 1e-12), (0.5 + 1e-12, 1.0 + 1e-9)]
    labels = ["p_min < 0.1", "0.1 ≤ p_min < 0.3", "0.3 ≤ p_min < 0.5", "p_min = 0.5", "p_min > 0.5"]
    lines = ["| min token p | sequences | decoded | recalled exactly (decoded) | teacher-forced EM |",
             "|---|---|---|---|---|"]
    for (lo, hi), label in zip(bins, labels):
        chosen = [s for s in sequences if lo <= s["min_p"] < hi]
        decoded = [s for s in chosen if s["decoded"] is not None]
        if not chosen:
            continue
        lines.append(f"| {label} | {len(chosen)} | {len(decoded)} | {sum(s['decoded'] for s in decoded)} | "
                     f"{sum(s['forced'] for s in chosen)} |")
    above = [s for s in sequences if s["min_p"] > 0.5]
    hidden = [s for s in sequences if s["mean_loss"] < LN2 and not s["forced"]]
    low_mean = [s for s in sequences if s["mean_loss"] < LN2]
    facts = {"sequences": len(sequences), "above": len(above),
             "above_decoded_exact": sum(1 for s in above if s["decoded"]),
             "above_decoded": sum(1 for s in above if s["decoded"] is not None),
             "counterexamples": sum(1 for s in above if s["decoded"] is False),
             "disagreements": sum(1 for s in sequences if s["decoded"] is not None and s["decoded"] != s["forced"]),
             "low_mean_loss": len(low_mean), "low_mean_loss_not_recalled": len(hidden)}
    return lines, {"facts": facts, "sequences": sequences}


def recall_figure(sequences: list[dict], path: Path) -> None:
    fig = Figure(figsize=(6.5, 3.8))
    ax = fig.subplots()
    for exact, color, label in ((True, "#2a7ab9", "recalled exactly (greedy decode)"),
                                (False, "#c0392b", "not recalled")):
        chosen = [s for s in sequences if (s["decoded"] if s["decoded"] is not None else s["forced"]) == exact]
        ax.scatter([max(s["min_p"], 1e-8) for s in chosen], [s["mean_loss"] for s in chosen], s=14, c=color,
                   label=f"{label} ({len(chosen)})", alpha=0.75)
    ax.axvline(0.5, color="k", linestyle="--", linewidth=1)
    ax.axhline(LN2, color="#999999", linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.set_yscale("symlog", linthresh=0.01)
    ax.set_xlabel("minimum token p of the sequence (dashed: 0.5)")
    ax.set_ylabel("mean answer loss (dotted: ln 2)")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def stubborn_case(report_file: Path, figures: Path, trained: str) -> tuple[str, list[Path]]:
    """The stubborn case's sentence and its figures (probability grid, training curves), copied
    next to the report; nothing while its evaluation has not run. `trained` says how it was trained."""
    if not report_file.exists():
        return "", []
    record = json.loads(report_file.read_text())["records"][0]
    copied = []
    for name, target in ((record.get("prob_grid"), "stubborn_prob_grid.png"),
                         ("training_curves.png", "stubborn_training_curves.png")):
        if name and (report_file.parent / name).exists():
            shutil.copy(report_file.parent / name, figures / target)
            copied.append(figures / target)
    verdict = ("recalled exactly" if record["exact_match"]
               else f"not recalled: greedy decoding leaves it at token {record['first_error']}")
    text = (f"A stubborn case (`{record['name']}`, {trained}): mean answer loss "
            f"{record['mean_loss']:.3f} (ln 2 = 0.693), token accuracy {record['token_acc']:.1%}, "
            f"{record['n_stubborn']} tokens at p ≤ 0.5 (lowest p {record['min_prob']:.2g}), {verdict}. "
            "Each cell of the grid is one answer token, coloured by its p under teacher forcing.")
    return text, copied


def with_curriculum_label(curriculum_rows: list[dict]) -> list[dict]:
    """The curriculum database's cells, their objective named "<objective> + curriculum"."""
    return [{**r, "objective": r["objective"] + " + curriculum"} for r in curriculum_rows]


def memft_table(chosen: list[dict]) -> list[str]:
    """Steps to 100% recall per rank and objective (the budget when it stalled), then every cell."""
    objectives = [o for o in ("sft", "ot", "sw", "ot + curriculum") if any(r["objective"] == o for r in chosen)]
    lines = ["Steps to 100% exact recall (EM at the end where the budget ran out first):", "",
             "| data | ρ | ℓ | rank | " + " | ".join(objectives) + " |", "|---" * (4 + len(objectives)) + "|"]
    for data, ratio, length, rank in sorted({(r["data"], r["ratio"], r["length"], r["rank"]) for r in chosen}):
        cells = []
        for objective in objectives:
            found = [r for r in chosen if (r["data"], r["ratio"], r["length"], r["rank"], r["objective"])
                     == (data, ratio, length, rank, objective)]
            if not found:
                cells.append("")
            elif found[0]["details"].get("stopped_on_recall"):
                cells.append(f"**{found[0]['steps']}**")
            elif found[0]["exact_match"] == 1.0:  # the budget's last update completed the recall
                cells.append(f"**{found[0]['steps']}** (recalled by the last step)")
            else:
                cells.append(f"> {found[0]['steps']} (EM {_fmt(found[0]['exact_match'], '.0%')}, "
                             f"acc {_fmt(found[0]['token_acc'], '.3f')})")
        lines.append(f"| {data} | {ratio:g} | {length} | {rank} | " + " | ".join(cells) + " |")
    lines += ["", "Every cell:", "",
              "| data | ρ | ℓ | rank | objective | EM | token acc | steps | stopped on recall | wall s |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(chosen, key=lambda r: (r["data"], r["ratio"], r["length"], r["rank"], r["objective"])):
        lines.append(f"| {r['data']} | {r['ratio']:g} | {r['length']} | {r['rank']} | {r['objective']} | "
                     f"{_fmt(r['exact_match'], '.0%')} | {_fmt(r['token_acc'], '.3f')} | {r['steps']} | "
                     f"{'yes' if r['details'].get('stopped_on_recall') else 'no'} | {_fmt(r['wall_s'], '.0f')} |")
    return lines


def _mean_sd(values: list[float]) -> str:
    """Mean ± sample standard deviation (the mean alone for one value, – for none)."""
    if len(values) < 2:
        return f"{values[0]:.3g}" if values else "–"
    return f"{statistics.mean(values):.3g} ± {statistics.stdev(values):.2g}"


def _seed_groups(found: list[dict], key) -> dict[tuple, list[dict]]:
    """Cells grouped by `key(cell)`, each group in seed order."""
    groups: dict[tuple, list[dict]] = {}
    for r in sorted(found, key=lambda r: r["seed"]):
        groups.setdefault(key(r), []).append(r)
    return groups


def _decoded_em(row: dict) -> float | None:
    """Greedy-decoded exact match of the cell's samples (None when nothing was decoded)."""
    decoded = [v for v in row["details"].get("decoded_em_per_sample") or [] if v is not None]
    return sum(decoded) / len(decoded) if decoded else None


def protocol_table(groups: dict[str, list[dict]]) -> list[str]:
    """MemFT vs SFT under the authors' protocol, seeds pooled: per (data, rank, recipe) the seeds
    done, EM at the end of the budget per seed (greedy-decoded, every sample), token accuracy and
    final loss (mean ± sample sd over seeds), and the first step whose training forward had every
    token right / every token at p > 0.5, per seed (– : never within the budget)."""
    lines = ["| data | rank | recipe | seeds | decoded EM per seed | EM all seeds | token acc | final loss "
             "| first all-correct step per seed | first all p > 0.5 step per seed |", "|---" * 10 + "|"]
    # A group named for SFT (a control) keeps its name; SFT cells of the others are one "SFT".
    cells = [{**r, "recipe": "SFT" if r["objective"] == "sft" and not recipe.startswith("SFT") else recipe}
             for recipe, found in groups.items() for r in found]
    keyed = _seed_groups(cells, lambda r: (r["data"], r["ratio"], r["rank"], r["recipe"]))
    order = {name: i for i, name in enumerate(["SFT", *groups])}
    for (data, ratio, rank, name), found in sorted(keyed.items(), key=lambda kv: (*kv[0][:3], order[kv[0][3]])):
        ems = [_decoded_em(r) for r in found]
        em_text = ", ".join(f"{r['seed']}: {_fmt(e, '.0%')}" for r, e in zip(found, ems))
        every = sum(e == 1.0 for e in ems if e is not None)
        steps = lambda key: ", ".join(str(r["details"].get(key) or "–") for r in found)  # noqa: E731
        label = data if data != "stress" else f"stress ρ {ratio:g}"
        lines.append(f"| {label} | {rank} | {name} | {len(found)} | {em_text} | {every}/{len(found)} | "
                     f"{_mean_sd([r['token_acc'] for r in found if r['token_acc'] is not None])} | "
                     f"{_mean_sd([r['final_loss'] for r in found if r['final_loss'] is not None])} | "
                     f"{steps('first_em_step')} | {steps('first_recall_step')} |")
    return lines


def memft_figure(rows_: list[dict], path: Path) -> None:
    """EM, token accuracy and steps against rank, one column per data family, one line per objective."""
    groups = sorted({(r["data"], r["ratio"], r["length"]) for r in rows_})
    if not groups:
        return
    fig = Figure(figsize=(3.8 * len(groups), 7.5))
    axes = fig.subplots(3, len(groups), squeeze=False, sharex=True)
    styles = {"sft": ("#999999", "s"), "ot": ("#2a7ab9", "o"), "sw": ("#27ae60", "^"),
              "ot + curriculum": ("#8e44ad", "D")}
    for column, (data, ratio, length) in enumerate(groups):
        for objective, (color, marker) in styles.items():
            chosen = sorted((r for r in rows_ if (r["data"], r["ratio"], r["length"]) == (data, ratio, length)
                             and r["objective"] == objective), key=lambda r: r["rank"])
            if not chosen:
                continue
            ranks = [r["rank"] for r in chosen]
            style = dict(color=color, marker=marker, alpha=0.8)
            axes[0][column].plot(ranks, [r["exact_match"] for r in chosen], label=objective, **style)
            axes[1][column].plot(ranks, [r["token_acc"] for r in chosen], **style)
            axes[2][column].plot(ranks, [r["steps"] for r in chosen], **style)
            stalled = [r for r in chosen if not r["details"].get("stopped_on_recall")]
            axes[2][column].scatter([r["rank"] for r in stalled], [r["steps"] for r in stalled], marker="x",
                                    color="#c0392b", zorder=3)
        axes[0][column].set_title(f"{data} ρ={ratio:g} ℓ={length}", fontsize=9)
        axes[2][column].set_xscale("log", base=2)
        axes[2][column].set_xlabel("LoRA rank")
    axes[0][0].set_ylabel("exact match at the end")
    axes[1][0].set_ylabel("token accuracy at the end")
    axes[2][0].set_ylabel("steps (x: budget spent)")
    axes[0][0].legend(fontsize=8)
    save_figure(fig, path)


def _threshold_cells(root: Path, names, stage: str) -> list[dict]:
    """The finished cells of a threshold stage's databases (`<stage>_<name>.sqlite`, and SFT's),
    each with its "threshold" ("–" for SFT)."""
    return [{**r, "threshold": "–" if name == "sft" else name}
            for name in (*names, "sft") for r in rows(root / f"{stage}_{name}.sqlite")]


def threshold_table(root: Path, names) -> tuple[list[str], list[dict]]:
    found = _threshold_cells(root, names, "threshold")
    lines = ["| data | ρ | objective | threshold | EM | steps | stopped on recall | re-crossings | wall s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(found, key=lambda r: (r["data"], r["ratio"], r["objective"], str(r["threshold"]))):
        lines.append(f"| {r['data']} | {r['ratio']:g} | {r['objective']} | {r['threshold']} | "
                     f"{_fmt(r['exact_match'], '.0%')} | {r['steps']} | "
                     f"{'yes' if r['details'].get('stopped_on_recall') else 'no'} | "
                     f"{r['details'].get('recrossings', '–')} | {_fmt(r['wall_s'], '.0f')} |")
    return lines, found


def threshold_seeds_table(root: Path, names, stage: str = "threshold_protocol") -> list[str]:
    """The threshold study with seeds: per (data, ρ, objective, threshold) the seeds done, how
    many reached 100% recall within the budget, steps to it (mean ± sd over those that did; the
    budget for the rest is listed per seed), and re-crossings (mean ± sd)."""
    lines = ["| data | ρ | objective | threshold | seeds | recalled | steps per seed | steps to recall "
             "(recalled seeds) | re-crossings |", "|---" * 9 + "|"]
    groups = _seed_groups(_threshold_cells(root, names, stage),
                          lambda r: (r["data"], r["ratio"], r["objective"], r["threshold"]))
    for (data, ratio, objective, threshold), found in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0]))):
        recalled = [r for r in found if r["details"].get("stopped_on_recall")]
        per_seed = ", ".join(f"{r['steps']}{'' if r in recalled else ' (budget)'}" for r in found)
        lines.append(f"| {data} | {ratio:g} | {objective} | {threshold} | {len(found)} | "
                     f"{len(recalled)}/{len(found)} | "
                     f"{per_seed} | {_mean_sd([r['steps'] for r in recalled])} | "
                     f"{_mean_sd([r['details'].get('recrossings', 0) for r in found])} |")
    return lines


def threshold_figure(found: list[dict], path: Path) -> None:
    regimes = sorted({(r["data"], r["ratio"]) for r in found})
    if not regimes:
        return
    fig = Figure(figsize=(4.2 * len(regimes), 3.2))
    axes = fig.subplots(1, len(regimes), squeeze=False)
    for ax, regime in zip(axes[0], regimes):
        chosen = sorted((r for r in found if (r["data"], r["ratio"]) == regime),
                        key=lambda r: (r["objective"], str(r["threshold"])))
        names = [f"{r['objective']} {r['threshold']}" for r in chosen]
        colors = ["#2a7ab9" if r["details"].get("stopped_on_recall") else "#c0392b" for r in chosen]
        ax.barh(names, [r["steps"] for r in chosen], color=colors)
        ax.set_title(f"{regime[0]} ρ={regime[1]:g} (red: budget spent, no full recall)", fontsize=8)
        ax.set_xlabel("steps to 100% recall")
        ax.invert_yaxis()
    save_figure(fig, path)


def run_cell(run: Path, eval_report: Path | None = None) -> dict | None:
    """What a training run directory measured — finished, stopped at a wall-time cap
    (capped.json), or unfinished (killed or still running: its steps so far); None before its
    first step. Times are the steps' own (metrics.jsonl), whole across a kill and resume."""
    summary_file, cap_file = run / "summary.json", run / "capped.json"
    by_step = metrics_by_step(run / "metrics.jsonl") if (run / "metrics.jsonl").exists() else {}
    if not by_step:
        return None
    seconds, last = sum(row["step_s"] for row in by_step.values()), by_step[max(by_step)]
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    report = json.loads(eval_report.read_text()) if eval_report and eval_report.exists() else {}
    steps = len(by_step)
    # the reference forward runs inside the step (`--reference-forward`): step_s holds it
    ref = [row["reference_s"] for row in by_step.values() if "reference_s" in row]
    # process CPU seconds (1 torch thread): the work, which another job on the machine inflates
    # less than the wall; rows of runs from before the trainer logged it have none
    cpu = sum(row["step_cpu_s"] for row in by_step.values()) if all(
        "step_cpu_s" in row for row in by_step.values()) else None
    return {"steps": steps, "step_s": seconds / steps, "cpu": cpu,
            "ref_s": sum(ref) / len(ref) if ref else None, "wall": seconds,
            "em": report.get("totals", {}).get("exact_match"),
            "recalled": bool(summary.get("stopped_on_recall")), "capped": cap_file.exists(),
            "unfinished": not summary_file.exists() and not cap_file.exists(),
            "stubborn_left": last.get("stubborn_tokens"), "stubborn_final": summary.get("stubborn_tokens"),
            "peak_gib": summary["peak_mem_bytes"] / 2**30 if summary.get("peak_mem_bytes") else None}


def headline_cells(root: Path, length: int, recipes) -> tuple[dict, float | None]:
    """Each recipe's run at `length` (`run_cell`) and fastmem's best wall to 100% EM (None while
    no fastmem recipe has recalled the answer)."""
    out = root / "headline"
    cells = {}
    for name, *_ in recipes:
        cell = run_cell(out / f"{length}-{name}", out / f"{length}-{name}-eval" / "report.json")
        if cell is not None:
            cells[name] = {"length": length, "recipe": name, **cell}
    ours = [c["wall"] for name, c in cells.items() if name.startswith("fastmem") and c["recalled"]]
    return cells, (min(ours) if ours else None)


def headline_table(root: Path, lengths, recipes) -> tuple[list[str], list[dict]]:
    lines = ["| ℓ | recipe | steps | s / step | of which reference forward | wall to 100% EM s "
             "| CPU s to 100% EM | EM (fastmem eval) | peak memory GiB | × fastmem's best (wall) "
             "| × fastmem's best (CPU) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    found = []
    for length in lengths:
        cells, base = headline_cells(root, length, recipes)
        ours = [c["cpu"] for name, c in cells.items() if name.startswith("fastmem") and c["recalled"]]
        base_cpu = min(ours) if ours and None not in ours else None
        for cell in cells.values():
            bound = cell["capped"] or cell["unfinished"]
            ratio = f"{'≥ ' if bound else ''}{cell['wall'] / base:.2f}×" if base else "–"
            ratio_cpu = f"{'≥ ' if bound else ''}{cell['cpu'] / base_cpu:.2f}×" if base_cpu and cell["cpu"] else "–"
            cpu = "–" if cell["cpu"] is None else f"{'> ' if bound else ''}{cell['cpu']:.0f}"
            lines.append(f"| {length} | {cell['recipe']} | {_steps_text(cell)} | {cell['step_s']:.2f} | "
                         f"{_fmt(cell['ref_s'], '.2f')} | "
                         f"{'> ' if bound else ''}{cell['wall']:.0f} | {cpu} | {_fmt(cell['em'], '.0%')} | "
                         f"{_fmt(cell['peak_gib'], '.2f')} | {ratio} | {ratio_cpu} |")
            found.append(cell)
    return lines, found


def _steps_text(cell: dict) -> str:
    if cell["capped"] or cell["unfinished"]:
        how = "stopped at the cap" if cell["capped"] else "unfinished (interrupted, resumable)"
        return f"{cell['steps']} ({how}, {cell['stubborn_left']} tokens still at p ≤ 0.5)"
    if cell["recalled"]:
        return str(cell["steps"])
    left = cell["stubborn_final"]
    return f"{cell['steps']} (budget spent, {'not recalled' if left is None else f'{left} tokens at p ≤ 0.5 after it'})"


def steps_table(root: Path, lengths, steps_runs, recipes) -> list[str]:
    """The steps half of the headline's attribution (stages.HEADLINE_STEPS): per length the
    authors' recipe as run, the same adapter on fastmem's engine under OT at ln 2, OT at 0.1 and
    SFT, then fastmem's recipe; steps against those of OT at ln 2 on the same engine and adapter.
    A run not started yet is left out."""
    lines = ["| ℓ | run | steps to 100% recall | CPU s / step | CPU s to 100% recall "
             "| × the steps of OT at ln 2 (authors' adapter, fastmem's engine) |", "|---|---|---|---|---|---|"]
    for length in lengths:
        headline, _ = headline_cells(root, length, recipes)
        found = [("the authors' recipe as run (`--engine hf`, reference forward)", headline.get("authors"))]
        found += [(what, run_cell(root / "headline_steps" / f"{length}-{slug}")) for slug, what, _ in steps_runs]
        found += [("fastmem's recipe (its adapter, SFT)", headline.get("fastmem"))]
        base = found[1][1]
        base_steps = base["steps"] if base and base["recalled"] else None
        for what, cell in found:
            if cell is None:
                continue
            bound = cell["capped"] or cell["unfinished"] or not cell["recalled"]
            cpu, at_least = cell["cpu"], "≥ " if bound else ""
            ratio = f"{at_least}{cell['steps'] / base_steps:.2f}×" if base_steps else "–"
            per_step = None if cpu is None else cpu / cell["steps"]
            total = "–" if cpu is None else f"{'> ' if bound else ''}{cpu:.0f}"
            lines.append(f"| {length} | {what} | {_steps_text(cell)} | {_fmt(per_step, '.2f')} | {total} | {ratio} |")
    return lines


def steps_agreement(root: Path, lengths) -> list[str]:
    """Per length, how closely the authors' recipe as run (`--engine hf`) and the same recipe on
    fastmem's engine (headline_steps' ot-ln2) trained, step for step: one sentence each."""
    found = []
    for length in lengths:
        files = (root / "headline" / f"{length}-authors" / "metrics.jsonl",
                 root / "headline_steps" / f"{length}-ot-ln2" / "metrics.jsonl")
        if not all(f.exists() for f in files):
            continue
        hf, fast = (metrics_by_step(f) for f in files)
        common = sorted(set(hf) & set(fast))
        if not common:
            continue
        loss = max(abs(hf[s]["loss"] - fast[s]["loss"]) for s in common)
        tokens = max(abs(hf[s]["stubborn_tokens"] - fast[s]["stubborn_tokens"]) for s in common)
        found.append(f"At {length} tokens the two engines ran the authors' recipe step for step: over their "
                     f"{len(common)} common steps the training losses differ by at most {loss:.2g} nats a token "
                     f"and the counts of tokens at p ≤ 0.5 by at most {tokens}.")
    return found


def parts_table(root: Path, lengths, parts) -> list[str]:
    """The per-step cost ladder (stages.HEADLINE_PARTS): per rung the mean step after the first
    (the warm-up), in process CPU seconds (the work, robust to other jobs on the machine; 1
    torch thread) and wall seconds, each rung against the one above and against the first.
    A rung not run yet is left out; its neighbours are then compared across the gap."""
    lines = ["| ℓ | rung | CPU s / step | wall s / step | × the rung above (CPU) | × the authors' loop (CPU) "
             "| GEMM route | peak memory GiB |", "|---|---|---|---|---|---|---|---|"]
    for length in lengths:
        first = above = None
        for slug, what, *_ in parts:
            run = root / "headline_parts" / f"{length}-{slug}"
            summary_file = run / "summary.json"
            if not summary_file.exists():
                continue
            summary = json.loads(summary_file.read_text())
            timed = [row for step, row in sorted(metrics_by_step(run / "metrics.jsonl").items()) if step > 1]
            if not timed or "step_cpu_s" not in timed[0]:
                continue
            cpu = statistics.mean(row["step_cpu_s"] for row in timed)
            wall = statistics.mean(row["step_s"] for row in timed)
            first = first or cpu
            lines.append(f"| {length} | {what} | {cpu:.2f} | {wall:.2f} | "
                         f"{'–' if above is None else f'{cpu / above:.2f}×'} | {cpu / first:.2f}× | "
                         f"{summary.get('cpu_gemm', 'torch F.linear')} | "
                         f"{_fmt(summary.get('peak_mem_bytes') and summary['peak_mem_bytes'] / 2**30, '.2f')} |")
            above = cpu
    return lines


def metrics_by_step(metrics: Path) -> dict[int, dict]:
    """step -> its row of a run's metrics.jsonl: whole across a kill and resume (summary.json's
    wall_s covers only the last process), a step redone after a resume counted once."""
    by_step = {}
    for line in metrics.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line still being written (a run in progress)
            continue
        by_step[row["step"]] = row
    return by_step


def step_seconds(metrics: Path) -> dict[int, float]:
    """step -> step_s (metrics_by_step). Model loading, the prefix cache and the base / final
    passes are left out for every recipe alike."""
    return {step: row["step_s"] for step, row in metrics_by_step(metrics).items()}


def commands(root: Path, repo: Path) -> list[str]:
    """The `$ fastmem ...` lines of every log under `root`, in order, once each, paths relative."""
    seen = []
    for log in sorted(root.rglob("*.log")):
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("$ fastmem "):
                line = line.replace(str(repo) + "/", "")
                if line not in seen:
                    seen.append(line)
    return seen


def headline_figure(found: list[dict], path: Path) -> None:
    """Wall time to 100% EM per recipe and length, log scale; a hatched bar is a baseline stopped
    at its cap (its true time is longer)."""
    if not found:
        return
    fig = Figure(figsize=(7.5, 0.5 * len(found) + 1.4))
    ax = fig.subplots()
    names = [f"ℓ={c['length']} {c['recipe']}" for c in found]
    bars = ax.barh(names, [c["wall"] / 60 for c in found],
                   color=["#2a7ab9" if c["recipe"].startswith("fastmem") else "#999999" for c in found])
    for bar, cell in zip(bars, found):
        if cell["capped"] or cell["unfinished"]:
            bar.set_hatch("//")
            ax.annotate(" stopped: ≥", (bar.get_width(), bar.get_y() + bar.get_height() / 2), va="center",
                        fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("wall minutes to 100% exact recall, log scale\n"
                  "(authors: + their reference forward per step; hatched: stopped before recall)")
    ax.invert_yaxis()
    save_figure(fig, path)
