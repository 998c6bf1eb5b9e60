"""One sweep grid on each executor: wall time, and whether they give the same rows.

Each executor runs the same `fastmem sweep` command line (a fresh database each) as a
subprocess, so each pays its own start-up: the model load per process, and Ray's start and
its workers' imports. Then every cell's losses are compared with the first executor's.

    python benchmarks/bench_sweep_executors.py                       # 2x4 SmolLM2 grid, CPU
    python benchmarks/bench_sweep_executors.py --executors local,local2,ray --max-steps 20
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]
COMPARED = ("base_loss", "final_loss", "delta_loss", "token_acc", "steps")
EXECUTORS = {  # name: extra flags
    "local": ["--executor", "local"],  # one worker process, torch on every core
    "local2": ["--executor", "local", "--workers", "2"],  # two worker processes
    "ray": ["--executor", "ray", "--cpus-per-cell", "1"],  # a local Ray, one CPU per cell
}


def run(name: str, args, workdir: Path) -> dict:
    db = workdir / f"{name}.sqlite"
    command = [sys.executable, "-m", "fastmem", "sweep", "--db", str(db), "--model", args.model,
               "--ranks", args.ranks, "--lengths", args.lengths, "--max-steps", str(args.max_steps),
               "--no-progress", *EXECUTORS[name]]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    start = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    with sqlite3.connect(db) as conn:
        conn.row_factory = sqlite3.Row
        rows = {row["key"]: dict(row) for row in conn.execute("SELECT * FROM runs")}
    print(f"{name}: {wall:.1f} s, {len(rows)} cells (load average now {os.getloadavg()[0]:.1f})", flush=True)
    return {"wall_s": wall, "rows": rows, "command": " ".join(command[1:])}


def compare(reference: dict, other: dict) -> tuple[bool, float]:
    """Same cells, all done, same steps; returns (equal within 1e-4 relative, max |diff| of final_loss)."""
    if reference.keys() != other.keys():
        return False, float("nan")
    equal, worst = True, 0.0
    for key, row in reference.items():
        mine = other[key]
        if row["status"] != "done" or mine["status"] != "done":
            return False, float("nan")
        for column in COMPARED:
            a, b = row[column], mine[column]
            if abs(a - b) > 1e-4 * max(1.0, abs(a)):
                equal = False
        worst = max(worst, abs(row["final_loss"] - mine["final_loss"]))
    return equal, worst


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--ranks", default="1,2,4,8")
    parser.add_argument("--lengths", default="16,32")
    parser.add_argument("--max-steps", type=int, default=10)
    parser.add_argument("--executors", default="local,ray", help=f"among {sorted(EXECUTORS)}; the first is the reference")
    parser.add_argument("--note", default="", help="a line about the machine's load, written with the table")
    args = parser.parse_args(argv)
    names = [n for n in args.executors.split(",") if n]
    with tempfile.TemporaryDirectory(prefix="sweep_exec_") as tmp:
        results = {name: run(name, args, Path(tmp)) for name in names}
    import ray
    import torch

    reference = results[names[0]]
    grid = f"ranks {args.ranks} x lengths {args.lengths}"
    lines = [f"# one sweep grid per executor ({grid}, {args.max_steps} steps per cell), {args.model}", "",
             f"- date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
             f"- device: CPU ({platform.machine()}, {os.cpu_count()} threads), no GPU",
             f"- versions: {json.dumps({'torch': torch.__version__, 'ray': ray.__version__, 'python': platform.python_version()})}",
             f"- command: `python benchmarks/bench_sweep_executors.py {' '.join(argv or sys.argv[1:])}`".replace("  ", " "),
             "- each executor: a `fastmem sweep` subprocess with a fresh database; wall time includes model "
             "load(s) and, for Ray, starting a local Ray and its workers"]
    if args.note:
        lines.append(f"- {args.note}")
    lines += ["", "| executor | flags | wall s | cells done | rows equal to " + names[0] + " | max abs diff final_loss |",
              "|---|---|---|---|---|---|"]
    for name in names:
        rows = results[name]["rows"]
        equal, worst = compare(reference["rows"], rows)
        done = sum(r["status"] == "done" for r in rows.values())
        lines.append(f"| {name} | `{' '.join(EXECUTORS[name])}` | {results[name]['wall_s']:.1f} | {done}/{len(rows)} "
                     f"| {'yes' if equal else 'NO'} (rel 1e-4 on {', '.join(COMPARED)}) | {worst:.2e} |")
    lines += ["", "| cell | " + " | ".join(f"{n} final_loss | {n} cell wall s" for n in names) + " |",
              "|---|" + "---|---|" * len(names)]
    for key in sorted(reference["rows"]):
        lines.append(f"| {key} | " + " | ".join(f"{results[n]['rows'][key]['final_loss']:.6f} | "
                                                f"{results[n]['rows'][key]['wall_s']:.1f}" for n in names) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"sweep_ray_vs_local_{dt.date.today():%Y%m%d}.md"
    with open(out, "a") as handle:
        handle.write(text + "\n")
    print(f"appended to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
