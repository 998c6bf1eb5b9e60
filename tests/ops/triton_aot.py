"""Compile every Triton kernel of fastmem ahead of time for real GPU targets, on a CPU machine.

    python -m tests.ops.triton_aot --arch 80 90 [--full] [--json FILE]

Run WITHOUT TRITON_INTERPRET (the kernels must be real `JITFunction`s). Two phases:

1. Record. The ops' own Triton dispatch code (`lora_linear_triton.forward / backward /
   keep_mask`, and `linear_cross_entropy(..., backend="triton")`) is called on small CPU tensors
   over a grid of calls (dtypes x options x shapes). Kernel launches are intercepted instead of
   run: each `kernel[grid](...)` is recorded with the exact arguments and constexprs the dispatch
   chose, and an autotuned kernel is expanded into every config it could pick (heuristics
   applied). The dispatch sees a GPU with 132 SMs (the `_multiprocessors` seam), so it picks the
   tiles a GPU run would get, not the interpreter's. Outputs stay zero-filled (nothing runs).
2. Compile. Triton's own binder turns each recorded launch into its compile key (signature,
   constexprs, divisibility attributes) for a target `GPUTarget("cuda", arch, 32)`, and
   `JITFunction.warmup` compiles it to a cubin through the regular compile path (ttir -> ttgir ->
   llir -> ptx -> cubin with ptxas). By default a greedy cover keeps a subset of launches in
   which, per kernel and dtype signature, every argument specialization (each constexpr value,
   divisibility) and every autotune options set appears at least once per target; `--full`
   compiles every distinct key (the full product: ~800-1100 per target, ~30 min).

Every kernel defined in fastmem/kernels/triton must be launched at least once in phase 1, or
the run fails: a kernel the grid never reaches would otherwise pass unchecked.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import json
import os
import pkgutil
import resource
import sys
import time
from dataclasses import dataclass, field

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("tests.ops.triton_aot: unset TRITON_INTERPRET (the kernels must compile for a GPU target)")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver as triton_driver  # noqa: E402
from triton.runtime.autotuner import Autotuner, Heuristics  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

FAKE_SMS = 132  # an H100 SXM; the dispatch sizes grids and small-input tiles from it
KERNEL_PACKAGE = "fastmem.kernels.triton"
# Largest dynamic shared memory one block may use (opt-in maximum), in bytes.
SHARED_MEMORY_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448, 120: 101376}


# ---------------------------------------------------------------------------------------------
# Phase 1: record the launches the dispatch makes.


@dataclass
class Launch:
    kernel: JITFunction
    args: tuple
    kwargs: dict
    origin: str  # which call of the grid made it (for messages)
    config: tuple | None  # the autotune config (None when not autotuned); one that does not fit is skipped


@dataclass
class Recorder:
    launches: list[Launch] = field(default_factory=list)
    origin: str = ""
    config: tuple | None = None


def _record_jit(recorder: Recorder):
    def run(self, *args, grid, warmup, **kwargs):
        recorder.launches.append(Launch(self, args, dict(kwargs), recorder.origin, recorder.config))
        return None

    return run


def _record_autotuner(recorder: Recorder):
    def run(self, *args, grid, warmup=False, **kwargs):
        # Every config the autotuner may pick on a GPU (as Autotuner.warmup walks them), heuristics
        # applied on the way down.
        self.nargs = dict(zip(self.arg_names, args))
        try:
            for config in self.prune_configs(kwargs):
                recorder.config = tuple(sorted(config.all_kwargs().items()))
                self.fn.warmup(*args, grid=grid, **kwargs, **config.all_kwargs())
        finally:
            self.nargs = None
            recorder.config = None

    return run


@contextlib.contextmanager
def recording(recorder: Recorder):
    from fastmem.ops import lora_linear_triton

    saved = (JITFunction.run, Autotuner.run, torch.empty, torch.empty_like, lora_linear_triton._multiprocessors)
    real_empty, real_empty_like = torch.empty, torch.empty_like
    JITFunction.run = _record_jit(recorder)
    Autotuner.run = _record_autotuner(recorder)
    # Nothing runs, so outputs keep their initial contents: zeros rather than garbage keep the
    # host code between launches (weights, compaction) well defined.
    torch.empty = lambda *a, **k: real_empty(*a, **k).zero_()
    torch.empty_like = lambda *a, **k: real_empty_like(*a, **k).zero_()
    lora_linear_triton._multiprocessors = lambda device: FAKE_SMS
    try:
        yield recorder
    finally:
        (JITFunction.run, Autotuner.run, torch.empty, torch.empty_like, lora_linear_triton._multiprocessors) = saved


DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def record_lora_linear(recorder: Recorder) -> None:
    from fastmem.ops import lora_linear_triton as impl
    from fastmem.ops.lora_linear_checks import MAX_TRITON_RANK, DropoutSpec

    gen = torch.Generator().manual_seed(0)
    # in_features 64 (EVEN_K) and 72 (a masked K tail) on a 132-SM GPU; ranks across every
    # BLOCK_R bucket.
    for dtype in DTYPES:
        for tf32 in ((False, True) if dtype == torch.float32 else (False,)):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            for rank in (4, 64, 100, MAX_TRITON_RANK):
                # rows: 16-row tiles of the x A^T pass (few rows), and 32 / 64 (r > 64 / r <= 64)
                for rows, in_f, out_f in ((40, 72, 40), (20000, 64, 48)):
                    for dropout in (None, DropoutSpec(0.1, 5)):
                        for with_bias in (False, True):
                            recorder.origin = (f"lora_linear {dtype} tf32={tf32} r={rank} N={rows} I={in_f} "
                                               f"dropout={dropout is not None} bias={with_bias}")

                            def randn(*shape):
                                return torch.randn(*shape, generator=gen).to(dtype)

                            x, w = randn(rows, in_f), randn(out_f, in_f)
                            a, b = randn(rank, in_f), randn(out_f, rank)
                            bias = randn(out_f) if with_bias else None
                            y, xa = impl.forward(x, w, a, b, bias, 0.5, dropout)
                            impl.backward(randn(rows, out_f), x, w, a, b, xa, 0.5, dropout, True, True, True)
    torch.backends.cuda.matmul.allow_tf32 = False
    recorder.origin = "lora_dropout_mask"
    impl.keep_mask(DropoutSpec(0.25, 3), 100, 70, torch.device("cpu"))


def record_linear_cross_entropy(recorder: Recorder) -> None:
    import fastmem.backends as backends
    from fastmem.ops.cross_entropy import linear_cross_entropy

    real_runs = backends._backend_runs
    backends._backend_runs = lambda backend, device: True if backend == "triton" else real_runs(backend, device)
    try:
        parameters = inspect.signature(linear_cross_entropy).parameters
        # The options the op has (the list grows with it): each changes the kernels' constexprs.
        options = [{}] + [{name: value} for name, value in (("softcap", 20.0), ("label_smoothing", 0.1),
                                                             ("lse_square_scale", 1e-4)) if name in parameters]
        gen = torch.Generator().manual_seed(1)
        for dtype in DTYPES:
            for vocab in (1000, 4099, 70000):  # tile-sized, odd, and past the largest vocabulary tile
                for objective in ("sft", "ot", "sw"):
                    for option in options:
                        for head_grad in (False, True):
                            recorder.origin = (f"linear_cross_entropy {dtype} V={vocab} {objective} {option} "
                                               f"head_grad={head_grad}")
                            hidden = torch.randn(6, 16, generator=gen).to(dtype).requires_grad_()
                            weight = torch.randn(vocab, 16, generator=gen).to(dtype).requires_grad_(head_grad)
                            labels = torch.randint(0, vocab, (6,), generator=gen)
                            loss = linear_cross_entropy(hidden, weight, labels, objective=objective, backend="triton",
                                                        **option)
                            loss.backward()
    finally:
        backends._backend_runs = real_runs


# ---------------------------------------------------------------------------------------------
# Phase 2: compile for real targets.


class TargetDriver:
    """Enough of a Triton driver for compiling (never launching) for one GPU target."""

    def __init__(self, target: GPUTarget):
        self.target = target

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return f"aot-{self.target.backend}-{self.target.arch}"  # one kernel cache per target

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_benchmarker(self):
        raise RuntimeError("ahead-of-time compilation never benchmarks")


def kernel_name(kernel: JITFunction) -> str:
    return f"{kernel.module}.{kernel.fn.__name__}"


def compile_key(launch: Launch) -> tuple:
    """Triton's own specialization of this launch (the part of the compile key that depends on
    the arguments): per parameter its type ("*bf16", "i32", "constexpr") and attribute / value;
    then the options (warps, stages) and the autotune config it came from."""
    _, _, _, _, binder = launch.kernel.device_caches[triton_driver.active.get_current_device()]
    _, specialization, options = binder(*launch.args, **launch.kwargs)
    names = [p.name for p in launch.kernel.params]
    spec = tuple((name, str(kind), repr(value)) for name, (kind, value) in zip(names, specialization))
    return (kernel_name(launch.kernel), spec, repr(sorted(dict(options).items())), repr(launch.config))


def _dtypes(spec) -> tuple:
    """The pointer element types of a launch ("*bf16", ...): its dtype signature."""
    return tuple(kind for _, kind, _ in spec if kind.startswith("*"))


def cover(keys: dict[tuple, Launch]) -> list[tuple]:
    """A small subset of keys in which, for every dtype signature of a kernel, every
    (parameter, specialization) and every options set (warps, stages) appears at least once
    (greedy set cover): each constexpr value and autotune config is compiled at each dtype."""
    def features(key):
        name, spec, options, config = key
        dtypes = _dtypes(spec)
        return ({(name, dtypes, "options", options), (name, dtypes, "config", config)}
                | {(name, dtypes) + item for item in spec})

    todo = set().union(*(features(k) for k in keys)) if keys else set()
    chosen = []
    remaining = list(keys)
    while todo:
        best = max(remaining, key=lambda k: len(features(k) & todo))
        chosen.append(best)
        remaining.remove(best)
        todo -= features(best)
    return chosen


def defined_kernels() -> set[str]:
    """Every top-level kernel (a JITFunction, possibly autotuned) in fastmem.kernels.triton."""
    package = importlib.import_module(KERNEL_PACKAGE)
    found = set()
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{KERNEL_PACKAGE}.{info.name}")
        for value in vars(module).values():
            inner = value
            while isinstance(inner, (Autotuner, Heuristics)):
                inner = inner.fn
            if isinstance(inner, JITFunction) and inner.module == module.__name__ and inner.fn.__name__.endswith("_kernel"):
                found.add(kernel_name(inner))
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--full", action="store_true", help="compile every distinct launch, not a cover")
    parser.add_argument("--json", help="write the summary here")
    parser.add_argument("--dry-run", action="store_true", help="record and select, compile nothing")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    recorder = Recorder()
    with recording(recorder):
        record_lora_linear(recorder)
        record_linear_cross_entropy(recorder)
    record_s = time.perf_counter() - started

    launched = {kernel_name(launch.kernel) for launch in recorder.launches}
    missing = sorted(defined_kernels() - launched)
    summary = {"launches_recorded": len(recorder.launches), "kernels": sorted(launched), "never_launched": missing,
               "record_s": round(record_s, 1), "targets": {}}
    failures = []
    for arch in args.arch:
        target = GPUTarget("cuda", arch, 32)
        triton_driver.set_active(TargetDriver(target))
        try:
            keys: dict[tuple, Launch] = {}
            for launch in recorder.launches:
                keys.setdefault(compile_key(launch), launch)
            selected = list(keys) if args.full else cover(keys)
            if args.dry_run:
                summary["targets"][f"sm_{arch}"] = {"distinct_keys": len(keys), "selected": len(selected),
                                                    "per_kernel": {k[0]: sum(1 for s in selected if s[0] == k[0])
                                                                   for k in selected}}
                continue
            t0 = time.perf_counter()
            per_kernel: dict[str, int] = {}
            too_big: list[str] = []  # autotune configs this arch cannot launch (the autotuner skips them)
            fitting_autotuned: set[tuple] = set()  # (kernel, dtypes) with at least one config that fits
            for key in selected:
                launch = keys[key]
                per_kernel[key[0]] = per_kernel.get(key[0], 0) + 1
                try:
                    compiled = launch.kernel.warmup(*launch.args, grid=(1,), **launch.kwargs)
                except Exception as exc:  # report every failure, not only the first
                    failures.append(f"sm_{arch} {key[0]} ({launch.origin}): {type(exc).__name__}: "
                                    f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}")
                    continue
                shared = compiled.metadata.shared
                if shared <= SHARED_MEMORY_LIMIT[arch]:
                    if launch.config is not None:
                        fitting_autotuned.add((key[0], _dtypes(key[1])))
                elif launch.config is not None:
                    too_big.append(f"{key[0]} {_dtypes(key[1])} {dict(launch.config)}: {shared} B")
                else:  # a plain launch would fail with "out of resource: shared memory"
                    failures.append(f"sm_{arch} {key[0]} ({launch.origin}): needs {shared} B of shared memory, "
                                    f"the limit is {SHARED_MEMORY_LIMIT[arch]} B")
            for name, dtypes in {(k[0], _dtypes(k[1])) for k in selected if keys[k].config} - fitting_autotuned:
                failures.append(f"sm_{arch} {name} {dtypes}: no autotune config fits in shared memory")
            summary["targets"][f"sm_{arch}"] = {"distinct_keys": len(keys), "compiled": len(selected),
                                                "per_kernel": per_kernel, "autotune_configs_too_big": too_big,
                                                "compile_s": round(time.perf_counter() - t0, 1)}
        finally:
            triton_driver._active = None  # no CUDA driver here: back to "none chosen yet"
    summary["failures"] = failures
    summary["total_s"] = round(time.perf_counter() - started, 1)
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    summary["cpu_s"] = round(sum(u.ru_utime + u.ru_stime for u in usage), 1)  # wall time depends on the load
    text = json.dumps(summary, indent=2)
    if args.json:
        with open(args.json, "w") as handle:
            handle.write(text)
    print(text)
    return 1 if failures or missing else 0


if __name__ == "__main__":
    sys.exit(main())
