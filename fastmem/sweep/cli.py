"""`fastmem sweep`: a resumable grid of trainer runs into a SQLite results database."""

from __future__ import annotations

import argparse
import multiprocessing
import os

EPILOG = """examples:
  fastmem sweep --db runs/sweep.sqlite --ranks 1,2,4,8 --lengths 32,64,128,256 --max-steps 100
  fastmem sweep --db runs/book.sqlite --dataset phonebook --objectives sft,ot --ranks 2,8
  fastmem sweep --db runs/sweep.sqlite --config sweep.yaml --workers 2      # two CPU processes
  torchrun --nproc-per-node 8 -m fastmem sweep --db /shared/sweep.sqlite --config big.toml   # a GPU each
  fastmem sweep --db runs/sweep.sqlite --status
  fastmem fit --db runs/sweep.sqlite --out runs/fit

Killed? Run the same command again: finished cells are skipped and a half-done cell is redone.
"""


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,2,4, got {text!r}") from None


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 0.1,0.25, got {text!r}") from None


def _words(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def register(subparsers) -> None:
    parser = subparsers.add_parser("sweep", help="run a resumable rank x length x objective grid into SQLite",
                                   description=__doc__, epilog=EPILOG,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", required=True, help="results database (SQLite), created if missing")
    parser.add_argument("--config", default=None, help="YAML or TOML file of sweep settings (flags override it)")
    parser.add_argument("--model", default=None, help="'smollm2' (default) or a local HF checkpoint dir")
    parser.add_argument("--ranks", type=_ints, default=None, help="e.g. 1,2,4,8")
    parser.add_argument("--lengths", type=_ints, default=None, help="answer tokens, e.g. 32,64,128,256")
    parser.add_argument("--objectives", type=_words, default=None, help="sft,ot,sw")
    parser.add_argument("--dataset", type=_words, default=None, dest="data",
                        help="the generated data kinds: stress,phonebook")
    parser.add_argument("--data", type=_words, default=None, dest="data_deprecated",
                        help=argparse.SUPPRESS)  # the old name of --dataset (--data is a file elsewhere)
    parser.add_argument("--ratios", type=_floats, default=None, help="stress-test random-token fractions")
    parser.add_argument("--seeds", type=_ints, default=None)
    parser.add_argument("--max-steps", type=int, default=None, help="the fixed step budget of every cell")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--layers", type=_ints, default=None, help="adapted layers (default: two upper-middle)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes on this machine (CPU)")
    parser.add_argument("--lease-s", type=float, default=600.0,
                        help="a running cell whose heartbeat is older than this is redone (other hosts)")
    parser.add_argument("--retry-failed", action="store_true", help="put failed cells back in the queue")
    parser.add_argument("--status", action="store_true", help="print the cell counts and exit")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(func=run)


def build_spec(args):
    from fastmem.sweep.spec import SweepSpec

    overrides = dict(model=args.model, ranks=args.ranks, lengths=args.lengths, objectives=args.objectives,
                     data=args.data, ratios=args.ratios, seeds=args.seeds, max_steps=args.max_steps, lr=args.lr,
                     layers=args.layers)
    if args.config:
        return SweepSpec.from_file(args.config, **overrides)
    return SweepSpec(**{k: v for k, v in overrides.items() if v is not None})


def _worker_process(spec, db, worker, lease_s, progress, threads):
    import torch

    from fastmem.sweep.worker import run_worker
    torch.set_num_threads(threads)
    run_worker(spec, db, worker=worker, lease_s=lease_s, progress=progress)


def run(args) -> int:
    import sys

    from fastmem.cli_checks import check_model, check_sqlite_file
    from fastmem.sweep.store import ResultsStore
    from fastmem.sweep.worker import describe, run_worker, torchrun_worker_index

    # Every refusal comes before the database is created or touched and before a model loads.
    if args.data_deprecated is not None:
        print("fastmem sweep: warning: --data is deprecated here; use --dataset (the data kinds)", file=sys.stderr)
        args.data = args.data if args.data is not None else args.data_deprecated
    if args.status:
        if check_sqlite_file(args.db, must_exist=False) is None:  # report, but create nothing
            print(f"fastmem sweep: no database at {args.db} yet (nothing created)", file=sys.stderr)
            print("{}")
            return 0
        print(describe(ResultsStore(args.db, lease_s=args.lease_s)))
        return 0
    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    if args.lease_s <= 0:
        raise ValueError(f"--lease-s must be > 0, got {args.lease_s}")
    spec = build_spec(args)
    cells = spec.cells()  # validates the grid
    check_model(spec.model)
    check_sqlite_file(args.db, must_exist=False)
    store = ResultsStore(args.db, lease_s=args.lease_s)
    store.add_cells(cells)
    if args.retry_failed:
        print(f"re-queued {store.retry_failed()} failed cell(s)")
    rank, _ = torchrun_worker_index()
    progress = not args.no_progress
    if args.workers == 1:
        run_worker(spec, args.db, worker=rank, lease_s=args.lease_s, progress=progress)
    else:
        threads = max(1, (os.cpu_count() or 1) // args.workers)
        context = multiprocessing.get_context("spawn")
        procs = [context.Process(target=_worker_process, args=(spec, args.db, i, args.lease_s, progress, threads))
                 for i in range(args.workers)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join()
    counts = store.status_counts()
    print(f"sweep {args.db}: {describe(store)}")
    return 0 if not counts.get("failed") and not counts.get("running") and not counts.get("pending") else 1
