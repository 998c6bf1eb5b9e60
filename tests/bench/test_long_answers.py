"""The long-answer runner (benchmarks/long_answers.py): its run names, commands and report, without training."""

from __future__ import annotations

import json

import pytest

from benchmarks import long_answers


@pytest.fixture
def roots(tmp_path, monkeypatch):
    monkeypatch.setattr(long_answers, "ROOT", tmp_path / "runs")
    monkeypatch.setattr(long_answers, "RESULTS", tmp_path / "results")
    return tmp_path


def test_run_names_round_trip_and_bad_names_stop():
    run = long_answers.LongRun.parse("12288-rho0.25-ot")
    assert (run.length, run.ratio, run.objective, run.name) == (12288, 0.25, "ot", "12288-rho0.25-ot")
    assert run.context == 12288 + long_answers.PROMPT_ROOM
    with pytest.raises(SystemExit):
        long_answers.LongRun.parse("12k-sft")


def _fake_run(run, steps, finished, recalled=True, evaluated=False):
    run.out.mkdir(parents=True)
    rows = [{"step": s, "step_s": 10.0 + s, "token_acc": s / steps, "stubborn_tokens": steps - s, "min_p": 0.1}
            for s in range(1, steps + 1)]
    rows.append(dict(rows[-1], step_s=99.0))  # the last step written again by a resumed process
    (run.out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run.logs.parent.mkdir(parents=True, exist_ok=True)
    run.logs.with_name(run.name + ".train.time.1.txt").write_text("\tMaximum resident set size (kbytes): 2097152\n")
    run.logs.with_name(run.name + ".train.time.2.txt").write_text("\tMaximum resident set size (kbytes): 3145728\n")
    if finished:
        (run.out / "summary.json").write_text(json.dumps({"steps": steps, "stopped_on_recall": recalled}))
    if evaluated:
        (run.out / "eval").mkdir()
        (run.out / "eval" / "report.json").write_text(json.dumps({
            "records": [{"exact_match": True, "token_acc": 1.0, "first_error": -1, "min_prob": 0.6,
                         "decode_agrees": True}],
            "timing": {"teacher_forcing_s": 12.5, "decoding_s": 300.0}}))


def test_collect_counts_a_resumed_step_once_and_takes_the_largest_peak(roots):
    run = long_answers.LongRun.parse("8192-rho0-sft")
    _fake_run(run, steps=4, finished=True, evaluated=True)
    row = long_answers.collect(run)
    assert row["steps"] == 4 and row["wall_s"] == pytest.approx(11 + 12 + 13 + 99)
    assert row["train_peak_rss_gib"] == pytest.approx(3.0)
    assert row["eval_em"] is True and row["decoding_s"] == 300.0 and row["stopped_on_recall"] is True


def test_report_lists_finished_and_running_runs(roots):
    done, running = (long_answers.LongRun.parse(name) for name in ("8192-rho0-sft", "12288-rho0-ot"))
    _fake_run(done, steps=3, finished=True, evaluated=True)
    _fake_run(running, steps=2, finished=False)
    missing = long_answers.LongRun.parse("16384-rho0-sft")
    path = long_answers.report([done, running, missing])
    text = path.read_text()
    assert "| 8192-rho0-sft | 3 | recalled |" in text and "| 12288-rho0-ot | 2 | running / stopped |" in text
    assert "16384" not in text.split("|---|")[-1]
    assert (roots / "results" / "8192-rho0-sft.metrics.jsonl").is_file()
    assert [r["run"] for r in json.loads((roots / "results" / "runs.json").read_text())] == [done.name, running.name]


def test_train_command_names_the_context_and_checkpointing(roots, monkeypatch):
    run = long_answers.LongRun.parse("12288-rho0-ot")
    run.data.parent.mkdir(parents=True)
    run.data.write_text("{}\n")
    seen = []
    monkeypatch.setattr(long_answers, "_timed", lambda python, args, stem, threads: seen.append(args) or 1)
    long_answers.run_one(run, "python", max_steps=50, threads=1, checkpoint_every=3)
    (train,) = seen  # a failed train is not evaluated
    assert train[:1] == ["train"] and "--gradient-checkpointing" in train
    assert train[train.index("--context") + 1] == str(run.context)
    assert train[train.index("--objective") + 1] == "ot" and train[train.index("--max-steps") + 1] == "50"


def test_cost_growth_lists_real_text_runs_by_objective_and_length(roots):
    done, running, random = (long_answers.LongRun.parse(name)
                             for name in ("8192-rho0-sft", "12288-rho0-sft", "8192-rho0.25-sft"))
    _fake_run(done, steps=3, finished=True, evaluated=True)
    _fake_run(running, steps=2, finished=False)
    _fake_run(random, steps=5, finished=True)
    lines = long_answers.cost_growth_lines([long_answers.collect(r) for r in (done, running, random)])
    table = [line for line in lines if line.startswith("| ") and "---" not in line][1:]
    ours = [line for line in table if "this runner" in line]
    # medians of the distinct steps: 8192 -> (11, 12, 99) -> 12; 12288 -> (11, 99) -> 99
    assert ours == ["| 8,192 | sft | 3 | recalled | 12.0 | 1.46 | 122 | this runner: Xeon, 1 thread |",
                    "| 12,288 | sft | 2 | not yet | 99.0 | 8.06 | 110 | this runner: Xeon, 1 thread |"]
    assert all("4,096" in line for line in table if "issue 12" in line)  # the committed 4k rows, when present


def test_no_decode_evaluates_by_teacher_forcing_only(roots, monkeypatch):
    run = long_answers.LongRun.parse("16384-rho0-sft")
    _fake_run(run, steps=2, finished=True)
    (run.out / "adapter").mkdir()
    seen = []
    monkeypatch.setattr(long_answers, "write_data", lambda run, python: None)
    monkeypatch.setattr(long_answers, "_timed", lambda python, args, stem, threads: seen.append(args) or 1)
    long_answers.run_one(run, "python", max_steps=50, threads=1, checkpoint_every=3, decode=False)
    (evaluate,) = seen  # trained already: only the eval runs
    assert evaluate[0] == "eval" and "--decode" not in evaluate
    assert evaluate[evaluate.index("--context") + 1] == str(run.context)
