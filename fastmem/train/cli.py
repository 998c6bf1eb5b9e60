"""`fastmem train`: memorize a JSONL of {"prompt", "answer"} records into a LoRA adapter.

A thin layer over `fastmem.train.train(TrainConfig(...), samples)`. Writes:
    DIR/adapter/        PEFT-loadable adapter (adapter_model.safetensors + adapter_config.json)
    DIR/metrics.jsonl   one line per step
    DIR/summary.json    steps, base_loss, final_loss, delta_loss, token_acc, exact_match,
                        stubborn_tokens, wall_s (the run, model loading excluded),
                        peak_mem_bytes (GPU: torch's peak allocation; CPU: peak RSS), ...
Exit codes: 0 the run completed; 1 with --require-exact-match when greedy decoding missed;
2 bad input (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import os

from fastmem.train.config import DISTRIBUTED, ENGINES, OBJECTIVES, TrainConfig

EPILOG = """examples:
  fastmem train --data book.jsonl --out runs/book
  fastmem train --data text.jsonl --objective ot --threshold 0.3 --rank 8 --layers 20,24 --out runs/ot
  fastmem train --data text.jsonl --model /models/Llama-3.1-8B-Instruct --max-steps 2000 --out runs/llama
  torchrun --nproc-per-node 2 -m fastmem train --data book.jsonl --batch-size 8 --out runs/ddp
"""


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices like 20,24, got {text!r}") from None


def _name_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def register(subparsers) -> None:
    parser = subparsers.add_parser("train", help="memorize prompt/answer pairs into a LoRA adapter (MemFT)",
                                   description=__doc__, epilog=EPILOG,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = TrainConfig()
    parser.add_argument("--data", required=True, help="JSONL file of {\"prompt\", \"answer\"} records")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--model", default=defaults.model, help="'smollm2' (embedded) or a local HF checkpoint dir")
    parser.add_argument("--objective", choices=OBJECTIVES, default=defaults.objective)
    parser.add_argument("--rank", type=int, default=defaults.rank, help="LoRA rank r (>= 1)")
    parser.add_argument("--alpha", type=float, default=defaults.alpha, help="LoRA alpha")
    parser.add_argument("--dropout", type=float, default=defaults.dropout, help="LoRA dropout")
    parser.add_argument("--layers", type=_int_list, default=None,
                        help="adapted layer indices, e.g. 20,24 (default: two upper-middle layers)")
    parser.add_argument("--modules", type=_name_list, default=defaults.modules,
                        help="adapted linear modules, comma-separated (default: down_proj)")
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--epochs", type=int, default=defaults.epochs, help="epochs when --max-steps is not set")
    parser.add_argument("--max-steps", type=int, default=None, help="step budget (overrides --epochs)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--threshold", type=float, default=defaults.threshold,
                        help="MemFT weighting threshold on the token loss (recall stays p > 0.5)")
    parser.add_argument("--curriculum", action="store_true", help="Inter-Batch Temporal Curriculum (with ot)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--engine", choices=ENGINES, default=defaults.engine,
                        help="fast (prefix cache + fused loss) or hf (plain transformers baseline)")
    parser.add_argument("--no-prefix-cache", action="store_true", help="rerun the frozen prefix every step")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute the adapted span in backward")
    parser.add_argument("--fused-lora", action="store_true", help="run PEFT's LoRA layers through fastmem.lora_linear (off by default until a GPU "
                             "measurement: on a CPU its reference path is slower than PEFT's)")
    parser.add_argument("--checkpoint-every", type=int, default=0, help="checkpoint every N steps (0: never)")
    parser.add_argument("--no-resume", action="store_true", help="ignore checkpoints already in --out")
    parser.add_argument("--distributed", choices=DISTRIBUTED, default=defaults.distributed,
                        help="under torchrun: ddp or fsdp2")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--require-exact-match", action="store_true",
                        help="exit 1 unless greedy decoding reproduces every answer")
    parser.set_defaults(func=run)


def config_from_args(args) -> TrainConfig:
    config = TrainConfig(
        model=args.model, objective=args.objective, rank=args.rank, alpha=args.alpha, dropout=args.dropout,
        modules=args.modules, layers=args.layers, lr=args.lr, epochs=args.epochs, max_steps=args.max_steps,
        batch_size=args.batch_size, threshold=args.threshold, curriculum=args.curriculum, seed=args.seed,
        out=args.out, engine=args.engine, prefix_cache=not args.no_prefix_cache,
        gradient_checkpointing=args.gradient_checkpointing, fused_lora=args.fused_lora,
        checkpoint_every=args.checkpoint_every, distributed=args.distributed, progress=not args.no_progress)
    config.validate()  # bad settings fail here, before the model is loaded
    return config


def run(args) -> int:
    from fastmem.data import load_jsonl
    from fastmem.models import load_model
    from fastmem.train.distributed import init_distributed
    from fastmem.train.loop import train

    config = config_from_args(args)
    if not os.path.isfile(args.data):  # before the model loads (tens of seconds for SmolLM2)
        raise FileNotFoundError(f"data file {args.data} does not exist")
    if args.no_progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    info = init_distributed()  # single process, or this rank under torchrun
    model, tokenizer = load_model(config.model, device=info.device)
    context = getattr(model.config, "max_position_embeddings", None)
    samples = load_jsonl(args.data, tokenizer, max_length=context)
    result = train(config, samples, model=model, tokenizer=tokenizer, resume=not args.no_resume)
    summary = result.summary
    keys = ("steps", "base_loss", "final_loss", "delta_loss", "token_acc", "exact_match", "stubborn_tokens", "wall_s")
    if info.is_main:
        print(json.dumps({k: summary.get(k) for k in keys}))
    if args.require_exact_match and summary.get("exact_match") != 1.0:
        return 1
    return 0
