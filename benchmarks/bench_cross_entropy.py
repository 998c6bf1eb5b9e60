"""Fused linear cross-entropy: forward+backward time and peak memory against the anchors.

Contenders: fastmem on every backend available here, torch eager (F.linear + F.cross_entropy),
torch 2.13's native chunked F.linear_cross_entropy(..., options=LinearCrossEntropyOptions()),
torch.compile of eager (GPU, or --compile on CPU), and Liger-Kernel / Cut Cross-Entropy when
installed. On the CPU target, fastmem also runs at 256 and 1024 rows per chunk beside its
default (512), the evidence for the default. Contenders are timed interleaved (one step of
each per round, median over rounds), so a load that drifts during the run hits all alike; the
load average before and after is written beside the table. It also times the GEMM floor (logits GEMM + grad_hidden GEMM at
this shape; on the CPU both with torch.mm (MKL) and with oneDNN) and MemFT-OT with 5% of tokens active (threshold at
the 95th loss percentile). On the CPU the table names the CPU and the fp32 GEMM route fastmem chose
(fastmem.ops.cpu_gemm: the faster of oneDNN and MKL, measured once per machine and cached; FASTMEM_CPU_GEMM
overrides), and times fastmem once more in a process of its own with the other route forced.

    python benchmarks/bench_cross_entropy.py                 # GPU: Llama3.1-8B / Qwen3-8B shapes
    python benchmarks/bench_cross_entropy.py --cpu-target    # CPU: SmolLM2 head, N=2048, fp32
    python benchmarks/bench_cross_entropy.py --smoke         # seconds, for CI

Writes a markdown table to benchmarks/results/ with device, versions, shapes and date.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import fastmem
from fastmem.backends import available_backends

RESULTS = Path(__file__).resolve().parent / "results"
GPU_SHAPES = {"llama3.1-8b": (4096, 128256), "qwen3-8b": (4096, 151936)}


def make_inputs(n_rows, hidden_size, vocab, dtype, device, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    hidden = (torch.randn(n_rows, hidden_size, generator=gen) * 0.5).to(device=device, dtype=dtype)
    weight = (torch.randn(vocab, hidden_size, generator=gen) / hidden_size ** 0.5).to(device=device, dtype=dtype)
    labels = torch.randint(0, vocab, (n_rows,), generator=gen).to(device)
    return hidden, weight, labels


def confident_hidden(hidden, weight, labels, boost=15.0):
    """`hidden` moved along each row's target column so that its logit rises by `boost`: every
    target then has p > 1/2 (e^15 against ~5e4 columns of logit ~0), the state of an answer
    late in memorization, where the CPU torch backend sums the other probabilities again."""
    target_rows = weight.index_select(0, labels).float()
    step = target_rows * (boost / target_rows.square().sum(dim=1, keepdim=True))
    return (hidden.float() + step).to(hidden.dtype)


def eager_loss(hidden, weight, labels, **_):
    return F.cross_entropy(F.linear(hidden, weight).float(), labels)


def native_loss(hidden, weight, labels, **_):
    """torch's own chunked op (2.13: F.linear_cross_entropy with options=LinearCrossEntropyOptions())."""
    return F.linear_cross_entropy(hidden, weight, labels, options=torch.nn.LinearCrossEntropyOptions())


CPU_CHUNK_SWEEP = (64, 512)


def contenders(device, compile_too, chunk_sizes=()):
    """`chunk_sizes`: fastmem again at these rows per chunk (on a GPU, its fused backends), the
    evidence for or against the default chunking; on the CPU the torch backend at CPU_CHUNK_SWEEP."""
    backends = available_backends(device)
    found = {f"fastmem[{b}]": (lambda b: lambda h, w, y, **kw: fastmem.linear_cross_entropy(h, w, y, backend=b, **kw))(b)
             for b in backends}
    swept = [(b, rows) for b in backends if b != "torch" for rows in chunk_sizes] if device.type != "cpu" \
        else [("torch", rows) for rows in CPU_CHUNK_SWEEP]
    for backend, rows in swept:
        found[f"fastmem[{backend}] chunk={rows}"] = (
            lambda b, rows: lambda h, w, y, **kw: fastmem.linear_cross_entropy(h, w, y, backend=b, chunk_size=rows,
                                                                               **kw))(backend, rows)
    found["torch eager"] = eager_loss
    if hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions"):
        found["torch native chunked"] = native_loss
    if compile_too:
        found["torch.compile"] = torch.compile(eager_loss)
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
        found["liger"] = lambda h, w, y, **_: liger_fused_linear_cross_entropy(h, w, y)
    except ImportError:
        pass
    try:
        from cut_cross_entropy import linear_cross_entropy as cce
        found["cut-ce"] = lambda h, w, y, **_: cce(h, w, y)
    except ImportError:
        pass
    return found


def time_fwd_bwd(fn, hidden, weight, labels, reps, **options):
    def step():
        h = hidden.detach().requires_grad_(True)
        fn(h, weight, labels, **options).backward()

    if hidden.is_cuda:
        from triton.testing import do_bench
        return do_bench(step, warmup=3, rep=max(reps * 20, 100))
    step()  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def time_interleaved(fns, hidden, weight, labels, reps):
    """CPU: median ms of each fn over `reps` rounds, one step of every fn per round."""
    def step(fn):
        h = hidden.detach().requires_grad_(True)
        start = time.perf_counter()
        fn(h, weight, labels).backward()
        return (time.perf_counter() - start) * 1e3

    times = {name: [] for name in fns}
    for name, fn in fns.items():  # warm-up
        step(fn)
    for _ in range(reps):
        for name, fn in fns.items():
            times[name].append(step(fn))
    return {name: (statistics.median(t), t) for name, t in times.items()}


def load_average():
    try:
        return os.getloadavg()
    except OSError:
        return None


def gpu_peak_extra_mib(fn, hidden, weight, labels, **options):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    h = hidden.detach().requires_grad_(True)
    fn(h, weight, labels, **options).backward()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def cpu_peak_extra_mib(name, n_rows, hidden_size, vocab, dtype, compile_too):
    """Peak RSS growth of one fwd+bwd in a fresh process (the CPU allocator keeps no stats).

    The RSS high-water mark is reset (/proc/self/clear_refs) after the inputs exist, and large
    blocks go through mmap and back to the OS on free, so freed memory is not reused unseen.
    """
    code = (
        "import torch, sys; sys.path.insert(0, %r);"
        "import bench_cross_entropy as b;"
        "h, w, y = b.make_inputs(%d, %d, %d, %s, torch.device('cpu'));"
        "fn = b.contenders(torch.device('cpu'), %r)[%r];"
        "h = h.requires_grad_(True); rss0 = b.reset_peak_rss_kib();"
        "fn(h, w, y).backward();"
        "print((b.proc_status_kib('VmHWM:') - rss0) / 1024)"
    ) % (str(Path(__file__).parent), n_rows, hidden_size, vocab, repr(dtype), compile_too, name)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return float(out.stdout.strip().splitlines()[-1])


def proc_status_kib(key):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(key))


def reset_peak_rss_kib():
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets VmHWM to the current RSS
    return proc_status_kib("VmRSS:")


def gemm_floor_ms(hidden, weight, active_fraction=1.0, reps=3, onednn=False):
    """Logits GEMM over all rows + grad_hidden GEMM over the active rows, unchunked: the
    (1 + a) floor of a frozen-head step at this shape, with torch.mm (MKL on the CPU, what
    eager runs) or, on CPU, with oneDNN's GEMM (whatever route fastmem chose)."""
    from fastmem.ops.cpu_gemm import _ONEDNN_LINEAR

    logits = hidden @ weight.t()
    n_active = max(1, int(hidden.shape[0] * active_fraction))
    weight_t = weight.t().contiguous() if onednn else None

    def gemms():
        if onednn:
            with torch.no_grad():
                first = _ONEDNN_LINEAR(hidden, weight, None, "none", [], "")
                _ONEDNN_LINEAR(first[:n_active], weight_t, None, "none", [], "")
            return
        torch.mm(hidden, weight.t(), out=logits)
        torch.mm(logits[:n_active], weight)

    if hidden.is_cuda:
        from triton.testing import do_bench
        return do_bench(gemms, warmup=3, rep=100)
    gemms()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        gemms()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def ot_threshold_for_active_fraction(hidden, weight, labels, fraction):
    with torch.no_grad():
        _, stats = fastmem.linear_cross_entropy(hidden, weight, labels, return_stats=True)
    return float(torch.quantile(stats.loss.float(), 1.0 - fraction))


def versions():
    found = {"python": platform.python_version(), "torch": torch.__version__, "fastmem": fastmem.__version__}
    from importlib.metadata import PackageNotFoundError, version

    # by distribution: liger_kernel has no __version__
    for name, dist in (("triton", "triton"), ("liger_kernel", "liger-kernel"), ("cut_cross_entropy", "cut-cross-entropy")):
        try:
            found[name] = version(dist)
        except PackageNotFoundError:
            pass
    return found


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return (f"CPU {cpu_model()}, torch capability {torch.backends.cpu.get_cpu_capability()}, "
            f"{torch.get_num_threads()} threads")


def time_in_own_process(name, n_rows, hidden_size, vocab, dtype, reps, env=None):
    """Median ms of contender `name`'s fwd+bwd in a fresh process (no other contender's memory
    or cache state before it), with `env` added to the environment."""
    code = (
        "import torch, sys; sys.path.insert(0, %r);"
        "import bench_cross_entropy as b;"
        "h, w, y = b.make_inputs(%d, %d, %d, %s, torch.device('cpu'));"
        "print(b.time_fwd_bwd(b.contenders(torch.device('cpu'), False)[%r], h, w, y, %d))"
    ) % (str(Path(__file__).parent), n_rows, hidden_size, vocab, repr(dtype), name, reps)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, **(env or {})))
    return float(out.stdout.strip().splitlines()[-1])


def time_own_processes(names, n_rows, hidden_size, vocab, dtype, reps, rounds=3):
    """CPU: each contender in a process of its own, the processes interleaved over `rounds`;
    the median over rounds of each process's median ms."""
    times = {name: [] for name in names}
    for _ in range(rounds):
        for name in names:
            times[name].append(time_in_own_process(name, n_rows, hidden_size, vocab, dtype, reps))
    return {name: (statistics.median(t), t) for name, t in times.items()}


def run(args):
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu_target and not args.smoke else "cpu")
    args.load_before = load_average()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    if args.smoke:
        cases, dtype = [("smoke", 256, 64, 1000)], torch.float32
    elif device.type == "cpu":
        cases, dtype = [("smollm2-head", 2048, 576, 49152)], torch.float32
    else:
        cases = [(name, n, h, v) for name, (h, v) in GPU_SHAPES.items() for n in args.n]
    compile_too = device.type == "cuda" or args.compile
    rows = []
    for case, n_rows, hidden_size, vocab in cases:
        hidden, weight, labels = make_inputs(n_rows, hidden_size, vocab, dtype, device)
        eager_ms = None
        found = contenders(device, compile_too, args.chunk_sizes)
        if device.type != "cpu":
            cpu_times = {}
        elif args.own_process:
            cpu_times = time_own_processes([name for name in found if name != "torch.compile"], n_rows, hidden_size,
                                           vocab, dtype, args.reps)
        else:
            cpu_times = time_interleaved(found, hidden, weight, labels, args.reps)
        for name, fn in found.items():
            try:
                ms, all_ms = cpu_times[name] if name in cpu_times else (time_fwd_bwd(fn, hidden, weight, labels,
                                                                                     args.reps), None)
                mem = (gpu_peak_extra_mib(fn, hidden, weight, labels) if device.type == "cuda"
                       else cpu_peak_extra_mib(name, n_rows, hidden_size, vocab, dtype, compile_too))
            except (RuntimeError, torch.OutOfMemoryError) as err:  # an anchor OOM is a result too
                rows.append(dict(case=case, N=n_rows, H=hidden_size, V=vocab, contender=name, error=str(err)[:80]))
                continue
            eager_ms = ms if name == "torch eager" else eager_ms
            rows.append(dict(case=case, N=n_rows, H=hidden_size, V=vocab, contender=name, ms=ms, extra_mib=mem,
                             all_ms=all_ms))
        rows.append(dict(case=case, N=n_rows, H=hidden_size, V=vocab, contender="GEMM floor, torch.mm (1 pass + 1 pass)",
                         ms=gemm_floor_ms(hidden, weight, reps=args.reps), extra_mib=None))
        if device.type == "cpu" and dtype == torch.float32:
            from fastmem.ops.cpu_gemm import _ONEDNN_LINEAR, cpu_gemm_route
            if _ONEDNN_LINEAR is not None:
                rows.append(dict(case=case, N=n_rows, H=hidden_size, V=vocab,
                                 contender="GEMM floor, oneDNN (1 pass + 1 pass)",
                                 ms=gemm_floor_ms(hidden, weight, reps=args.reps, onednn=True), extra_mib=None))
            other = "mkl" if cpu_gemm_route()[0] == "onednn" else "onednn"
            rows.append(dict(case=case, N=n_rows, H=hidden_size, V=vocab,
                             contender=f"fastmem[torch] FASTMEM_CPU_GEMM={other} (own process, not interleaved)",
                             ms=time_in_own_process("fastmem[torch]", n_rows, hidden_size, vocab, dtype, args.reps,
                                                    env={"FASTMEM_CPU_GEMM": other}),
                             extra_mib=None))
        # MemFT-OT with 5% of the tokens above the threshold: only those rows reach the second GEMM.
        threshold = ot_threshold_for_active_fraction(hidden, weight, labels, 0.05)
        ot_backends = [b for b in available_backends(device) if b != "torch"] if device.type == "cuda" else ["torch"]
        for backend in ot_backends:
            fn = lambda h, w, y, b=backend: fastmem.linear_cross_entropy(h, w, y, objective="ot", threshold=threshold, backend=b)
            rows.append(dict(case=case, N=n_rows, H=hidden_size, V=vocab, contender=f"fastmem[{backend}] OT 5% active",
                             ms=time_fwd_bwd(fn, hidden, weight, labels, args.reps),
                             extra_mib=gpu_peak_extra_mib(fn, hidden, weight, labels) if device.type == "cuda" else None))
        rows.append(dict(case=case, N=n_rows, H=hidden_size, V=vocab, contender="GEMM floor OT 5%, torch.mm (1 + 0.05 passes)",
                         ms=gemm_floor_ms(hidden, weight, 0.05, reps=args.reps), extra_mib=None))
        if device.type == "cpu":
            rows += state_rows(case, hidden, weight, labels, args.reps)
        for row in rows:
            if row.get("case") == case and "ms" in row and eager_ms:
                row["vs_eager"] = row["ms"] / eager_ms
        del hidden, weight, labels
    return device, dtype, rows


def state_rows(case, hidden, weight, labels, reps):
    """The CPU torch backend's cost in the states it skips work in, timed in this process one
    after another (compare these rows with each other): random targets without stats (the
    table's case), confident targets (every p > 1/2: the others' sum comes back), and stats
    returned (the trainer's call: the runner-up pass comes back)."""
    confident = confident_hidden(hidden, weight, labels)
    with torch.no_grad():
        _, stats = fastmem.linear_cross_entropy(confident, weight, labels, return_stats=True, entropy=False)
    share = float((stats.prob > 0.5).float().mean())
    plain = lambda h, w, y: fastmem.linear_cross_entropy(h, w, y, backend="torch")  # noqa: E731
    with_stats = lambda h, w, y: fastmem.linear_cross_entropy(  # noqa: E731
        h, w, y, backend="torch", return_stats=True, entropy=False)[0]
    n_rows, hidden_size = hidden.shape
    found = []
    for name, fn, inputs in (("random targets, no stats", plain, hidden),
                             (f"confident targets ({share:.0%} at p > 1/2), no stats", plain, confident),
                             ("random targets, stats returned (entropy off)", with_stats, hidden)):
        found.append(dict(case=case, N=n_rows, H=hidden_size, V=weight.shape[0], extra_mib=None,
                          contender=f"fastmem[torch] {name} (this process, one after another)",
                          ms=time_fwd_bwd(fn, inputs, weight, labels, reps)))
    return found


def cpu_route_line() -> str:
    from fastmem.ops.cpu_gemm import cpu_gemm_route

    route, why = cpu_gemm_route()
    return f"{route} ({why})"


def print_and_write(lines: list[str], name: str | None) -> None:
    """Print the table; write it to benchmarks/results/`name` unless `name` is None."""
    text = "\n".join(lines) + "\n"
    print(text)
    if name is not None:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / name).write_text(text)
        print(f"wrote {RESULTS / name}")


def write_table(device, dtype, rows, args):
    stamp = dt.datetime.now(dt.timezone.utc)
    lines = [f"# fused linear cross-entropy, fwd+bwd, frozen head, {str(dtype).replace('torch.', '')}",
             "", f"- date: {stamp:%Y-%m-%d %H:%M} UTC", f"- device: {device_name(device)}",
             *([f"- fastmem's fp32 CPU GEMM route: {cpu_route_line()}"] if device.type == "cpu" else []),
             *([f"- instruction sets limited by the environment: {isa_limits()}"] if isa_limits() else []),
             f"- versions: {json.dumps(versions())}", f"- command: `python {' '.join(sys.argv)}`",
             f"- ms: median of {args.reps} rounds" + (
                 "" if device.type != "cpu" else
                 "; each contender in a process of its own, 3 processes each, interleaved (median of the 3 medians)"
                 if args.own_process else ", contenders interleaved in one process"),
             f"- load average (1, 5, 15 min) before: {args.load_before}, after: {load_average()}"
             f" on {os.cpu_count()} cores" + (" -- NOT a quiet machine: compare ratios within this run only"
                                              if args.load_before and args.load_before[0] > 0.5 * (os.cpu_count() or 1)
                                              else ""), "",
             "| case | N | H | V | contender | ms | × eager | extra MiB |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | {r['N']} | {r['H']} | {r['V']} | {r['contender']} | failed: {r['error']} | | |")
            continue
        mem = "" if r.get("extra_mib") is None else f"{r['extra_mib']:.0f}"
        ratio = f"{r['vs_eager']:.2f}" if r.get("vs_eager") else ""
        lines.append(f"| {r['case']} | {r['N']} | {r['H']} | {r['V']} | {r['contender']} | {r['ms']:.1f} | {ratio} | {mem} |")
    per_round = [f"- {r['contender']}: " + ", ".join(f"{t:.0f}" for t in r["all_ms"])
                 for r in rows if r.get("all_ms")]
    if per_round:
        lines += ["", "Every round (ms" + ("; each one process's median" if args.own_process else "") + "):",
                  *per_round]
    kind = "smoke" if args.smoke else device.type
    tag = f"_{args.tag}" if args.tag else ""
    print_and_write(lines, None if args.no_write else f"cross_entropy_{kind}_{stamp:%Y%m%d}{tag}.md")


# Environment variables that cap the instruction sets MKL, ATen's vectorized kernels and oneDNN
# use: with them an AVX-512 machine runs the code paths of one without (its caches and memory
# stay its own).
ISA_LIMIT_VARS = ("MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")


def isa_limits() -> str:
    return ", ".join(f"{name}={os.environ[name]}" for name in ISA_LIMIT_VARS if os.environ.get(name))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[2048, 8192, 16384, 32768])
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--cpu-target", action="store_true",
                        help="the CPU target of docs/design.md (SmolLM2 head, N=2048, fp32)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile on the CPU")
    parser.add_argument("--own-process", action="store_true",
                        help="CPU: time each contender in a fresh process of its own (3 rounds of processes, "
                             "interleaved) instead of all in this one")
    parser.add_argument("--chunk-sizes", type=int, nargs="*", default=[],
                        help="GPU: fastmem's fused backends again at these rows per chunk (e.g. 1024 2048 4096)")
    parser.add_argument("--smoke", action="store_true", help="a tiny CPU run for CI")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--tag", default="", help="suffix of the result file's name (e.g. avx2 for a run under "
                                                   "MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2 "
                                                   "ONEDNN_MAX_CPU_ISA=AVX2)")
    args = parser.parse_args(argv)
    device, dtype, rows = run(args)
    write_table(device, dtype, rows, args)
    return rows


if __name__ == "__main__":
    main()
