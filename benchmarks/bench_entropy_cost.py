"""What the entropy in TokenStats costs the fused loss on the CPU (torch backend).

The entropy comes from the chunk kernel's softmax pass (backend_torch._softmax_in_place: the
softmax runs on blocks of rows, each block's z - max kept in a scratch and multiplied with the
block's probabilities). The baseline is the same call with LossSpec(entropy=False) (the plain
in-place softmax): the difference is the entropy's whole cost. Both return stats and run
interleaved, fwd+bwd, frozen head, at the SmolLM2 head (N=2048, H=576, V=49152, fp32), median
over rounds.

    PYTHONPATH=. python benchmarks/bench_entropy_cost.py [--reps 9] [--no-write]

Writes benchmarks/results/entropy_cost_cpu_<date>.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import time
from pathlib import Path

import torch

import fastmem

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_cross_entropy as bench  # noqa: E402


def step_ms(hidden, weight, labels, with_entropy: bool) -> float:
    h = hidden.detach().requires_grad_(True)
    start = time.perf_counter()
    loss, _ = fastmem.linear_cross_entropy(h, weight, labels, return_stats=True, backend="torch",
                                           entropy=with_entropy)
    loss.backward()
    return (time.perf_counter() - start) * 1e3


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--shape", type=int, nargs=3, default=[2048, 576, 49152], metavar=("N", "H", "V"))
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    n_rows, hidden_size, vocab = args.shape
    hidden, weight, labels = bench.make_inputs(n_rows, hidden_size, vocab, torch.float32, torch.device("cpu"))
    load_before = bench.load_average()
    times = {True: [], False: []}
    for with_entropy in (True, False):  # warm-up
        step_ms(hidden, weight, labels, with_entropy)
    for _ in range(args.reps):
        for with_entropy in (True, False):
            times[with_entropy].append(step_ms(hidden, weight, labels, with_entropy))
    with_ms, without_ms = statistics.median(times[True]), statistics.median(times[False])
    stamp = dt.datetime.now(dt.timezone.utc)
    lines = [f"# entropy in TokenStats: cost on the CPU, fused CE fwd+bwd, N={n_rows}, H={hidden_size}, "
             f"V={vocab}, fp32, torch backend", "",
             f"- date: {stamp:%Y-%m-%d %H:%M} UTC", f"- device: {bench.device_name(torch.device('cpu'))}",
             f"- fastmem's fp32 CPU GEMM route: {bench.cpu_route_line()}",
             f"- versions: {bench.versions()}", f"- command: `python {' '.join(sys.argv)}`",
             f"- load average before: {load_before}, after: {bench.load_average()}",
             f"- median of {args.reps} interleaved rounds", "",
             "| variant | ms |", "|---|---|",
             f"| with entropy (the op as shipped) | {with_ms:.1f} |",
             f"| LossSpec(entropy=False) | {without_ms:.1f} |",
             f"| entropy's cost | {with_ms - without_ms:+.1f} ms = {(with_ms / without_ms - 1) * 100:+.1f}% |", "",
             "Every round (ms): with " + ", ".join(f"{t:.0f}" for t in times[True])
             + "; without " + ", ".join(f"{t:.0f}" for t in times[False])]
    bench.print_and_write(lines, None if args.no_write else f"entropy_cost_cpu_{stamp:%Y%m%d}.md")


if __name__ == "__main__":
    main()
