"""python -m benchmarks.reproduce: run the stages, then write the report (see __init__)."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import time
from pathlib import Path

from benchmarks.reproduce import analysis, stages

REPO = Path(__file__).resolve().parents[2]
KEPT = REPO / "benchmarks" / "results" / "reproduce"  # <scale>/<stage>.sqlite, committed
STAGES = {"law": stages.run_law, "memft": stages.run_memft, "threshold": stages.run_threshold,
          "headline": stages.run_headline}
# Run only when named in --stages (issue 22's reruns under the authors' protocol: hours of
# CPU); the report shows whatever of them has landed (section 3b).
OPTIONAL_STAGES = {"protocol": stages.run_protocol, "threshold_protocol": stages.run_threshold_protocol,
                   "law_plateau": stages.run_law_plateau, "headline_parts": stages.run_headline_parts,
                   "headline_steps": stages.run_headline_steps}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.reproduce", description=__doc__)
    parser.add_argument("--scale", choices=("subset", "cpu"), default="subset",
                        help="subset: `make reproduce-cpu` (< 1 h on 2 cores); cpu: the full CPU grids")
    parser.add_argument("--root", default=None, help="where the runs go (default runs/reproduce[-subset])")
    parser.add_argument("--stages", default=",".join(STAGES),
                        help=f"comma-separated, of {','.join(STAGES)} (default: all), or {','.join(OPTIONAL_STAGES)}")
    parser.add_argument("--report-only", action="store_true", help="only write the report from what landed")
    args = parser.parse_args(argv)
    root = Path(args.root or REPO / "runs" / ("reproduce-subset" if args.scale == "subset" else "reproduce"))
    root.mkdir(parents=True, exist_ok=True)
    chosen = [s for s in args.stages.split(",") if s]
    runners = {**STAGES, **OPTIONAL_STAGES}
    unknown = sorted(set(chosen) - set(runners))
    if unknown:
        parser.error(f"unknown stage(s) {unknown}; choose from {sorted(runners)}")
    # The cpu grids take hours: their databases live in git, so that the next session or machine
    # resumes them. The subset is what `make reproduce-cpu` regenerates from nothing.
    kept = KEPT / args.scale if args.scale == "cpu" else None
    if kept:
        restore_databases(kept, root)
    timings = _load_timings(root)
    if not args.report_only:
        for name in chosen:
            start = time.perf_counter()
            runners[name](root, args.scale)
            timings = _load_timings(root)  # re-read: another driver may have finished a stage meanwhile
            timings[name] = timings.get(name, 0.0) + time.perf_counter() - start
            (root / "stage_seconds.json").write_text(json.dumps(timings, indent=1))
            if kept:
                keep_databases(root, kept)
    if kept:
        keep_databases(root, kept)
    path = write_report(root, args.scale, timings)
    print(f"wrote {path}")
    return 0


def _progress(root: Path) -> list[str]:
    """`name done/all` per sweep database: a grid still running says so in the report."""
    from fastmem.sweep.store import ResultsStore

    found = []
    for db in sorted(root.glob("*.sqlite")):
        store = ResultsStore(db)
        counts = store.status_counts()
        hours = sum(r["wall_s"] or 0.0 for r in store.rows()) / 3600
        found.append(f"{db.stem} {counts.get('done', 0)}/{sum(counts.values())} ({hours:.1f} h of cell wall)")
    return found


def _figure(draw, data, path: Path, alt: str, rel) -> list[str]:
    """Draw `data` to `path` and link it, or nothing while no data has landed."""
    if not data:
        return []
    draw(data, path)
    return [f"![{alt}]({rel(path)})", ""]


def keep_databases(root: Path, kept: Path) -> None:
    """Snapshot every sweep database of `root` into `kept` (sqlite's backup API: consistent
    even while a sweep is writing), with the stage timings."""
    import sqlite3

    kept.mkdir(parents=True, exist_ok=True)
    for db in sorted(root.glob("*.sqlite")):
        tmp = kept / (db.name + ".tmp")
        with sqlite3.connect(db) as source, sqlite3.connect(tmp) as target:
            source.backup(target)
        tmp.replace(kept / db.name)
    if (root / "stage_seconds.json").exists():
        (kept / "stage_seconds.json").write_text((root / "stage_seconds.json").read_text())
    for path in _run_files(root):
        target = kept / path.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_bytes(path.read_bytes())
        tmp.replace(target)
    # The commands every stage ran (the `$ fastmem` lines of the logs, which stay in runs/):
    # accumulated, so the report's command list survives a machine whose logs are gone.
    known = analysis.commands(kept, REPO) + analysis.commands(root, REPO)
    lines = list(dict.fromkeys(known))
    if lines:  # the same list in both places: the report reads it first, in this order
        for target in (kept / COMMANDS_LOG, root / COMMANDS_LOG):
            target.write_text("".join(line + "\n" for line in lines))


# The run files the report reads besides the databases (the stubborn case's evaluation, the
# headline's per-step metrics, summaries, caps and evaluations): small, kept in git with them so
# that the report can be rebuilt from a clone (`--report-only`).
KEPT_RUN_FILES = ("stubborn/eval/report.json", "stubborn/eval/*.png", "stubborn/run/metrics.jsonl",
                  "stubborn/run/summary.json", "headline/*.json", "headline/*/metrics.jsonl",
                  "headline/*/summary.json", "headline/*/capped.json", "headline/*-eval/report.json",
                  "headline_parts/*/metrics.jsonl", "headline_parts/*/summary.json",
                  "headline_steps/*/metrics.jsonl", "headline_steps/*/summary.json",
                  "fit/*/fit.json", "fit/*/*.png", "fit/*/not_fitted.txt", "fit_plateau/*/fit.json",
                  "fit_plateau/*/*.png", "fit_plateau/*/not_fitted.txt")
COMMANDS_LOG = "commands.log"


def _run_files(root: Path) -> list[Path]:
    return sorted({p for pattern in KEPT_RUN_FILES for p in root.glob(pattern) if p.is_file()})


def restore_databases(kept: Path, root: Path) -> None:
    """Seed `root` with the kept databases and run files it lacks (a fresh machine or clone
    resumes the grids and rebuilds the report)."""
    for db in sorted(kept.glob("*.sqlite")) if kept.exists() else []:
        if not (root / db.name).exists():
            (root / db.name).write_bytes(db.read_bytes())
    for path in [*_run_files(kept), kept / COMMANDS_LOG] if kept.exists() else []:
        if not path.exists():
            continue
        target = root / path.relative_to(kept)
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    if (kept / "stage_seconds.json").exists() and not (root / "stage_seconds.json").exists():
        (root / "stage_seconds.json").write_text((kept / "stage_seconds.json").read_text())


def _load_timings(root: Path) -> dict:
    file = root / "stage_seconds.json"
    return json.loads(file.read_text()) if file.exists() else {}


def write_report(root: Path, scale: str, timings: dict, out: Path | None = None) -> Path:
    """The Markdown report and its figures: docs/reproduction.md (cpu) or ROOT/reproduction.md
    (subset); `out`: that file elsewhere (its figures beside it, in `reproduction/`)."""
    import torch

    from fastmem.sweep import SweepSpec

    if out is not None:
        report, figures = out, out.parent / "reproduction"
    elif scale == "cpu":
        report, figures = REPO / "docs" / "reproduction.md", REPO / "docs" / "reproduction"
    else:
        report, figures = root / "reproduction.md", root / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    rel = lambda p: p.relative_to(report.parent).as_posix()  # noqa: E731
    lines = [f"# Reproducing “How LoRA Remembers?” on SmolLM2-135M-Instruct ({scale} scale)", "",
             f"- written {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC by `python -m benchmarks.reproduce "
             f"--scale {scale}`; runs in `{root.relative_to(REPO) if root.is_relative_to(REPO) else root}`",
             f"- device: CPU ({platform.machine()}, {os.cpu_count()} cores; each job's torch threads: "
             f"OMP_NUM_THREADS); torch {torch.__version__}, Python {platform.python_version()}; no GPU",
             "- stage wall times (s; a stage interrupted and resumed counts its last, completing run): "
             + (", ".join(f"{k} {v:.0f}" for k, v in timings.items()) or "none yet"),
             "- cells done per database (Σ of the cells' own wall times): "
             + (", ".join(_progress(root)) or "none yet"), ""]

    families = stages.law_families(scale)
    law_rows = analysis.rows(root / "law.sqlite")
    law_steps = SweepSpec.from_file(stages.config_path("law", scale)).max_steps
    lines += ["## 1. The memory law", "",
              f"{len(law_rows)} finished cells (config `{stages.config_path('law', scale).relative_to(REPO)}`). "
              "Fit ΔL = C·r^α·ℓ^-β + b by `fastmem fit`, cells with final loss < 0.69 left out (the paper's "
              "rule); 95% bootstrap intervals in brackets. Out of sample: LOO is each cell predicted by the law "
              "refitted on the family's other cells; the plane is the 3-parameter baseline ΔL = a + p·ln r + "
              "q·ln ℓ (least squares), in sample and, in parentheses, leave-one-out. Every R² and MAPE is "
              "computed on ΔL. A law whose LOO figures do not beat the plane's has not shown its power-law form "
              f"on those cells. Every cell ran a fixed {law_steps} steps, not to a plateau: these fits describe "
              "the loss drop within that budget, not a converged one.", ""]
    lines += analysis.law_table(root, families, figures) + [""]
    for name in families:
        for plot in ("fit_surface.png", "fit_residuals.png"):
            if (figures / f"law_{name}_{plot}").exists():
                lines.append(f"![{name} {plot}]({rel(figures / f'law_{name}_{plot}')})")
    lines.append("")

    plateau_rows = analysis.rows(root / "law_plateau.sqlite")
    if plateau_rows:
        converged = sum(bool(r["details"].get("stopped_on_plateau")) for r in plateau_rows)
        plateau = SweepSpec.from_file(stages.HERE / "law_plateau_cpu.toml")
        lines += ["### 1b. One family trained to a plateau", "",
                  f"{len(plateau_rows)} finished cells of `benchmarks/reproduce/law_plateau_cpu.toml` (random tokens, "
                  f"ranks {min(plateau.ranks)}–{max(plateau.ranks)} × ℓ {min(plateau.lengths)}–{max(plateau.lengths)}, "
                  f"{plateau.train['lr_schedule']} lr; the rule: none of the last {plateau.train['plateau_patience']} "
                  f"steps beat the best loss before them by more than {plateau.train['plateau_tol']:g} nats, cap "
                  f"{plateau.max_steps} steps): {converged} stopped on the plateau, "
                  f"{len(plateau_rows) - converged} at the cap. Fitted as section 1 (`--stages law_plateau`).", ""]
        lines += analysis.law_table(root, stages.LAW_PLATEAU_FAMILIES, figures, fit_dir="fit_plateau",
                                    prefix="law_plateau") + [""]
        lines += analysis.plateau_cells_table(plateau_rows) + [""]

    recall_lines, recall = analysis.recall_table(law_rows)
    facts = recall["facts"]
    lines += ["## 2. Is p > 0.5 on every token sufficient?", "",
              f"Every sequence of the law cells, greedy-decoded after training (fast-fail past its first wrong "
              f"token): {facts['sequences']} sequences, {facts['above']} with every token at p > 0.5, of which "
              f"{facts['above_decoded_exact']} of {facts['above_decoded']} decoded were recalled exactly "
              f"({facts['counterexamples']} counterexamples). Teacher-forced and decoded verdicts disagree on "
              f"{facts['disagreements']} sequences. A mean loss below ln 2 hid a token that breaks recall in "
              f"{facts['low_mean_loss_not_recalled']} of {facts['low_mean_loss']} sequences.", ""]
    lines += recall_lines + [""]
    lines += _figure(analysis.recall_figure, recall["sequences"], figures / "recall_min_p.png", "recall vs min p", rel)
    stubborn = stages.stubborn_settings()
    text, pictures = analysis.stubborn_case(
        root / "stubborn" / "eval" / "report.json", figures,
        f"{stubborn['objective'].upper()} at rank {stubborn['rank']} for {stubborn['max_steps']} steps as in the law "
        "grid, `stages.STUBBORN`")
    lines += [text, ""] if text else []
    lines += [f"![{p.stem}]({rel(p)})" for p in pictures] + ([""] if pictures else [])

    memft_rows = analysis.rows(root / "memft.sqlite")
    curriculum_rows = analysis.rows(root / "memft_curriculum.sqlite")
    lines += ["## 3. MemFT against SFT", "", f"Config `{stages.config_path('memft', scale).relative_to(REPO)}`.", ""]
    every = memft_rows + analysis.with_curriculum_label(curriculum_rows)
    lines += analysis.memft_table(every) + [""]
    lines += _figure(analysis.memft_figure, every, figures / "memft_vs_rank.png", "EM, token accuracy, steps vs rank",
                     rel)

    protocol = {"OT at ln 2": analysis.rows(root / "protocol_ln2.sqlite"),
                "authors' PhoneBook recipe (OT at ln 2 + their curriculum)":
                    analysis.rows(root / "protocol_curriculum.sqlite"),
                "OT at 0.1": analysis.rows(root / "protocol_0.1.sqlite"),
                "SFT on batches of 5, 1020 steps (the recipe's control)": analysis.rows(root / "protocol_batch5.sqlite")}
    if any(protocol.values()):
        lines += ["### 3b. MemFT against SFT under the authors' protocol, three seeds", "",
                  "Configs `benchmarks/reproduce/protocol_cpu.toml` and `protocol_curriculum_cpu.toml` (each "
                  "setting cites the authors' code in `authors.toml`): one MLP-block adapter at layer 20 (out = "
                  "mlp(x) + B·A·drop(x), scale 1), LoRA dropout 0.1, gradient norm clipped at 1.0, linear decay "
                  "without warm-up, AdamW lr 1e-2, budget runs with no stop rule (300 steps on the whole 20-entry book; the "
                  "curriculum recipe 1020 steps on batches of 5, their 300 epochs over its growing prefix, and "
                  "its control `protocol_batch5_cpu.toml`: SFT on batches of 5 for the same 1020 steps and "
                  "5,100 sample passes). A seed changes the book or the "
                  "random tokens and the adapter's init. EM: every sample greedy-decoded after the last step. "
                  "The first-step columns read the training forward, which runs with dropout on: a noisy "
                  "signal; in the runs on batches of 5 it is the step's 5 entries, not the whole book, so "
                  "a first all-correct step there can come before the book is recalled, or without it. Cells land as the stage runs; a group with fewer than three seeds is still running "
                  "(`python -m benchmarks.reproduce --scale cpu --stages protocol` resumes it).", ""]
        lines += analysis.protocol_table(protocol) + [""]

    names = stages.SUBSET_THRESHOLDS if scale == "subset" else tuple(stages.THRESHOLDS)
    threshold_lines, found = analysis.threshold_table(root, names)
    lines += ["## 4. The weighting threshold", "", f"Config `{stages.config_path('threshold', scale).relative_to(REPO)}`"
              " (one database per threshold); re-crossings: tokens that fell back above the recall line after "
              "crossing it, summed over the steps.", ""]
    lines += threshold_lines + [""]
    lines += _figure(analysis.threshold_figure, found, figures / "threshold_steps.png", "steps per threshold", rel)

    seeded = analysis.threshold_seeds_table(root, names)
    if len(seeded) > 2:
        lines += ["### 4b. The weighting threshold with the authors' clipping, three seeds", "",
                  "Config `benchmarks/reproduce/threshold_protocol_cpu.toml`: the study above with the gradient "
                  "norm clipped at 1.0 and seeds 42–44 (`--stages threshold_protocol`, one database per "
                  "threshold). Cells land as the stage runs.", ""]
        lines += seeded + [""]

    headline_lines, cells = analysis.headline_table(root, stages.headline_lengths(scale), stages.RECIPES)
    lines += ["## 5. Wall time to 100% exact recall", "",
              "Stress-test answers with 25% random tokens (`RECIPES` in stages.py). fastmem: fast engine, prefix "
              "cache, fused loss, the trainer's defaults (SFT) on `HEADLINE_LORA` (rank 16 on all 7 projections "
              "of layers 24–29); fastmem-ot: the same with MemFT-OT at the default threshold (0.1); hf-sft: plain "
              "transformers + PEFT SFT, same adapter; authors: their recipe as their code runs it (`AUTHORS_RECIPE`, "
              "each setting cited in authors.toml): one MLP-block adapter (rank 8, scale 1) at layer 20, dropout "
              "0.1, gradient norm clipped at 1.0, linear decay, OT at ln 2, full logits (`--engine hf`) and their "
              "per-step forward without the adapter executed in the loop (`--reference-forward`, inside each "
              "step's time). Wall = the steps' own time (Σ step_s of metrics.jsonl; model loading, prefix cache "
              "and the base / final passes left out for every recipe); CPU s = the same steps' process CPU seconds "
              "(Σ step_cpu_s; one torch thread: the work, which another job on the machine inflates less than the "
              "wall). The recipes run one after another, each beside whatever else the machine runs: compare "
              "walls within one length, and prefer the CPU column where they disagree. A baseline whose wall passes "
              "`HEADLINE_CAP` × fastmem's best is stopped there (checkpointed, resumable): its ratio is a "
              "measured lower bound (≥). Every finished run is then checked by `fastmem eval`.", ""]
    lines += headline_lines + [""]
    if not cells and scale == "cpu":
        lines += ["No headline run is in this repository yet. The table of the first runs (2026-11-29) was "
                  "computed from runs that were not kept; it is in `git show abc9b1a:docs/reproduction.md`, "
                  "section 5, and cannot be recomputed. `python -m benchmarks.reproduce --scale cpu --stages "
                  "headline` reruns it and keeps every run's metrics, summary and evaluation in "
                  "`benchmarks/results/reproduce/cpu/headline/`.", ""]
    lines += _figure(analysis.headline_figure, cells, figures / "headline_wall.png", "wall time to EM", rel)
    parts = analysis.parts_table(root, stages.headline_lengths(scale), stages.HEADLINE_PARTS)
    if len(parts) > 2:
        lines += ["### 5b. Where a step's time goes", "",
                  f"`--stages headline_parts` (`HEADLINE_PARTS` in stages.py): on each headline answer, short runs "
                  f"({stages.PARTS_STEPS} steps, the first a warm-up left out) of the authors' adapter and objective "
                  "(OT at ln 2, clipping, dropout 0.1), each rung changing one thing from the rung above, then "
                  "fastmem's recipe. CPU s: the process's CPU seconds a step (one torch thread; the work done, "
                  "which other jobs on the machine inflate less than the wall). These are a run's first steps, "
                  "where nearly every token still trains: the fast engine skipping recalled rows later in a run "
                  "is not in them. The steps a recipe needs are section 5's.", ""]
        lines += parts + [""]
    steps = analysis.steps_table(root, stages.headline_lengths(scale), stages.HEADLINE_STEPS, stages.RECIPES)
    if any(f"| {what} |" in line for line in steps for _, what, _ in stages.HEADLINE_STEPS):
        lines += ["### 5c. Where the steps go", "",
                  "`--stages headline_steps` (`HEADLINE_STEPS` in stages.py): the authors' adapter and optimizer "
                  "(MLP block at layer 20, rank 8, dropout 0.1, clipping, linear decay over the headline's budget) "
                  "on fastmem's engine, each trained to 100% recall (every answer token at p > 0.5) on the "
                  "headline's first answer (why not the 4,096-token one: `HEADLINE_STEPS`), under OT at ln 2 (their objective), OT at 0.1 and SFT; beside them the "
                  "headline's runs of the authors' recipe as run and of fastmem's recipe. Between the first two "
                  "rows only the engine and the reference forward differ, not the arithmetic of a step, so their "
                  "steps differ only by rounding and dropout's draws; down the rest one thing changes a row: the "
                  "threshold (ln 2 → 0.1), the objective (OT → SFT), the adapter (theirs → fastmem's "
                  "`HEADLINE_LORA`). A run stopped before recall gives a lower bound (≥).", ""]
        lines += steps + [""]
        agreement = analysis.steps_agreement(root, stages.headline_lengths(scale))
        lines += [" ".join(agreement), ""] if agreement else []
    discussion = stages.HERE / f"discussion_{scale}.md"
    if discussion.exists():
        lines += [discussion.read_text().rstrip(), ""]
    lines += ["## How this was run", "", f"`python -m benchmarks.reproduce --scale {scale}` ran these fastmem commands "
              "(from the stages' logs, paths relative to the repository):", "", "```"]
    lines += analysis.commands(root, REPO) or ["(none logged yet)"]
    lines += ["```", ""]
    report.write_text("\n".join(lines) + "\n")
    return report


if __name__ == "__main__":
    raise SystemExit(main())
