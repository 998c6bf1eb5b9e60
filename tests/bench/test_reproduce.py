"""The reproduction driver (benchmarks/reproduce): its commands and its report, without training."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from benchmarks.reproduce import __main__ as driver
from benchmarks.reproduce import stages
from fastmem.sweep import ResultsStore, SweepSpec


def _finished_db(path, cells_details):
    """A sweep database whose cells are done with the given (result, details) values."""
    spec = SweepSpec(ranks=[r for r, _ in cells_details], lengths=[64], ratios=[1.0])
    store = ResultsStore(path)
    cells = spec.cells()
    store.add_cells(cells)
    for cell, (_, result) in zip(cells, cells_details):
        key = store.claim([cell.key], "me")
        store.complete(key, {"base_loss": 10.0, "final_loss": result.pop("final_loss", 1.0), "delta_loss": 9.0,
                             "token_acc": 0.5, "exact_match": result.pop("exact_match", 0.0), "steps": 40,
                             "wall_s": 3.0, **result}, "me")


def test_report_of_the_recall_check(tmp_path):
    _finished_db(tmp_path / "law.sqlite", [
        (1, {"min_p_per_sample": [0.2], "mean_loss_per_sample": [0.3], "teacher_forced_em_per_sample": [False],
             "decoded_em_per_sample": [False]}),
        (2, {"min_p_per_sample": [0.7], "mean_loss_per_sample": [0.01], "teacher_forced_em_per_sample": [True],
             "decoded_em_per_sample": [True], "exact_match": 1.0}),
    ])
    report = driver.write_report(tmp_path, "subset", {"law": 12.0})
    text = report.read_text()
    assert report == tmp_path / "reproduction.md"
    # one sequence above the line, decoded exactly; one with a low mean loss hiding a stubborn token
    assert "1 with every token at p > 0.5, of which 1 of 1 decoded were recalled exactly (0 counterexamples)" in text
    assert "in 1 of 2 sequences" in text and "| p_min > 0.5 | 1 | 1 | 1 | 1 |" in text
    assert (tmp_path / "figures" / "recall_min_p.png").is_file()
    assert "not fitted yet" in text  # no fit.json: said so, not invented


def test_threshold_stage_writes_one_config_per_threshold(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(stages, "fastmem", lambda *args, log=None: calls.append(args))
    stages.run_threshold(tmp_path, "subset")
    dbs = [args[args.index("--db") + 1] for args in calls]
    assert [p.rsplit("/", 1)[1] for p in dbs] == ["threshold_ln2.sqlite", "threshold_0.3.sqlite",
                                                 "threshold_sft.sqlite"]
    ln2 = SweepSpec.from_file(tmp_path / "threshold_ln2.toml")
    assert ln2.threshold == pytest.approx(math.log(2)) and ln2.stop_on_recall and ln2.objectives == ["ot"]
    assert SweepSpec.from_file(tmp_path / "threshold_sft.toml").objectives == ["sft"]


@pytest.mark.parametrize("scale", ["subset", "cpu"])
def test_every_stage_config_is_a_valid_sweep(scale):
    for stage in ("law", "memft", "threshold"):
        spec = SweepSpec.from_file(stages.config_path(stage, scale))
        assert spec.cells(), stage
    if scale == "cpu":
        assert len(SweepSpec.from_file(stages.config_path("law", scale)).cells()) == 6 * 5 * (3 + 1)


def test_headline_reads_finished_runs(tmp_path):
    out = tmp_path / "headline"
    for name, steps, step_s in (("fastmem", 50, 2.0), ("authors", 80, 10.0)):
        run = out / f"256-{name}"
        run.mkdir(parents=True)
        # summary.json's wall_s covers only the last process of a resumed run: the steps' own
        # times (metrics.jsonl) are what counts, a step redone after the resume once
        (run / "summary.json").write_text(json.dumps({"steps": steps, "wall_s": 1.0, "stopped_on_recall": True}))
        ref = {"reference_s": 2.0} if name == "authors" else {}  # inside step_s (--reference-forward)
        rows = [{"step": i, "step_s": step_s, "step_cpu_s": step_s - 1.0, **ref}
                for i in (*range(1, 11), *range(10, steps + 1))]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines, cells = driver.analysis.headline_table(tmp_path, (256,), stages.RECIPES)
    authors = next(c for c in cells if c["recipe"] == "authors")
    assert authors["wall"] == pytest.approx(800.0) and authors["ref_s"] == 2.0
    assert authors["cpu"] == pytest.approx(720.0)
    assert "| 800 | 720 |" in "\n".join(lines) and "| 8.00× | 14.40× |" in "\n".join(lines)  # vs fastmem's best
    # a baseline interrupted before recall (no summary.json yet) counts as a lower bound
    (out / "256-hf-sft").mkdir()
    (out / "256-hf-sft" / "metrics.jsonl").write_text("".join(
        json.dumps({"step": i, "step_s": 5.0, "stubborn_tokens": 7}) + "\n" for i in range(1, 41)))
    lines, cells = driver.analysis.headline_table(tmp_path, (256,), stages.RECIPES)
    assert "| 256 | hf-sft | 40 (unfinished (interrupted, resumable), 7 tokens still at p ≤ 0.5) |" in "\n".join(lines)
    assert "> 200 | – |" in lines[-1] and lines[-1].endswith("≥ 2.00× | – |")  # no CPU seconds logged


def test_databases_are_kept_and_restored(tmp_path):
    root, kept, fresh = tmp_path / "runs", tmp_path / "kept", tmp_path / "fresh"
    root.mkdir()
    _finished_db(root / "law.sqlite", [(1, {"min_p_per_sample": [0.9]})])
    driver.keep_databases(root, kept)
    fresh.mkdir()
    driver.restore_databases(kept, fresh)
    assert [r["rank"] for r in ResultsStore(fresh / "law.sqlite").rows()] == [1]
    _finished_db(fresh / "memft.sqlite", [(2, {})])
    driver.restore_databases(kept, fresh)  # never overwrites what a machine already has
    assert (fresh / "memft.sqlite").exists() and len(ResultsStore(fresh / "law.sqlite").rows()) == 1


def test_the_run_files_the_report_reads_are_kept_and_restored(tmp_path):
    root, kept, fresh = tmp_path / "runs", tmp_path / "kept", tmp_path / "fresh"
    files = {"stubborn/eval/report.json": "{}", "headline/capped_note.json": "{}",
             "headline/1024-authors/metrics.jsonl": "{}\n", "headline/1024-authors-eval/report.json": "{}"}
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (root / "headline/1024-authors/checkpoints").mkdir()
    (root / "headline/1024-authors/checkpoints/state.pt").write_text("big")  # not kept
    driver.keep_databases(root, kept)
    assert sorted(p.relative_to(kept).as_posix() for p in kept.rglob("*") if p.is_file()) == sorted(files)
    driver.restore_databases(kept, fresh)
    assert all((fresh / name).read_text() == text for name, text in files.items())


_FAKE_TRAINER = """
import json, signal, sys, time
signal.signal(signal.SIGINT, lambda *_: sys.exit(130))
with open(sys.argv[1], "a") as f:
    for step in range(1, int(sys.argv[2]) + 1):
        f.write(json.dumps({"step": step, "step_s": 1.0}) + "\\n")
        f.flush()
        time.sleep(0.05)
"""


@pytest.mark.parametrize("steps, finished", [(3, True), (400, False)])
def test_a_baseline_is_stopped_at_its_wall_time_cap(tmp_path, steps, finished):
    metrics = tmp_path / "metrics.jsonl"
    command = [sys.executable, "-c", _FAKE_TRAINER, str(metrics), str(steps)]
    # 1 s a step + 0.5 s of reference forward: the cap of 15 s is passed at step 11
    assert stages.run_capped(command, metrics, 15.0, 0.5, tmp_path / "log", poll_s=0.05) is finished
    seen = len(metrics.read_text().splitlines())
    assert seen == steps if finished else 10 <= seen < 60


def test_a_failing_baseline_raises(tmp_path):
    with pytest.raises(subprocess.CalledProcessError):
        stages.run_capped([sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "m.jsonl", 15.0, 0.0,
                          tmp_path / "log", poll_s=0.01)


def test_report_lists_the_logged_commands_once_with_relative_paths(tmp_path):
    (tmp_path / "headline").mkdir()
    (tmp_path / "law.log").write_text(f"$ fastmem sweep --db {tmp_path}/law.sqlite\nsome output\n"
                                      f"$ fastmem sweep --db {tmp_path}/law.sqlite\n")
    (tmp_path / "headline" / "headline.log").write_text(f"$ fastmem train --out {tmp_path}/headline/run\n")
    assert driver.analysis.commands(tmp_path, tmp_path) == ["$ fastmem train --out headline/run",
                                                            "$ fastmem sweep --db law.sqlite"]


def test_memft_table_marks_the_runs_that_spent_their_budget():
    row = {"data": "stress", "ratio": 0.25, "length": 256, "rank": 1, "wall_s": 1.0}
    lines = driver.analysis.memft_table(
        [{**row, "objective": "sft", "steps": 300, "exact_match": 0.0, "token_acc": 0.9, "details": {}},
         {**row, "objective": "ot", "steps": 80, "exact_match": 1.0, "token_acc": 1.0,
          "details": {"stopped_on_recall": True}}])
    assert "| stress | 0.25 | 256 | 1 | > 300 (EM 0%, acc 0.900) | **80** |" in lines


def test_a_family_too_small_to_fit_is_reported_not_fatal(tmp_path):
    _finished_db(tmp_path / "law.sqlite", [(1, {"final_loss": 2.0}), (2, {"final_loss": 1.5})])
    out = tmp_path / "fit" / "stress_rho1"
    stages.fit_family(tmp_path / "law.sqlite", out, [], log=tmp_path / "law.log")
    assert "need at least 5 runs" in (out / "not_fitted.txt").read_text()
    lines = driver.analysis.law_table(tmp_path, {"stress_rho1": []}, tmp_path)
    assert lines[-1].startswith("| stress_rho1 | not fitted: ") and "need at least 5 runs" in lines[-1]
    assert "$ fastmem fit --db" in (tmp_path / "law.log").read_text()


def test_law_table_shows_the_out_of_sample_figures_beside_the_in_sample_ones(tmp_path):
    from fastmem.law import fit_law

    ranks, lengths = [1, 1, 2, 1, 2, 4, 4], [256, 512, 512, 1024, 1024, 1024, 256]
    delta = [40 * r ** 0.4 * n ** -0.6 + 0.5 for r, n in zip(ranks, lengths)]
    delta[3] *= 1.1  # off the law: LOO and in-sample figures differ
    fit = fit_law(ranks, lengths, delta, bootstrap=0)
    (tmp_path / "fit" / "stress_rho0").mkdir(parents=True)
    fit.to_json(tmp_path / "fit" / "stress_rho0" / "fit.json")
    old = json.loads(fit.to_json())
    for name in ("r2_loo", "mape_loo", "loo_failed", "plane"):
        old.pop(name)
    (tmp_path / "fit" / "phonebook").mkdir()
    (tmp_path / "fit" / "phonebook" / "fit.json").write_text(json.dumps(old))
    lines = driver.analysis.law_table(tmp_path, {"stress_rho0": [], "phonebook": [], "pooled": []}, tmp_path)
    assert lines[0].count("|") == lines[1].count("|") == 13
    assert all(line.count("|") == 13 for line in lines)
    row = lines[2].split(" | ")
    assert row[8:] == [f"{fit.r2_loo:.3g}", f"{fit.mape_loo:.3g}", f"{fit.plane.r2:.3g} ({fit.plane.r2_loo:.3g})",
                       f"{fit.plane.mape:.3g} ({fit.plane.mape_loo:.3g}) |"]
    assert lines[3].endswith("| – | – | – (–) | – (–) |")  # a fit.json from before the check: not invented
    assert lines[4].startswith("| pooled | not fitted yet |")


def test_discussion_quotes_what_the_committed_databases_hold():
    """The hand-written discussion's figures, recomputed from the committed cpu databases."""
    from fastmem.law import fit_law, load_runs

    kept = driver.KEPT / "cpu"
    text = " ".join((stages.HERE / "discussion_cpu.md").read_text().split())
    facts = driver.analysis.recall_table(driver.analysis.rows(kept / "law.sqlite"))[1]["facts"]
    low, hidden = facts["low_mean_loss"], facts["low_mean_loss_not_recalled"]
    assert f"of the {low} sequences with a mean loss below ln 2, {hidden} ({hidden / low:.0%}) were not recalled" in text
    assert f"all {facts['above']} sequences whose tokens all had p > 0.5" in text and facts["counterexamples"] == 0
    stubborn = next(r for r in driver.analysis.rows(kept / "law.sqlite")
                    if (r["data"], r["ratio"], r["length"], r["rank"]) == ("stress", 0.0, 256, 2))
    wrong = round((1 - stubborn["token_acc"]) * 256)
    assert f"{stubborn['stubborn_tokens']} tokens at p ≤ 0.5, of which {wrong} are not the argmax" in text
    sw_rank2 = next(r for r in driver.analysis.rows(kept / "memft.sqlite")
                    if (r["data"], r["rank"], r["objective"]) == ("stress", 2, "sw"))
    assert sw_rank2["exact_match"] == 0.0 and f"token accuracy {sw_rank2['token_acc']:.3f} after 300 steps" in text
    # The out-of-sample figures of the families the text quotes (ρ 0 is left to the report's
    # table: one of its refits takes ~10^5 evaluations).
    for where, loo, plane_loo in ((["data=phonebook"], "0.64", "0.75"), (["data=stress", "ratio=0.5"], "0.977", "0.835"),
                                  (["data=stress", "ratio=1.0"], "0.922", "0.693")):
        runs = load_runs(db=kept / "law.sqlite", where=where)
        fit = fit_law(runs.rank, runs.length, runs.delta_loss, runs.final_loss, layers=runs.layers, bootstrap=0)
        assert (f"{fit.r2_loo:.{len(loo) - 2}f}", f"{fit.plane.r2_loo:.{len(plane_loo) - 2}f}") == (loo, plane_loo)
        assert loo in text and plane_loo in text


def test_protocol_stage_runs_sft_once_then_the_curriculum_then_ot_at_0_1(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(stages, "fastmem", lambda *args, log=None: calls.append(args))
    stages.run_protocol(tmp_path, "cpu")
    dbs = [args[args.index("--db") + 1].rsplit("/", 1)[1] for args in calls]
    assert dbs == ["protocol_ln2.sqlite", "protocol_curriculum.sqlite", "protocol_0.1.sqlite", "protocol_batch5.sqlite"]
    control, recipe = (SweepSpec.from_file(stages.HERE / f"protocol_{n}_cpu.toml") for n in ("batch5", "curriculum"))
    # the control trains plain SFT with the recipe's batches and number of updates
    assert control.objectives == ["sft"] and not control.curriculum
    assert (control.batch_size, control.max_steps, control.layers) == (recipe.batch_size, recipe.max_steps, recipe.layers)
    ln2, ot01 = (SweepSpec.from_file(tmp_path / f"protocol_{n}.toml") for n in ("ln2", "0.1"))
    assert ln2.objectives == ["sft", "ot"] and ot01.objectives == ["ot"]
    assert ln2.threshold == pytest.approx(math.log(2)) and ot01.threshold == pytest.approx(0.1)
    assert len(ln2.seeds) >= 3 and ln2.train["max_grad_norm"] == 1.0 and ln2.train["adapter"] == "mlp_block"


def test_protocol_table_pools_seeds_and_names_sft_once():
    def cell(objective, seed, em, acc, first):
        decoded = [True] * em + [False] * (2 - em)
        return {"data": "phonebook", "ratio": 0.0, "rank": 1, "objective": objective, "seed": seed,
                "token_acc": acc, "final_loss": 0.1 * seed, "details": {
                    "decoded_em_per_sample": decoded, "first_em_step": first, "first_recall_step": None}}
    lines = driver.analysis.protocol_table({
        "OT at ln 2": [cell("sft", 1, 1, 0.9, None), cell("sft", 2, 2, 1.0, 40), cell("ot", 1, 2, 1.0, 30)],
        "OT at 0.1": [cell("ot", 1, 2, 1.0, 20)], "SFT, a control": [cell("sft", 1, 0, 0.5, None)]})
    assert lines[2] == ("| phonebook | 1 | SFT | 2 | 1: 50%, 2: 100% | 1/2 | 0.95 ± 0.071 | 0.15 ± 0.071 "
                        "| –, 40 | –, – |")
    assert lines[3].startswith("| phonebook | 1 | OT at ln 2 | 1 | 1: 100% | 1/1 |")
    assert lines[4].startswith("| phonebook | 1 | OT at 0.1 | 1 |")
    assert lines[5].startswith("| phonebook | 1 | SFT, a control | 1 | 1: 0% |") and len(lines) == 6


def test_the_authors_headline_recipe_is_their_protocol_with_the_reference_forward_in_the_loop():
    name, engine, objective, threshold, flags = next(r for r in stages.RECIPES if r[0] == "authors")
    assert engine == "hf" and objective == "ot" and threshold == pytest.approx(math.log(2))
    assert "--reference-forward" in flags
    pairs = [f for f in flags if f != "--reference-forward"]
    settings = dict(zip(pairs[::2], pairs[1::2]))
    assert settings["--adapter"] == "mlp_block" and settings["--dropout"] == "0.1"
    assert settings["--max-grad-norm"] == "1.0" and settings["--rank"] == settings["--alpha"]


def test_threshold_protocol_stage_clips_and_seeds_every_threshold(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(stages, "fastmem", lambda *args, log=None: calls.append(args))
    stages.run_threshold_protocol(tmp_path, "cpu")
    dbs = [args[args.index("--db") + 1].rsplit("/", 1)[1] for args in calls]
    assert dbs == [f"threshold_protocol_{n}.sqlite" for n in (*stages.THRESHOLDS, "sft")]
    for name in (*stages.THRESHOLDS, "sft"):
        spec = SweepSpec.from_file(tmp_path / f"threshold_protocol_{name}.toml")
        assert spec.train["max_grad_norm"] == 1.0 and len(spec.seeds) == 3
        assert spec.objectives == (["sft"] if name == "sft" else ["ot", "sw"])
    assert SweepSpec.from_file(tmp_path / "threshold_protocol_0.3.toml").threshold == 0.3


def test_threshold_seeds_table_counts_recalled_seeds(tmp_path):
    spec = SweepSpec(ranks=[8], lengths=[64], ratios=[0.25], objectives=["ot"], seeds=[42, 43, 44])
    store = ResultsStore(tmp_path / "threshold_protocol_ln2.sqlite")
    cells = spec.cells()
    store.add_cells(cells)
    for cell, (steps, recalled, recrossed) in zip(cells, ((100, True, 3), (140, True, 5), (400, False, 10))):
        key = store.claim([cell.key], "me")
        store.complete(key, {"final_loss": 0.1, "token_acc": 1.0, "exact_match": float(recalled), "steps": steps,
                             "wall_s": 1.0, "stopped_on_recall": recalled, "recrossings": recrossed}, "me")
    lines = driver.analysis.threshold_seeds_table(tmp_path, ("ln2",))
    assert lines[2] == "| stress | 0.25 | ot | ln2 | 3 | 2/3 | 100, 140, 400 (budget) | 120 ± 28 | 6 ± 3.6 |"


def test_law_plateau_stage_sweeps_then_fits_one_family(tmp_path, monkeypatch):
    calls, fits = [], []
    monkeypatch.setattr(stages, "fastmem", lambda *args, log=None: calls.append(args))
    monkeypatch.setattr(stages, "fit_family", lambda db, out, where, log: fits.append((db.name, out.name, where)))
    stages.run_law_plateau(tmp_path, "cpu")
    spec = SweepSpec.from_file(stages.HERE / "law_plateau_cpu.toml")
    assert calls[0][calls[0].index("--db") + 1].endswith("law_plateau.sqlite") and len(spec.cells()) >= 12
    assert spec.train["plateau_patience"] > 0 and spec.train["lr_schedule"] == "constant"
    assert fits == [("law_plateau.sqlite", "stress_rho1", ["--where", "data=stress", "--where", "ratio=1.0"])]


def test_plateau_cells_table_says_how_each_cell_ended_and_whether_the_fit_keeps_it():
    cell = {"base_loss": 11.0, "details": {}}
    lines = driver.analysis.plateau_cells_table([
        {**cell, "length": 256, "rank": 1, "steps": 120, "final_loss": 5.0, "delta_loss": 6.0,
         "details": {"stopped_on_plateau": True}},
        {**cell, "length": 256, "rank": 16, "steps": 800, "final_loss": 0.2, "delta_loss": 10.8}])
    assert lines[2] == "| 256 | 1 | 120 | plateau | 11 | 5 | 6 | yes |"
    assert lines[3] == "| 256 | 16 | 800 | cap | 11 | 0.2 | 10.8 | no (saturated) |"


def test_the_committed_report_is_what_the_committed_files_rebuild(tmp_path):
    """docs/reproduction.md below its header (date, machine, progress) is exactly what
    `--report-only` writes from benchmarks/results/reproduce/cpu on a fresh machine."""
    root = tmp_path / "runs"
    root.mkdir()
    driver.restore_databases(driver.KEPT / "cpu", root)
    rebuilt = driver.write_report(root, "cpu", driver._load_timings(root), out=tmp_path / "reproduction.md")
    body = lambda text: text[text.index("## 1. The memory law"):]  # noqa: E731
    committed = (driver.REPO / "docs" / "reproduction.md").read_text()
    assert body(rebuilt.read_text()) == body(committed), "rerun `python -m benchmarks.reproduce --scale cpu --report-only`"


def test_a_sweep_that_leaves_cells_to_another_driver_does_not_stop_the_stage(tmp_path, monkeypatch):
    spec = SweepSpec(ranks=[1, 2], lengths=[64], ratios=[1.0])
    db = tmp_path / "grid.sqlite"
    store = ResultsStore(db)
    cells = spec.cells()
    store.add_cells(cells)
    store.claim([cells[0].key], "other-driver")  # still training elsewhere
    key = store.claim([cells[1].key], "me")
    store.complete(key, {"final_loss": 1.0, "steps": 1, "wall_s": 1.0}, "me")
    exit_one = lambda *a, **k: subprocess.CompletedProcess(a, 1)  # noqa: E731  (what fastmem sweep returns then)
    monkeypatch.setattr(stages.subprocess, "run", exit_one)
    stages.fastmem("sweep", "--db", str(db), log=tmp_path / "log")  # no raise
    store.add_cells(SweepSpec(ranks=[4], lengths=[64], ratios=[1.0]).cells())  # a pending cell: a failure
    with pytest.raises(subprocess.CalledProcessError):
        stages.fastmem("sweep", "--db", str(db), log=tmp_path / "log")
    with pytest.raises(subprocess.CalledProcessError):
        stages.fastmem("train", "--data", "x", log=tmp_path / "log")


def test_headline_parts_stage_runs_each_rung_with_its_environment(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(stages, "fastmem", lambda *args, log=None, env=None: calls.append((args, env)))
    monkeypatch.setattr(stages, "write_stress_data", lambda path, length, ratio: path.write_text("{}\n"))
    stages.run_headline_parts(tmp_path, "cpu")
    runs = {args[args.index("--out") + 1].rsplit("/", 1)[1]: (args, env) for args, env in calls}
    assert list(runs) == [f"{n}-{slug}" for n in (1024, 4096) for slug, *_ in stages.HEADLINE_PARTS]
    assert "--reference-forward" in runs["1024-authors"][0]
    assert "--reference-forward" not in runs["1024-no-reference"][0]
    assert "--no-prefix-cache" in runs["1024-fast-no-cache-mkl"][0]
    assert "--no-prefix-cache" not in runs["1024-fast-mkl"][0]
    assert runs["1024-fast-mkl"][1] == {"FASTMEM_CPU_GEMM": "mkl"}
    assert runs["1024-fast"][1] == {"FASTMEM_CPU_GEMM": "auto"}
    for name, (args, _) in runs.items():  # every rung trains the headline's answer for the same few steps
        length = name.split("-")[0]
        assert args[args.index("--data") + 1].endswith(f"headline/stress_{length}_rho0.25.jsonl")
        assert args[args.index("--max-steps") + 1] == str(stages.PARTS_STEPS)
    (tmp_path / "headline_parts" / "1024-authors").mkdir(parents=True)
    (tmp_path / "headline_parts" / "1024-authors" / "summary.json").write_text("{}")
    calls.clear()
    stages.run_headline_parts(tmp_path, "cpu")  # a finished rung is not rerun
    assert len(calls) == 2 * len(stages.HEADLINE_PARTS) - 1


def test_every_headline_rung_trains_on_a_tiny_checkpoint(tmp_path, monkeypatch, request):
    """Each rung's flags, with its layers moved onto a 4-layer model, run end to end (the
    combinations no other test makes: e.g. the MLP-block adapter on the fast engine without
    the prefix cache) and leave what the parts table reads."""
    from fastmem.cli import main
    from fastmem.ops import cpu_gemm
    from tests.train.tiny_cli_model import save_tiny_checkpoint

    request.addfinalizer(cpu_gemm.cpu_gemm_route.cache_clear)  # leave no rung's route to later tests
    checkpoint = save_tiny_checkpoint(tmp_path / "ckpt")
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "what is the code of alice", "answer": "red blue seven two"}) + "\n")
    root = tmp_path / "root"
    for slug, _, flags, env in stages.HEADLINE_PARTS:
        flags = list(flags)
        flags[flags.index("--layers") + 1] = "2" if "mlp_block" in flags else "2,3"
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        cpu_gemm.cpu_gemm_route.cache_clear()  # a process decides its route once; each rung is a process
        code = main(["train", "--data", str(data), "--model", str(checkpoint), *flags, "--max-steps", "3",
                     "--out", str(root / "headline_parts" / f"64-{slug}"), "--no-progress"])
        assert code == 0, slug
    lines = driver.analysis.parts_table(root, (64,), stages.HEADLINE_PARTS)
    assert len(lines) == 2 + len(stages.HEADLINE_PARTS)
    assert lines[2].split(" | ")[4:6] == ["–", "1.00×"]  # the first rung: nothing above, itself
    assert "| mkl |" in lines[4] and "| torch F.linear |" in lines[2]


def test_parts_table_leaves_out_the_warm_up_step(tmp_path):
    for slug, cpu in (("authors", 10.0), ("no-reference", 6.0), ("fast", 1.5)):
        run = tmp_path / "headline_parts" / f"1024-{slug}"
        run.mkdir(parents=True)
        rows = [{"step": 1, "step_s": 99.0, "step_cpu_s": 99.0}] + [
            {"step": i, "step_s": 2 * cpu, "step_cpu_s": cpu} for i in (2, 3, 4)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        route = {"cpu_gemm": "mkl"} if slug == "fast" else {}
        (run / "summary.json").write_text(json.dumps({"peak_mem_bytes": 2**30, **route}))
    lines = driver.analysis.parts_table(tmp_path, (1024,), stages.HEADLINE_PARTS)
    assert lines[2].startswith("| 1024 | the authors' loop as run") and lines[2].endswith(
        "| 10.00 | 20.00 | – | 1.00× | torch F.linear | 1.00 |")
    assert lines[3].endswith("| 6.00 | 12.00 | 0.60× | 0.60× | torch F.linear | 1.00 |")
    assert lines[4].endswith("| 1.50 | 3.00 | 0.25× | 0.15× | mkl | 1.00 |") and len(lines) == 5


def test_a_headline_run_restored_unfinished_from_git_starts_over(tmp_path, monkeypatch):
    """A clone gets an unfinished run's metrics.jsonl from git but not its checkpoints: the
    trainer would refuse that directory, so the stage starts the run over; a run this machine
    trained (run.json there) is left for the trainer to resume."""
    calls = []
    monkeypatch.setattr(stages, "fastmem_capped", lambda args, *a, **k: calls.append(args) or True)
    monkeypatch.setattr(stages, "fastmem", lambda *args, log=None, env=None: None)
    monkeypatch.setattr(stages, "write_stress_data", lambda path, length, ratio: path.write_text("{}\n"))
    monkeypatch.setattr(stages, "RECIPES", stages.RECIPES[:1])
    restored, resumable = tmp_path / "headline" / "1024-fastmem", tmp_path / "headline" / "4096-fastmem"
    for run in (restored, resumable):
        run.mkdir(parents=True)
        (run / "metrics.jsonl").write_text('{"step": 1, "step_s": 1.0}\n')
    (resumable / "run.json").write_text("{}")
    stages.run_headline(tmp_path, "cpu")
    assert [args[args.index("--out") + 1] for args in calls] == [str(restored), str(resumable)]
    assert not (restored / "metrics.jsonl").exists()
    assert (resumable / "metrics.jsonl").exists()
    assert "starting it over" in (tmp_path / "headline" / "headline.log").read_text()


def test_headline_steps_stage_trains_each_objective_on_the_authors_adapter(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(stages, "fastmem", lambda *args, log=None, env=None: calls.append(args))
    monkeypatch.setattr(stages, "write_stress_data", lambda path, length, ratio: path.write_text("{}\n"))
    stages.run_headline_steps(tmp_path, "cpu")
    runs = {args[args.index("--out") + 1].rsplit("/", 1)[1]: args for args in calls}
    assert list(runs) == [f"1024-{slug}" for slug, *_ in stages.HEADLINE_STEPS]  # not 4096: see HEADLINE_STEPS
    for name, args in runs.items():
        length = int(name.split("-")[0])
        assert args[args.index("--engine") + 1] == "fast" and "--reference-forward" not in args
        assert args[args.index("--adapter") + 1] == "mlp_block" and args[args.index("--max-grad-norm") + 1] == "1.0"
        assert args[args.index("--max-steps") + 1] == str(stages.headline_max_steps(length))
    assert runs["1024-ot-ln2"][runs["1024-ot-ln2"].index("--threshold") + 1] == repr(math.log(2.0))
    assert runs["1024-ot-0.1"][runs["1024-ot-0.1"].index("--threshold") + 1] == "0.1"
    assert runs["1024-sft"][runs["1024-sft"].index("--objective") + 1] == "sft"


def test_steps_table_sets_each_run_against_ot_at_ln2_on_the_same_adapter(tmp_path):
    def run(path, steps, recalled, cpu_s=1.0, tokens_left=0, loss=1.0, final_left=None):
        path.mkdir(parents=True)
        rows = [{"step": i, "step_s": cpu_s, "step_cpu_s": cpu_s, "stubborn_tokens": tokens_left, "loss": loss}
                for i in range(1, steps + 1)]
        (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        if recalled is not None:
            final = {} if final_left is None else {"stubborn_tokens": final_left}  # the final pass's count
            (path / "summary.json").write_text(json.dumps({"stopped_on_recall": recalled, **final}))

    run(tmp_path / "headline" / "1024-authors", 50, None, cpu_s=10.0, tokens_left=9, loss=1.25)  # still running
    run(tmp_path / "headline" / "1024-fastmem", 30, True, cpu_s=3.0)
    run(tmp_path / "headline_steps" / "1024-ot-ln2", 200, True, cpu_s=4.0)
    run(tmp_path / "headline_steps" / "1024-sft", 400, False, cpu_s=4.0, tokens_left=3, final_left=2)  # budget spent
    lines = driver.analysis.steps_table(tmp_path, (1024,), stages.HEADLINE_STEPS, stages.RECIPES)
    text = "\n".join(lines)
    assert len(lines) == 2 + 4  # ot-0.1 not run yet: left out
    assert "| 50 (unfinished (interrupted, resumable), 9 tokens still at p ≤ 0.5) | 10.00 | > 500 | ≥ 0.25× |" in text
    assert "| 200 | 4.00 | 800 | 1.00× |" in text
    assert "| 400 (budget spent, 2 tokens at p ≤ 0.5 after it) | 4.00 | > 1600 | ≥ 2.00× |" in text
    assert lines[-1].endswith("| 30 | 3.00 | 90 | 0.15× |")
    assert driver.analysis.steps_agreement(tmp_path, (1024,)) == [
        "At 1024 tokens the two engines ran the authors' recipe step for step: over their 50 common steps the "
        "training losses differ by at most 0.25 nats a token and the counts of tokens at p ≤ 0.5 by at most 9."]
