"""Where the time of one training step goes on a long answer (torch.profiler, CPU).

The step the long-answer runs take (`benchmarks/long_answers.py`): the embedded SmolLM2 with
`--context` (YaRN), the stress answer at ρ = 0, LoRA r16 on q/k/v/o/gate/up/down of layers
24-29, fast engine with gradient checkpointing, SFT. One warm-up step on a 256-token answer,
then one profiled step on the ℓ-token answer. The step is cut into phases by
`record_function` ranges (span forward, fused loss, backward, the checkpoint recompute inside
it, optimizer), and every op's self time is charged to its phase and to a kind (attention
kernel, GEMM, other), so the table answers "where does a 16k step go".

    python -m benchmarks.profile_long_step --length 16384 --out benchmarks/results/long_answers_cpu/profile_16384.md
"""

from __future__ import annotations

import argparse
import platform
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

PHASES = ("span forward", "fused loss", "backward", "checkpoint recompute", "optimizer")
ADAPTER = dict(rank=16, alpha=32.0, dropout=0.0, layers=[24, 25, 26, 27, 28, 29],
               modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], lr=1e-2)


def kind_of(op: str) -> str:
    if "scaled_dot_product" in op or "flash_attention" in op:
        return "attention kernel"
    if op in {"aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"} or "mkldnn" in op:
        return "GEMM"
    return "other"


def build(length: int):
    from fastmem.data import stress_test
    from fastmem.models import load_model
    from fastmem.train import TrainConfig
    from fastmem.train.adapters import adapter_parameters, attach_lora, model_parts
    from fastmem.train.engine_fast import FastEngine
    from fastmem.train.prefix_cache import PrefixCache

    context = length + 64
    model, tokenizer = load_model("smollm2", context=context)
    samples = [stress_test(tokenizer, 256, 0.0, seed=43), stress_test(tokenizer, length, 0.0, seed=42)]
    config = TrainConfig(objective="sft", gradient_checkpointing=True, progress=False, context=context, **ADAPTER)
    peft_model, layer_ids = attach_lora(model, config)
    parts = model_parts(peft_model, layer_ids)
    peft_model.train()
    cache = PrefixCache(peft_model, parts, samples, torch.device("cpu"), enabled=True)
    for index in range(len(samples)):  # the frozen prefix of both samples, outside the profiled step
        cache.get(index)
    engine = FastEngine(config, parts, cache)
    optimizer = torch.optim.AdamW(list(adapter_parameters(peft_model).values()), lr=config.lr)
    return engine, optimizer, parts, layer_ids


def label_layers(parts, layer_ids, in_backward: list[bool]) -> None:
    """Each adapted layer's forward as a range; run inside backward it is the recompute."""
    for i in layer_ids:
        layer = parts.layers[i]
        plain = layer.forward

        def forward(*args, _plain=plain, **kwargs):
            name = "checkpoint recompute" if in_backward[0] else "span forward"
            with record_function(name):
                return _plain(*args, **kwargs)
        layer.forward = forward


def step(engine, optimizer, index: int, in_backward: list[bool]) -> None:
    import fastmem.train.engine_fast as engine_fast

    plain_loss = engine_fast.linear_cross_entropy

    def loss_fn(*args, **kwargs):
        with record_function("fused loss"):
            return plain_loss(*args, **kwargs)
    engine_fast.linear_cross_entropy = loss_fn
    try:
        loss, _ = engine.forward([index])
    finally:
        engine_fast.linear_cross_entropy = plain_loss
    in_backward[0] = True
    with record_function("backward"):
        loss.backward()
    in_backward[0] = False
    with record_function("optimizer"):
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def phase_of(event) -> str:
    """The innermost phase range enclosing `event` (recompute before backward: it nests in it)."""
    node, found = event, []
    while node is not None:
        if node.name in PHASES:
            found.append(node.name)
        node = node.cpu_parent
    return found[0] if found else "unlabelled"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="Markdown file for the tables")
    parser.add_argument("--rows", type=int, default=20)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    engine, optimizer, parts, layer_ids = build(args.length)
    in_backward = [False]
    label_layers(parts, layer_ids, in_backward)
    step(engine, optimizer, 0, in_backward)  # warm-up: lazy inits, optimizer state
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(engine, optimizer, 1, in_backward)
    wall = time.perf_counter() - start

    by_phase = defaultdict(lambda: defaultdict(float))
    for event in prof.events():
        if event.name in PHASES or event.name.startswith("ProfilerStep"):
            continue
        by_phase[phase_of(event)][kind_of(event.name)] += event.self_cpu_time_total / 1e6
    total = sum(sum(kinds.values()) for kinds in by_phase.values())
    kinds = ("attention kernel", "GEMM", "other")
    lines = [f"# One training step at ℓ = {args.length} answer tokens (CPU profile)", "",
             f"- {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, `python -m benchmarks.profile_long_step "
             f"--length {args.length} --threads {args.threads}`",
             f"- {platform.processor() or platform.machine()}, {args.threads} torch thread(s); torch {torch.__version__}",
             "- SmolLM2-135M-Instruct with YaRN to ℓ+64 positions, LoRA r16 on all 7 projections of layers 24-29, "
             "fast engine + gradient checkpointing, SFT, AdamW",
             f"- step wall under the profiler: {wall:.1f} s; self CPU time charged below: {total:.1f} s", "",
             "| phase | " + " | ".join(kinds) + " | total s | share |", "|---|" + "---|" * (len(kinds) + 2)]
    for phase in (*PHASES, "unlabelled"):
        if phase not in by_phase:
            continue
        row = by_phase[phase]
        phase_total = sum(row.values())
        lines.append(f"| {phase} | " + " | ".join(f"{row.get(k, 0.0):.2f}" for k in kinds)
                     + f" | {phase_total:.2f} | {100 * phase_total / total:.1f}% |")
    lines += ["", "`backward` excludes the recompute nested in it (charged to its own row). The fused loss "
              "forms its gradient in the forward, so its time is all in its own row.", "",
              "## Top ops (self CPU time)", "", "```",
              prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows), "```"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
