"""One MemFT training step: fastmem's lean engine against the authors' design, same process.

    ours      cached frozen prefix -> adapted span -> fused loss on the answer rows only
    hf        `--engine hf`: HF + PEFT forward over prompt + answer, full logits, F.cross_entropy
    authors'  the hf step plus what the authors' code adds every step: a second forward of the
              prompt + answer without the adapter, to log a reference loss

Each step is forward + backward + AdamW; timed as the median of --steps steps after one
warm-up, the engines interleaved so machine load hits all of them alike. docs/design.md's CPU
target (section 10): SmolLM2, 1000-token answer, LoRA r8 on down_proj of layers 20 and 24, ours >= 3x
faster than the authors' design.

    python benchmarks/bench_train_step.py                      # the CPU target
    python benchmarks/bench_train_step.py --length 10000 --model /models/Llama-3.1-8B-Instruct
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
AUTHORS = "authors'"


def build(args):
    from fastmem.data import stress_test
    from fastmem.models import load_model
    from fastmem.train import TrainConfig
    from fastmem.train.adapters import adapter_parameters, attach_lora, model_parts
    from fastmem.train.engine_fast import FastEngine
    from fastmem.train.engine_hf import HFEngine
    from fastmem.train.prefix_cache import PrefixCache

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model(args.model, device=device)
    sample = stress_test(tokenizer, args.length, args.ratio, seed=42)
    config = TrainConfig(model=args.model, objective=args.objective, rank=args.rank, alpha=2.0 * args.rank,
                         layers=args.layers, progress=False)
    peft_model, layer_ids = attach_lora(model, config)
    parts = model_parts(peft_model, layer_ids)
    peft_model.to(device).train()
    cache = PrefixCache(peft_model, parts, [sample], device)
    cache.build_all()
    params = list(adapter_parameters(peft_model).values())
    optimizer = torch.optim.AdamW(params, lr=config.lr)
    engines = {"ours": FastEngine(config, parts, cache), "hf": HFEngine(config, peft_model, [sample], device)}
    return device, peft_model, sample, engines, optimizer, layer_ids


def step_fn(name, engine, peft_model, sample, optimizer, device):
    input_ids = torch.tensor([sample.input_ids], device=device)

    def step():
        loss, _ = engine.forward([0])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if name == "authors'":
            with torch.no_grad(), peft_model.disable_adapter():
                peft_model(input_ids=input_ids, use_cache=False).logits  # the per-step reference loss
        if device.type == "cuda":
            torch.cuda.synchronize()
    return step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--length", type=int, default=1000, help="answer tokens")
    parser.add_argument("--ratio", type=float, default=0.25, help="random-token fraction of the answer")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--layers", type=lambda t: [int(v) for v in t.split(",")], default=[20, 24])
    parser.add_argument("--objective", default="sft")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)

    device, peft_model, sample, engines, optimizer, layer_ids = build(args)
    steps = {"ours": step_fn("ours", engines["ours"], peft_model, sample, optimizer, device),
             "hf": step_fn("hf", engines["hf"], peft_model, sample, optimizer, device),
             "authors'": step_fn("authors'", engines["hf"], peft_model, sample, optimizer, device)}
    times = {name: [] for name in steps}
    for name, step in steps.items():
        step()  # warm-up
    for _ in range(args.steps):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(values) for name, values in times.items()}

    stamp = dt.datetime.now(dt.timezone.utc)
    versions = {"torch": torch.__version__, "python": platform.python_version()}
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else \
        f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    lines = [f"# one MemFT training step ({args.objective}), {args.model}", "",
             f"- date: {stamp:%Y-%m-%d %H:%M} UTC", f"- device: {device_name}", f"- versions: {json.dumps(versions)}",
             f"- answer {sample.answer_len} tokens (prompt {len(sample.prompt_ids)}), LoRA r={args.rank} on down_proj "
             f"of layers {layer_ids}, median of {args.steps} interleaved steps after a warm-up",
             f"- command: `python {' '.join(sys.argv)}`", "",
             "| engine | s / step | authors' design ÷ this |", "|---|---|---|"]
    for name, seconds in median.items():
        lines.append(f"| {name} | {seconds:.3f} | {median[AUTHORS] / seconds:.2f}× |")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / f"train_step_{device.type}_{stamp:%Y%m%d}.md"
        path.write_text(text)
        print(f"wrote {path}")
    return median


if __name__ == "__main__":
    main()
