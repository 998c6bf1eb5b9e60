"""Long answers (8k-16k tokens) memorized end to end on the embedded SmolLM2, through the CLI.

Each run is `fastmem train` (fast engine, gradient checkpointing, stop on recall, `--context`
past the model's 8,192 positions) then `fastmem eval --decode` (the teacher-forced verdict and
one greedy decode of the whole answer), each under `/usr/bin/time -v` for the peak RSS.
Resumable at every point: a run directory with an unfinished run is resumed by `fastmem
train` itself from its last checkpoint; a finished one is skipped; so the queue can be killed
and restarted across sessions. Run from the repository root:

    nohup python -m benchmarks.long_answers run > runs/long_answers/log.txt 2>&1 &
    python -m benchmarks.long_answers report     # the table + per-step JSONL into benchmarks/results/

Data: the stress test (`fastmem.data.stress_test`) — the Python standard library's docstrings,
at ρ = 0 (real text) and ρ = 0.25 (a quarter of the positions random tokens), seed 42.
Adapter (as the 4,096-token runs of issue 12, for a cost-growth table on one footing): LoRA
rank 16, alpha 32, dropout 0, on q/k/v/o/gate/up/down_proj of layers 24-29, lr 1e-2.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path("runs/long_answers")
RESULTS = Path("benchmarks/results/long_answers_cpu")
ADAPTER = ["--rank", "16", "--alpha", "32", "--dropout", "0", "--lr", "1e-2", "--layers", "24,25,26,27,28,29",
           "--modules", "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"]
PROMPT_ROOM = 64  # the stress prompt under SmolLM2's chat template is 37 tokens, + end of turn
# What runs first: the acceptance case (a >= 12k answer), then the rest by cost.
DEFAULT_ORDER = ("12288-rho0-sft", "12288-rho0-ot", "8192-rho0-sft", "8192-rho0-ot", "16384-rho0-sft",
                 "16384-rho0-ot", "8192-rho0.25-sft", "8192-rho0.25-ot", "12288-rho0.25-sft",
                 "12288-rho0.25-ot", "16384-rho0.25-sft", "16384-rho0.25-ot")


@dataclass(frozen=True)
class LongRun:
    length: int
    ratio: float
    objective: str

    @classmethod
    def parse(cls, name: str) -> "LongRun":
        match = re.fullmatch(r"(\d+)-rho([0-9.]+)-(sft|ot|sw)", name)
        if not match:
            raise SystemExit(f"run names look like 12288-rho0-sft, got {name!r}")
        return cls(int(match[1]), float(match[2]), match[3])

    @property
    def name(self) -> str:
        return f"{self.length}-rho{self.ratio:g}-{self.objective}"

    @property
    def data(self) -> Path:
        return ROOT / "data" / f"stress_{self.length}_rho{self.ratio:g}.jsonl"

    @property
    def out(self) -> Path:
        return ROOT / self.name

    @property
    def logs(self) -> Path:  # beside the run, never inside it (fastmem refuses a non-empty --out)
        return ROOT / "logs" / self.name

    @property
    def context(self) -> int:
        return self.length + PROMPT_ROOM


def write_data(run: LongRun, python: str) -> None:
    if run.data.is_file():
        return
    run.data.parent.mkdir(parents=True, exist_ok=True)
    code = f"""
from transformers import AutoTokenizer
from fastmem.models import smollm2_gguf_path
from fastmem.data import save_jsonl, stress_test
p = smollm2_gguf_path()
tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name, local_files_only=True)
save_jsonl([stress_test(tok, {run.length}, {run.ratio}, seed=42)], {str(run.data) + '.partial'!r})
"""
    subprocess.run([python, "-c", code], check=True)
    os.replace(str(run.data) + ".partial", run.data)


def _timed(python: str, args: list[str], log_stem: Path, threads: int) -> int:
    """One command under /usr/bin/time -v; each process of a resumed run keeps its own log."""
    log_stem.parent.mkdir(parents=True, exist_ok=True)
    attempt = 1 + len(list(log_stem.parent.glob(f"{log_stem.name}.time.*.txt")))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               PYTHONPATH=os.getcwd())
    with open(f"{log_stem}.stdout.{attempt}.txt", "w") as out, open(f"{log_stem}.time.{attempt}.txt", "w") as err:
        return subprocess.run(["/usr/bin/time", "-v", python, "-m", "fastmem", *args], stdout=out, stderr=err,
                              env=env).returncode


def run_one(run: LongRun, python: str, max_steps: int, threads: int, checkpoint_every: int,
            decode: bool = True) -> None:
    write_data(run, python)
    if not (run.out / "summary.json").is_file():
        print(f"[{time.strftime('%H:%M:%S')}] train {run.name}", flush=True)
        stamp = run.logs.with_name(run.name + ".commit.txt")  # the code each process trained with
        stamp.parent.mkdir(parents=True, exist_ok=True)
        with open(stamp, "a") as out:
            out.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {_commit()}\n")
        code = _timed(python, ["train", "--data", str(run.data), "--out", str(run.out), "--objective", run.objective,
                               *ADAPTER, "--context", str(run.context), "--gradient-checkpointing",
                               "--max-steps", str(max_steps), "--checkpoint-every", str(checkpoint_every),
                               "--no-progress"], run.logs.with_name(run.name + ".train"), threads)
        print(f"  train exit {code}", flush=True)
        if code != 0:
            return
    if not (run.out / "eval" / "report.json").is_file():
        print(f"[{time.strftime('%H:%M:%S')}] eval {run.name}", flush=True)
        eval_out = run.logs.with_name(run.name + ".eval_out")  # renamed into the run once complete
        shutil.rmtree(eval_out, ignore_errors=True)
        code = _timed(python, ["eval", "--data", str(run.data), "--adapter", str(run.out / "adapter"),
                               "--context", str(run.context), *(["--decode"] if decode else []), "--grids", "1",
                               "--out", str(eval_out),
                               "--no-progress"], run.logs.with_name(run.name + ".eval"), threads)
        print(f"  eval exit {code}", flush=True)
        if code == 0:
            os.replace(eval_out, run.out / "eval")


def _peak_rss_gib(stems: list[Path]) -> float | None:
    peaks = []
    for path in stems:
        found = re.search(r"Maximum resident set size \(kbytes\): (\d+)", path.read_text())
        if found:
            peaks.append(int(found[1]) / 2**20)
    return max(peaks) if peaks else None


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def collect(run: LongRun) -> dict | None:
    """What the run measured so far (None: not started)."""
    metrics = _rows(run.out / "metrics.jsonl")
    if not metrics:
        return None
    by_step = {row["step"]: row for row in metrics}  # a resumed step is counted once, its last write
    summary_path = run.out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    last = by_step[max(by_step)]
    row = {"run": run.name, "length": run.length, "ratio": run.ratio, "objective": run.objective,
           "steps": max(by_step), "finished": bool(summary), "stopped_on_recall": summary.get("stopped_on_recall"),
           "wall_s": sum(r["step_s"] for r in by_step.values()),
           "median_step_s": sorted(r["step_s"] for r in by_step.values())[len(by_step) // 2],
           "last_token_acc": last.get("token_acc"), "last_stubborn": last.get("stubborn_tokens"),
           "last_min_p": last.get("min_p"), "final_pass_em": summary.get("exact_match"),
           "final_pass_min_p": summary.get("min_p"), "final_pass_min_margin": summary.get("min_margin"),
           "commits": _commits(run),
           "train_peak_rss_gib": _peak_rss_gib(sorted(run.logs.parent.glob(f"{run.name}.train.time.*.txt")))}
    report = run.out / "eval" / "report.json"
    if report.is_file():
        data = json.loads(report.read_text())
        record = data["records"][0]
        decoded = record.get("decode_agrees") is not None  # --no-decode: no greedy-decode time
        row.update(eval_em=record["exact_match"], eval_token_acc=record["token_acc"],
                   eval_first_error=record["first_error"], eval_min_p=record["min_prob"],
                   eval_decode_agrees=record.get("decode_agrees"),
                   teacher_forcing_s=data["timing"]["teacher_forcing_s"],
                   decoding_s=data["timing"].get("decoding_s") if decoded else None,
                   eval_peak_rss_gib=_peak_rss_gib(sorted(run.logs.parent.glob(f"{run.name}.eval.time.*.txt"))))
    return row


def report(order: list[LongRun]) -> Path:
    """Copy each run's per-step JSONL and summary into RESULTS and write the table."""
    import platform

    import torch
    import transformers

    RESULTS.mkdir(parents=True, exist_ok=True)
    rows = []
    for run in order:
        row = collect(run)
        if row is None:
            continue
        rows.append(row)
        for name in ("metrics.jsonl", "summary.json", "run.json"):
            if (run.out / name).is_file():
                shutil.copyfile(run.out / name, RESULTS / f"{run.name}.{name}")
    (RESULTS / "runs.json").write_text(json.dumps(rows, indent=1) + "\n")
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    lines = [
        "# Long answers on the embedded SmolLM2 (CPU)", "",
        f"- written: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `python -m benchmarks.long_answers report`",
        f"- device: {cpu}, {os.cpu_count()} cores; every run with 1 torch thread (OMP_NUM_THREADS=1), the other "
        "core busy with other work, so step seconds carry that noise",
        f"- versions: torch {torch.__version__}, transformers {transformers.__version__}, python {platform.python_version()}",
        "- data: `stress_test(tokenizer, ℓ, ρ, seed=42)` (stdlib docstrings; ρ = share of random tokens); "
        "`--context ℓ+64` (YaRN RoPE scaling past 8,192)",
        "- train: `fastmem train` fast engine, `--gradient-checkpointing`, LoRA r16/α32, dropout 0, q/k/v/o/gate/up/down "
        "of layers 24-29, lr 1e-2 (linear decay over the budget), stop on recall (every token p > 0.5)",
        "- EM (train's final pass): the trainer's eval-mode teacher-forced pass when it stops (greedy decoding "
        "reproduces the answer iff every teacher-forced argmax is its target); EM (fastmem eval): `fastmem eval "
        "--decode` on the saved adapter, the teacher-forced verdict and one greedy decode with the KV cache "
        "(`decode agrees` in runs.json); a run evaluated with `--no-decode` has no greedy-decode time",
        "- code: each run's fastmem commit(s) in runs.json (`commits`, one per training process)", "",
        "| run | steps | state | wall Σ step_s | median s/step | peak RSS train | EM (train's final pass) | "
        "EM (fastmem eval) | token acc | i* | teacher-forced s | greedy decode s | peak RSS eval |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        state = ("recalled" if row["stopped_on_recall"] else "budget spent") if row["finished"] else "running / stopped"

        def fmt(key, spec="{:.0f}"):
            return "—" if row.get(key) is None else spec.format(row[key])
        lines.append(f"| {row['run']} | {row['steps']} | {state} | {fmt('wall_s')} | {fmt('median_step_s', '{:.1f}')} | "
                     f"{fmt('train_peak_rss_gib', '{:.2f} GiB')} | "
                     f"{'—' if row.get('final_pass_em') is None else '{:.0%}'.format(row['final_pass_em'])} | "
                     f"{'—' if row.get('eval_em') is None else ('100%' if row['eval_em'] else '0%')} | "
                     f"{fmt('eval_token_acc', '{:.4f}') if 'eval_token_acc' in row else fmt('last_token_acc', '{:.4f} (last step)')} | "
                     f"{fmt('eval_first_error', '{}')} | {fmt('teacher_forcing_s', '{:.1f}')} | "
                     f"{fmt('decoding_s', '{:.1f}')} | {fmt('eval_peak_rss_gib', '{:.2f} GiB')} |")
    lines += ["", "Per-step rows: `<run>.metrics.jsonl`; settings and the RoPE scaling: `<run>.run.json`; "
              "all rows: `runs.json`.", ""]
    lines += cost_growth_lines(rows)
    path = RESULTS / "README.md"
    path.write_text("\n".join(lines) + "\n")
    return path


# The 4,096-token CLI runs of issue 12 (same data, adapter and lr; another machine and threshold),
# the shortest rows of the cost-growth table.
EARLIER_RUNS = {("sft", 4096): Path("benchmarks/results/long_answer_cli_4096_sft_metrics.jsonl"),
                ("ot", 4096): Path("benchmarks/results/long_answer_cli_4096_ot_metrics.jsonl")}


def cost_growth_lines(rows: list[dict]) -> list[str]:
    """How the wall time to recall grows with the answer length: steps x s/step per (ℓ, objective),
    real text (ρ 0) only, the 4,096-token rows from EARLIER_RUNS."""
    growth = []
    for (objective, length), path in EARLIER_RUNS.items():
        by_step = {r["step"]: r for r in _rows(path)}
        if by_step:
            times = sorted(r["step_s"] for r in by_step.values())
            growth.append(dict(length=length, objective=objective, steps=max(by_step), state="recalled",
                               median=times[len(times) // 2], wall=sum(times),
                               where="issue 12: AMD EPYC, 2 threads" + (", OT threshold 0.3" if objective == "ot" else "")))
    for row in rows:
        if row["ratio"] == 0:
            state = ("recalled" if row["stopped_on_recall"] else "budget spent") if row["finished"] else "not yet"
            growth.append(dict(length=row["length"], objective=row["objective"], steps=row["steps"], state=state,
                               median=row["median_step_s"], wall=row["wall_s"], where="this runner: Xeon, 1 thread"))
    if not growth:
        return []
    lines = ["## Cost growth with ℓ (real text, ρ = 0)", "",
             "Wall time to recall = steps × s/step. A run still going shows its steps so far (a lower bound on its "
             "steps to recall). s/step is the median over the run's steps, on the machine named.", "",
             "| ℓ | objective | steps | recalled? | median s/step | s/step per 1k tokens | Σ step_s | where |",
             "|---|---|---|---|---|---|---|---|"]
    for g in sorted(growth, key=lambda g: (g["objective"], g["length"])):
        lines.append(f"| {g['length']:,} | {g['objective']} | {g['steps']} | {g['state']} | {g['median']:.1f} | "
                     f"{1000 * g['median'] / g['length']:.2f} | {g['wall']:,.0f} | {g['where']} |")
    return lines


def _commits(run: LongRun) -> list[str]:
    stamp = run.logs.with_name(run.name + ".commit.txt")
    return stamp.read_text().split("\n")[:-1] if stamp.is_file() else []


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=("run", "report"))
    parser.add_argument("--runs", default=",".join(DEFAULT_ORDER), help="comma-separated run names, in order")
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--checkpoint-every", type=int, default=3)
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--no-decode", action="store_true",
                        help="eval by teacher forcing only (one greedy decode of 12,288 tokens took 2,551 s here)")
    args = parser.parse_args(argv)
    order = [LongRun.parse(name) for name in args.runs.split(",") if name]
    if args.action == "report":
        print(report(order))
        return 0
    for run in order:
        run_one(run, args.python, args.max_steps, args.threads, args.checkpoint_every, decode=not args.no_decode)
    print(f"[{time.strftime('%H:%M:%S')}] queue done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
