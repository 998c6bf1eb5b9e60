"""`fastmem sweep`: a resumable grid of trainer runs into a SQLite results database."""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys

from fastmem import locks
from fastmem.errors import UsageError

EPILOG = """examples:
  fastmem sweep --db runs/sweep.sqlite --ranks 1,2,4,8 --lengths 32,64,128,256 --max-steps 100
  fastmem sweep --db runs/book.sqlite --dataset phonebook --objectives sft,ot --ranks 2,8
  fastmem sweep --db runs/sweep.sqlite --config sweep.yaml --workers 2      # two CPU processes
  torchrun --nproc-per-node 8 -m fastmem sweep --db /shared/sweep.sqlite --config big.toml   # a GPU each
  fastmem sweep --db runs/sweep.sqlite --config big.toml --executor ray --ray-address auto --adapters /shared/adapters
                                                            # one Ray task per cell, a GPU each on a GPU cluster
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
    parser.add_argument("--context", type=int, default=None,
                        help="positions a cell needs past the model's own context (YaRN RoPE scaling)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes on this machine (CPU)")
    parser.add_argument("--lease-s", type=float, default=600.0,
                        help="a running cell whose heartbeat is older than this is redone (other hosts)")
    parser.add_argument("--retry-failed", action="store_true", help="put failed cells back in the queue")
    parser.add_argument("--status", action="store_true", help="print the cell counts and exit")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--adapters", default=None,
                        help="directory where each cell writes its adapter (shared storage under Ray)")
    add_ray_arguments(parser)
    parser.set_defaults(func=run)


def add_ray_arguments(parser) -> None:
    group = parser.add_argument_group("executor", "where the cells run (the database stays on this machine)")
    group.add_argument("--executor", choices=("local", "ray"), default="local",
                       help="local: --workers processes here (default); ray: one Ray task per cell")
    group.add_argument("--ray-address", default=None,
                       help="a running Ray cluster ('auto', 'ray://head:10001'); default: RAY_ADDRESS, "
                            "else a local Ray started for this call")
    group.add_argument("--cell-retries", type=int, default=2,
                       help="Ray: re-runs of a cell whose worker died before it is marked failed")
    group.add_argument("--cpus-per-cell", type=float, default=1.0, help="Ray: CPUs reserved per cell")
    group.add_argument("--gpus-per-cell", type=float, default=None,
                       help="Ray: GPUs per cell (default 1 when the cluster has GPUs, else 0)")


def check_executor(args) -> None:
    """Refuse an unusable executor before anything is loaded or created."""
    if args.executor == "local":
        return
    if args.workers != 1:
        raise UsageError("--workers applies to --executor local; under Ray every cell is a task "
                         "(size them with --cpus-per-cell / --gpus-per-cell)")
    if args.cell_retries < 0:
        raise UsageError(f"--cell-retries must be >= 0, got {args.cell_retries}")
    if args.cpus_per_cell <= 0 or (args.gpus_per_cell is not None and args.gpus_per_cell < 0):
        raise UsageError(f"--cpus-per-cell must be > 0 and --gpus-per-cell >= 0, got {args.cpus_per_cell} "
                         f"and {args.gpus_per_cell}")
    from fastmem.sweep.ray_executor import require_ray
    try:
        require_ray()
    except ImportError as err:
        raise UsageError(str(err)) from None


def build_spec(args):
    from fastmem.sweep.spec import SweepSpec

    overrides = dict(model=args.model, ranks=args.ranks, lengths=args.lengths, objectives=args.objectives,
                     data=args.data, ratios=args.ratios, seeds=args.seeds, max_steps=args.max_steps, lr=args.lr,
                     layers=args.layers, adapters=args.adapters, context=args.context)
    if args.config:
        return SweepSpec.from_file(args.config, **overrides)
    return SweepSpec(**{k: v for k, v in overrides.items() if v is not None})


def _worker_process(spec, db, worker, lease_s, progress, threads):
    import torch

    from fastmem.sweep.worker import run_worker
    torch.set_num_threads(threads)
    run_worker(spec, db, worker=worker, lease_s=lease_s, progress=progress)


def _run_local_processes(spec, args, progress: bool) -> None:
    """`--workers K`: K spawned processes share the database; this one draws the sweep's bar."""
    import time

    from fastmem.sweep.progress import SweepBar
    from fastmem.sweep.store import ResultsStore

    threads = max(1, (os.cpu_count() or 1) // args.workers)
    context = multiprocessing.get_context("spawn")
    procs = [context.Process(target=_worker_process, args=(spec, args.db, i, args.lease_s, False, threads))
             for i in range(args.workers)]
    for proc in procs:
        proc.start()
    bar = SweepBar(ResultsStore(args.db, lease_s=args.lease_s), [c.key for c in spec.cells()], enabled=progress)
    while any(proc.is_alive() for proc in procs):
        time.sleep(1.0)
        bar.refresh()
    bar.close()
    for proc in procs:
        proc.join()


def run(args) -> int:
    from fastmem.cli_checks import check_model, check_sqlite_file, check_sweep_fits_model
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
        from fastmem.sweep.progress import status_report
        print(status_report(ResultsStore(args.db, lease_s=args.lease_s, read_only=True)))
        return 0
    if args.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {args.workers}")
    if args.lease_s <= 0:
        raise UsageError(f"--lease-s must be > 0, got {args.lease_s}")
    check_executor(args)
    spec = build_spec(args)
    cells = spec.cells()  # validates the grid
    check_model(spec.model)
    check_sweep_fits_model(spec, cells)  # ranks vs width, lengths vs context: before the database exists
    check_sqlite_file(args.db, must_exist=False)
    # Local workers share a database by design (claims are transactions); a Ray driver is its
    # only writer and holds its lock: any other sweep on it is refused, naming the driver's pid.
    locks.check_free(args.db, "--db")
    store = ResultsStore(args.db, lease_s=args.lease_s)
    store.add_cells(cells)
    if args.retry_failed:
        print(f"re-queued {store.retry_failed()} failed cell(s)")
    rank, _ = torchrun_worker_index()
    progress = not args.no_progress
    if args.executor == "ray":
        from fastmem.sweep.ray_executor import run_sweep_on_ray
        locks.acquire(args.db, "--db")
        try:
            run_sweep_on_ray(spec, args.db, address=args.ray_address, retries=args.cell_retries,
                             cpus_per_cell=args.cpus_per_cell, gpus_per_cell=args.gpus_per_cell,
                             lease_s=args.lease_s, progress=progress)
        finally:
            locks.release(args.db)
    elif args.workers == 1:
        run_worker(spec, args.db, worker=rank, lease_s=args.lease_s, progress=progress)
    else:
        _run_local_processes(spec, args, progress)
    counts = store.status_counts()
    print(f"sweep {args.db}: {describe(store)}")
    return 0 if not counts.get("failed") and not counts.get("running") and not counts.get("pending") else 1
