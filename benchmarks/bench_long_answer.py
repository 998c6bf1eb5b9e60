"""Cost growth with answer length: one training step (time, peak memory) vs ℓ, per engine.

    fast       cached frozen prefix -> adapted span -> fused loss on the answer rows
    fast-ckpt  the same with the adapted span checkpointed (`--gradient-checkpointing`)
    hf         `--engine hf`: transformers + PEFT over prompt + answer, full logits

Every (engine, ℓ) cell runs in its own subprocess, so its peak RSS is its own, under an
address-space cap (RLIMIT_AS) that keeps a runaway cell from taking down a shared machine; a
cell that hits the cap is recorded as "over the cap". Results are appended to a JSON-lines file
as each cell lands and a rerun skips the cells already there (resumable); `--report` turns the
file into a Markdown table and a log-log PNG.

Weights: SmolLM2-135M (the embedded GGUF) up to 16,384 answer tokens, loaded past its 8192
positions with YaRN RoPE scaling (`load_model(context=...)`, as `fastmem train --context`; rows of
2026-11 files took random weights from 16,000 on); past that, SmolLM2's architecture with random
weights and a longer position range (a step's
cost does not depend on the weights, except through MemFT's active rows: the default objective is
issue 12's OT at threshold 0.3, and with random weights every answer row is active — the fast
engine's worst case; the rows each cell's step trained on are recorded).
Protocol per cell: build the frozen-prefix cache (random-weight cells: the span's input is a
random tensor, not the prefix's output — same cost, no 29-layer forward at 32k), one warm-up step on a 256-token sample (lazy
inits, optimizer state), reset the kernel's peak-RSS counter (/proc/self/clear_refs), then time
`--steps` steps of forward + backward + AdamW on the ℓ-token sample. "step peak" is the
process's peak resident set during those steps (model weights and cache included).

    python benchmarks/bench_long_answer.py                    # run missing cells, then report
    python benchmarks/bench_long_answer.py --report           # table + PNG from what landed
    python benchmarks/bench_long_answer.py --profile fast --length 4000   # torch.profiler table
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import fcntl
import tempfile
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
ENGINES = ("fast", "fast-ckpt", "hf")
LENGTHS = (1000, 2000, 4000, 8000, 16000, 32000)
SMOLLM2_CONTEXT = 8192
PROMPT_ROOM = 64  # the chat-templated stress prompt (37 tokens) and the end of turn
REAL_WEIGHTS_UP_TO = 16384
WARMUP_TOKENS = 256
CAP_EXIT = 3  # a cell's exit status when it ran out of its address-space cap


# ---------------------------------------------------------------- one cell (in a subprocess)

def _rss_bytes(field: str) -> int:
    """VmRSS / VmHWM of this process in bytes (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _random_sample(name: str, prompt_len: int, answer_len: int, vocab: int, seed: int):
    from fastmem.data.sample import MemorySample

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (prompt_len + answer_len,), generator=g).tolist()
    return MemorySample(name, "prompt", "answer", tuple(ids[:prompt_len]), tuple(ids[prompt_len:]))


def _random_prefix_entry(short, parts, sample):
    """The span's inputs for `sample` without running the frozen prefix: with random weights its
    output is as arbitrary as a random tensor, and a step's cost does not depend on it (at 32k
    tokens the 29-layer prefix forward alone costs ~40 TFLOP, hours on a shared 2-core CPU).
    Rotary embeddings and position ids are the model's own for the full length; the other
    keyword arguments (mask None, no cache) are the short sample's, which the decoder passed."""
    from fastmem.train.prefix_cache import PrefixEntry

    seq = len(sample.input_ids)
    hidden = torch.randn(1, seq, short.hidden.shape[-1], dtype=short.hidden.dtype, generator=torch.Generator().manual_seed(0))
    position_ids = torch.arange(seq).unsqueeze(0)
    rotary = parts.decoder.rotary_emb(hidden, position_ids)
    layer_kwargs = []
    for kwargs in short.layer_kwargs:
        kwargs = dict(kwargs)
        if "position_embeddings" in kwargs:
            kwargs["position_embeddings"] = rotary
        if "position_ids" in kwargs:
            kwargs["position_ids"] = position_ids
        layer_kwargs.append(kwargs)
    return PrefixEntry(hidden=hidden, layer_kwargs=layer_kwargs,
                       answer_ids=torch.tensor(sample.answer_ids, dtype=torch.long), prompt_len=len(sample.prompt_ids),
                       base_loss_sum=float("nan"))


def build_cell(engine_name: str, length: int, weights: str, args):
    """(step function, the ℓ-token sample, description) for one cell."""
    from fastmem.models import SMOLLM2, load_model, smollm2_gguf_path
    from fastmem.train import TrainConfig
    from fastmem.train.adapters import adapter_parameters, attach_lora, model_parts
    from fastmem.train.engine_fast import FastEngine
    from fastmem.train.engine_hf import HFEngine
    from fastmem.train.prefix_cache import PrefixCache

    device = torch.device("cpu")
    if weights == "real":
        from fastmem.data import stress_test

        # past SmolLM2's 8192 positions: the real weights with YaRN RoPE scaling (`--context`)
        context = PROMPT_ROOM + length if PROMPT_ROOM + length > SMOLLM2_CONTEXT else None
        model, tokenizer = load_model(SMOLLM2, device=device, context=context)
        sample = stress_test(tokenizer, length, 0.0, seed=42)
        warm = stress_test(tokenizer, WARMUP_TOKENS, 0.0, seed=43)
    else:
        from transformers import AutoConfig, LlamaForCausalLM

        gguf = smollm2_gguf_path()
        cfg = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
        prompt_len = 37  # SmolLM2's chat-templated stress prompt
        cfg.max_position_embeddings = max(SMOLLM2_CONTEXT, prompt_len + length)
        torch.manual_seed(0)
        model = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa").eval().requires_grad_(False)
        sample = _random_sample("long", prompt_len, length, cfg.vocab_size, 42)
        warm = _random_sample("warm", prompt_len, WARMUP_TOKENS, cfg.vocab_size, 43)
    config = TrainConfig(model=SMOLLM2, objective=args.objective, threshold=args.threshold, rank=args.rank,
                         alpha=2.0 * args.rank, layers=args.layers, modules=args.modules, progress=False,
                         gradient_checkpointing=engine_name == "fast-ckpt",
                         engine="hf" if engine_name == "hf" else "fast")
    peft_model, layer_ids = attach_lora(model, config)
    parts = model_parts(peft_model, layer_ids)
    peft_model.to(device).train()
    samples = [warm, sample]
    cache = PrefixCache(peft_model, parts, samples, device, enabled=config.engine == "fast")
    if config.engine == "fast":
        cache.get(0)  # the span's inputs only (no base loss: not part of a step)
        if weights == "random":
            cache.entries[1] = _random_prefix_entry(cache.entries[0], parts, sample)
        else:
            cache.get(1)
        engine = FastEngine(config, parts, cache)
    else:
        engine = HFEngine(config, peft_model, samples, device)
    params = list(adapter_parameters(peft_model).values())
    optimizer = torch.optim.AdamW(params, lr=config.lr)

    def step(index: int) -> int:
        """One training step; returns how many answer rows carried a non-zero MemFT weight."""
        loss, stats = engine.forward([index])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return int((stats.weight > 0).sum())

    return step, sample, layer_ids


def run_cell(args) -> dict:
    """Measure one cell in this process; print one JSON line."""
    torch.set_num_threads(args.threads)
    step, sample, layer_ids = build_cell(args.cell, args.length, args.weights, args)
    step(0)  # warm-up on the short sample
    rss_before = _rss_bytes("VmRSS")
    peak_reset = _reset_peak_rss()
    times, cpu_times, active = [], [], []
    for _ in range(args.steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        active.append(step(1))
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    return {"engine": args.cell, "length": args.length, "weights": args.weights, "status": "ok",
            "objective": args.objective, "threshold": args.threshold, "active_rows": active,
            "step_s": min(times), "step_s_all": times, "step_cpu_s": min(cpu_times), "step_cpu_s_all": cpu_times,
            "rss_before_step": rss_before,
            "step_peak_rss": _rss_bytes("VmHWM") if peak_reset else None,
            "process_peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "prompt_len": len(sample.prompt_ids), "answer_len": sample.answer_len, "layers": layer_ids,
            "rank": args.rank, "modules": args.modules, "threads": torch.get_num_threads()}


# ---------------------------------------------------------------- the driver

def weights_for(length: int) -> str:
    """The real SmolLM2 (RoPE-scaled past its context) up to REAL_WEIGHTS_UP_TO answer tokens;
    random weights past that, where the frozen prefix's setup forward alone would take a CPU
    many minutes."""
    return "real" if length <= REAL_WEIGHTS_UP_TO else "random"


def load_results(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _limit_address_space(cap_bytes: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_AS, (cap_bytes, cap_bytes))
    return apply


@contextlib.contextmanager
def _big_cell_lock(engine: str, length: int, results: Path):
    """Drivers sharing one results file run at most one memory-heavy cell (hf, or the unchecked
    fast engine from 8k on) at a time, so parallel drivers stay within the machine's budget."""
    if engine == "hf" or (engine == "fast" and length >= 8000):
        with open(Path(tempfile.gettempdir()) / f"{results.name}.lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield
    else:
        yield


def run_missing(args) -> None:
    path = Path(args.results)
    cap = int(args.cap_gb * 2**30)
    for length in args.lengths:
        for engine in args.engines:
            # Re-read before every cell: several drivers may share one results file.
            if (engine, length) in {(r["engine"], r["length"]) for r in load_results(path)}:
                continue
            weights = weights_for(length)
            cmd = [sys.executable, __file__, "--cell", engine, "--length", str(length), "--weights", weights,
                   "--steps", str(args.steps), "--objective", args.objective, "--threshold", str(args.threshold), "--threads", str(args.threads), "--rank", str(args.rank),
                   "--modules", ",".join(args.modules),
                   "--layers", ",".join(map(str, args.layers))]
            print(f"[{dt.datetime.now():%H:%M:%S}] {engine} l={length} ({weights} weights) ...", flush=True)
            start = time.perf_counter()
            with _big_cell_lock(engine, length, path):
                proc = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=_limit_address_space(cap))
            wall = time.perf_counter() - start
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if proc.returncode == 0 and lines:
                row = json.loads(lines[-1])
            elif proc.returncode == CAP_EXIT or "MemoryError" in proc.stderr or "can't allocate" in proc.stderr \
                    or "DefaultCPUAllocator" in proc.stderr:
                row = {"engine": engine, "length": length, "weights": weights, "status": "over_cap"}
            else:
                print(proc.stderr[-3000:], file=sys.stderr)
                row = {"engine": engine, "length": length, "weights": weights, "status": "error",
                       "returncode": proc.returncode, "stderr_tail": proc.stderr[-500:]}
            row.update(cap_gb=args.cap_gb, cell_wall_s=wall,
                       date=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                       load_avg=os.getloadavg())
            with path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"    -> {row['status']} {row.get('step_s', '')} s, "
                  f"step peak {(row.get('step_peak_rss') or 0) / 2**30:.2f} GiB", flush=True)


# ---------------------------------------------------------------- FLOP model (the bound)

def step_flops(length: int, prompt: int = 37, n_layers: int = 30, first: int = 20, hidden: int = 576,
               inter: int = 1536, heads: int = 9, kv_heads: int = 3, head_dim: int = 64, vocab: int = 49152,
               active: float = 1.0) -> dict:
    """Matmul FLOPs of one step per engine (SmolLM2 shape, LoRA terms neglected: r << H).

    Per layer over S tokens: projections + MLP `lin = 2·S·(H·(q+2kv) + q·H + 3·H·I)`; causal
    attention forward `2·2·heads·d·S²/2`, its flash backward 2.5× that (it recomputes the
    scores, then dV, dP, dQ, dK); the frozen weights' backward needs only dX (= lin). Both
    engines back-propagate through the same layers: the span above the lowest adapted layer
    (that layer's LoRA sits after its attention). fast: the span's forward, the head over the
    answer rows once forward and over the `active` fraction backward; checkpointing adds the
    span's `lin` again (the attention outputs are kept). hf: every layer's forward and the head
    over all S rows, forward and backward (the prompt rows' zero gradients still go through
    the GEMM).
    """
    seq = prompt + length
    lin = 2 * seq * (hidden * (heads * head_dim + 2 * kv_heads * head_dim) + heads * head_dim * hidden
                     + 3 * hidden * inter)
    attn_fwd = 2 * heads * head_dim * seq * seq
    fwd, bwd = lin + attn_fwd, lin + 2.5 * attn_fwd
    span = n_layers - first
    head = 2 * hidden * vocab
    fast = span * fwd + (span - 1) * bwd + (1 + active) * head * length
    return {"fast": fast, "fast-ckpt": fast + span * lin,
            "hf": n_layers * fwd + (span - 1) * bwd + 2 * head * seq,
            "attention_share_fast": (span * attn_fwd + (span - 1) * 2.5 * attn_fwd) / fast}


# ---------------------------------------------------------------- report

def _gib(value) -> str:
    return f"{value / 2**30:.2f}"


def report(args) -> Path:
    rows = {(r["engine"], r["length"]): r for r in load_results(Path(args.results))}
    lengths = sorted({length for _, length in rows})
    versions = {"torch": torch.__version__, "python": platform.python_version()}
    try:
        import peft
        import transformers
        versions.update(transformers=transformers.__version__, peft=peft.__version__)
    except ImportError:
        pass
    any_row = next(iter(rows.values()))
    dates = sorted({r["date"] for r in rows.values()})
    caps = sorted({r["cap_gb"] for r in rows.values()})
    cap = " / ".join(f"{c:g}" for c in caps) + " (per cell: `cap_gb` in the JSONL)" if len(caps) > 1 else f"{caps[0]:g}"
    lines = [
        "# One training step vs answer length ℓ (SmolLM2 shape, CPU)", "",
        f"- dates: {dates[0]} … {dates[-1]}",
        f"- device: CPU ({platform.machine()}, {os.cpu_count()} cores, {any_row.get('threads', '?')} torch threads), "
        "shared with other jobs (1-min load average per cell in the JSONL)",
        f"- versions: {json.dumps(versions)}",
        f"- shapes: SmolLM2-135M (30 layers, H=576, I=1536, 9 heads / 3 KV heads, V=49152), fp32; "
        f"prompt {any_row.get('prompt_len', 37)} tokens + ℓ answer tokens, batch 1; LoRA r={any_row.get('rank', 8)} "
        f"on {','.join(any_row.get('modules', ['down_proj']))} of layers {any_row.get('layers', [20, 24])}; objective {any_row.get('objective', '?')} "
        f"(threshold {any_row.get('threshold', '?')}); the fast engine's head backward runs only over active rows "
        "(column 'active'), hf's always over all",
        "- weights: " + "; ".join(
            f"ℓ = {', '.join(str(n) for n in sorted({r['length'] for r in rows.values() if r.get('weights') == kind}))}: "
            + {"real": "the real SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized; past 8192 positions with YaRN "
                       "RoPE scaling)",
               "random": "**random weights**, SmolLM2's architecture with max_position_embeddings = prompt + ℓ "
                         "(a step's cost does not depend on the weights; every answer row is then active), and the "
                         "fast engines' cached span input is a random tensor instead of the frozen prefix's output"}[kind]
            for kind in ("real", "random") if any(r.get("weights") == kind for r in rows.values())),
        f"- protocol: each cell its own process under RLIMIT_AS = {cap} GiB; warm-up step on a 256-token sample; "
        "time = the step (forward + backward + AdamW) on the ℓ-token sample; step peak = peak RSS during that "
        "step (VmHWM reset just before it; model, prefix cache and libraries included)",
        f"- command: `python benchmarks/bench_long_answer.py` (raw rows: `{Path(args.results).name}`)", "",
        f"Time: the step's process CPU seconds ({any_row.get('threads', '?')} torch thread(s): CPU seconds ≈ "
        "threads × the step's time on quiet cores), wall seconds in brackets (inflated by any other jobs on the "
        "machine); ratios likewise: CPU (wall).", "",
        "| ℓ | weights | active | fast s | fast-ckpt s | hf s | hf ÷ fast | hf ÷ fast-ckpt | fast GiB "
        "| fast-ckpt GiB | hf GiB | fast ÷ hf mem | fast-ckpt ÷ hf mem |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(engine, length):
        return rows.get((engine, length))

    def fmt_time(r):
        if r is None:
            return "–"
        if r["status"] == "ok":
            return f"{r['step_cpu_s']:.1f} ({r['step_s']:.0f})"
        return "over cap" if r["status"] == "over_cap" else "error"

    def fmt_mem(r):
        if r is None:
            return "–"
        return _gib(r["step_peak_rss"]) if r["status"] == "ok" else \
            (f"> {r['cap_gb']} (cap)" if r["status"] == "over_cap" else "error")

    def ratio_time(hf, fast):
        if hf is None or fast is None or fast["status"] != "ok":
            return "–"
        if hf["status"] == "over_cap":
            return "hf over cap"
        if hf["status"] != "ok":
            return "–"
        return f"{hf['step_cpu_s'] / fast['step_cpu_s']:.2f}× ({hf['step_s'] / fast['step_s']:.2f}×)"

    def ratio_mem(fast, hf):
        if hf is None or fast is None or fast["status"] != "ok":
            return "–"
        if hf["status"] == "over_cap":
            return f"< {fast['step_peak_rss'] / (hf['cap_gb'] * 2**30):.2f}"
        return f"{fast['step_peak_rss'] / hf['step_peak_rss']:.2f}" if hf["status"] == "ok" else "–"

    for length in lengths:
        f, c, h = cell("fast", length), cell("fast-ckpt", length), cell("hf", length)
        weights = next((r["weights"] for r in (f, c, h) if r), "?")
        active = next((r["active_rows"][0] for r in (f, c) if r and r.get("active_rows")), None)
        active = f"{active}/{length}" if active is not None else "–"
        lines.append(f"| {length} | {weights} | {active} | {fmt_time(f)} | {fmt_time(c)} | {fmt_time(h)} | {ratio_time(h, f)} "
                     f"| {ratio_time(h, c)} | {fmt_mem(f)} | {fmt_mem(c)} | {fmt_mem(h)} | {ratio_mem(f, h)} "
                     f"| {ratio_mem(c, h)} |")
    lines += ["", "FLOP model of one step (`step_flops`, SFT: every row active; matmuls only): the most the "
              "fast engine can gain over hf by doing less arithmetic.", "",
              "| ℓ | fast TFLOP | fast-ckpt TFLOP | hf TFLOP | hf ÷ fast | hf ÷ fast-ckpt | attention share of fast |",
              "|---|---|---|---|---|---|---|"]
    for length in sorted(set(lengths) | set(LENGTHS)):
        f = step_flops(length)
        lines.append(f"| {length} | {f['fast'] / 1e12:.2f} | {f['fast-ckpt'] / 1e12:.2f} | {f['hf'] / 1e12:.2f} "
                     f"| {f['hf'] / f['fast']:.2f}× | {f['hf'] / f['fast-ckpt']:.2f}× | {f['attention_share_fast']:.0%} |")
    text = "\n".join(lines) + "\n"
    out = RESULTS / f"long_answer_cpu_{args.tag}.md"
    out.write_text(text + (Path(args.notes).read_text() if args.notes and Path(args.notes).is_file() else ""))
    _plot(rows, lengths, RESULTS / f"long_answer_cpu_{args.tag}.png")
    print(text)
    return out


def _plot(rows, lengths, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    threads = next((r.get("threads") for r in rows.values() if r.get("threads")), "?")
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    for engine, marker in zip(ENGINES, "os^"):
        ok = [(n, rows[(engine, n)]) for n in lengths if rows.get((engine, n), {}).get("status") == "ok"]
        if ok:
            line, = ax_t.loglog([n for n, _ in ok], [r["step_cpu_s"] for _, r in ok], marker=marker, label=engine)
            ax_t.loglog([n for n, _ in ok], [r["step_s"] for _, r in ok], marker=marker, ls=":", alpha=0.4,
                        color=line.get_color(), label=f"{engine} (wall, shared machine)")
            ax_m.loglog([n for n, _ in ok], [r["step_peak_rss"] / 2**30 for _, r in ok], marker=marker, label=engine)
        over = [n for n in lengths if rows.get((engine, n), {}).get("status") == "over_cap"]
        if over:
            cap = rows[(engine, over[0])]["cap_gb"]
            ax_m.scatter(over, [cap] * len(over), marker="x", color="red", zorder=5,
                         label=f"{engine}: over {cap} GiB cap")
    ax_t.set(xlabel="answer tokens ℓ", ylabel="s / training step", title=f"step time: CPU s ({threads} thread(s)); dotted: wall")
    ax_m.set(xlabel="answer tokens ℓ", ylabel="peak RSS during the step (GiB)", title="step peak memory")
    for ax in (ax_t, ax_m):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    first = next(iter(rows.values()))
    random_from = min((n for (_, n), r in rows.items() if r.get("weights") == "random"), default=None)
    fig.suptitle(f"SmolLM2 shape, CPU, LoRA r{first.get('rank', 8)} on {','.join(first.get('modules', ['down_proj']))} "
                 f"of layers {first.get('layers', [20, 24])}"
                 + (f" (ℓ ≥ {random_from}: random weights)" if random_from else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ---------------------------------------------------------------- profile

def profile(args) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    torch.set_num_threads(args.threads)
    step, _, _ = build_cell(args.profile, args.length, weights_for(args.length), args)
    step(0)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        step(1)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows)
    print(table)
    if args.profile_out:
        Path(args.profile_out).write_text(table)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=lambda t: [int(v) for v in t.split(",")], default=list(LENGTHS))
    parser.add_argument("--engines", type=lambda t: t.split(","), default=list(ENGINES))
    parser.add_argument("--layers", type=lambda t: [int(v) for v in t.split(",")], default=[20, 24])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--modules", type=lambda t: t.split(","), default=["down_proj"])
    parser.add_argument("--objective", default="ot", choices=("sft", "ot", "sw"))
    parser.add_argument("--threshold", type=float, default=0.3, help="MemFT weighting threshold (issue 12: ot 0.3)")
    parser.add_argument("--steps", type=int, default=1, help="timed steps per cell (the minimum is reported)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--cap-gb", type=float, default=10.0, help="RLIMIT_AS of each cell, GiB")
    parser.add_argument("--tag", default=dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d"))
    parser.add_argument("--results", default=None, help="JSON-lines file (default results/long_answer_cpu_TAG.jsonl)")
    parser.add_argument("--notes", default=str(RESULTS / "long_answer_cpu_notes.md"),
                        help="Markdown appended to the report (profiles, bounds)")
    parser.add_argument("--report", action="store_true", help="only write the table and PNG")
    parser.add_argument("--cell", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, default=4000)
    parser.add_argument("--weights", choices=("real", "random"), default="real")
    parser.add_argument("--profile", choices=ENGINES, help="profile one step of this engine at --length")
    parser.add_argument("--profile-out", default=None)
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args(argv)
    args.results = args.results or str(RESULTS / f"long_answer_cpu_{args.tag}.jsonl")

    if args.cell:
        try:
            print(json.dumps(run_cell(args)), flush=True)
        except MemoryError:
            sys.exit(CAP_EXIT)
        except RuntimeError as err:  # torch's allocator reports a failed malloc as RuntimeError
            if "allocate" in str(err):
                sys.exit(CAP_EXIT)
            raise
        return
    if args.profile:
        profile(args)
        return
    if not args.report:
        RESULTS.mkdir(parents=True, exist_ok=True)
        run_missing(args)
    report(args)


if __name__ == "__main__":
    main()
