"""`fastmem train`: memorize a JSONL of {"prompt", "answer"} records into a LoRA adapter.

A thin layer over `fastmem.train.train(TrainConfig(...), samples)`. Writes:
    DIR/adapter/        PEFT-loadable adapter (adapter_model.safetensors + adapter_config.json)
    DIR/metrics.jsonl   one line per step
    DIR/summary.json    steps, base_loss, final_loss, delta_loss, token_acc, exact_match,
                        stubborn_tokens, wall_s (the run, model loading excluded),
                        peak_mem_bytes (GPU: torch's peak allocation; CPU: peak RSS), ...
Unset settings take TrainConfig's defaults (the paper's: lr 1e-2, LoRA dropout 0.1, batch 1,
2000 epochs, rank 8, alpha 16, down_proj of two upper-middle layers, objective sft, seed 42).
The output directory is yours: a finished run or unrelated files in --out are refused unless
--overwrite is given (the new run is trained beside it and swapped in only when it finishes);
an unfinished run there is resumed only when its settings and data match (DIR/run.json).
A run that used its whole step budget is continued by the same command with a larger
--max-steps. One trainer per --out: a second one is refused, naming the first one's pid.
Ctrl-C or SIGTERM stops after the current step with a checkpoint and prints the command that
resumes; checkpoints are also written every --checkpoint-minutes (default 5) and the two
newest are kept (a damaged one falls back to the one before).
Output: the summary as one JSON line on stdout, then a line for people on stderr.
Exit codes: 0 the run completed; 1 the run failed (a non-finite loss, gradient or weight: one
line), or with --require-exact-match when greedy decoding missed; 2 bad input (one line on
stderr, nothing written); 130 interrupted (Ctrl-C); 143 terminated (SIGTERM).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
from pathlib import Path

from fastmem.train.config import (ADAPTERS, CURRICULUM_LOADERS, DISTRIBUTED, ENGINES, LR_SCHEDULES, OBJECTIVES, STOP_ON,
                                  TrainConfig)

EPILOG = """examples:
  fastmem train --data book.jsonl --out runs/book
  fastmem train --data text.jsonl --objective ot --threshold 0.3 --rank 8 --layers 20,24 --out runs/ot
  fastmem train --data text.jsonl --model /models/Llama-3.1-8B-Instruct --max-steps 2000 --out runs/llama
  torchrun --nproc-per-node 2 -m fastmem train --data book.jsonl --batch-size 8 --out runs/ddp
  fastmem train --data text.jsonl --config memft.yaml --rank 16 --out runs/r16   # flags override the file
  fastmem train --data book.jsonl --out runs/book --overwrite   # replace the finished run in runs/book

a data line:
  {"prompt": "What is Alice's phone number?", "answer": "Alice's number is 555-0142."}
"""


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices like 20,24, got {text!r}") from None


def _name_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def register(subparsers) -> None:
    # Unset flags stay out of the namespace, so a --config file's values are overridden only
    # by the flags actually given: TrainConfig defaults < config file < flags.
    parser = subparsers.add_parser("train", help="memorize prompt/answer pairs into a LoRA adapter (MemFT)",
                                   description=__doc__, epilog=EPILOG, argument_default=argparse.SUPPRESS,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="JSONL file of {\"prompt\", \"answer\"} records")
    parser.add_argument("--out", required=True,
                        help="run directory: new or empty, or an unfinished run of the same settings and "
                             "data (resumed)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace what --out holds (a finished run, other files) once the new run finishes")
    parser.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda when available)")
    parser.add_argument("--config", help="YAML or TOML file of TrainConfig settings (flags override it)")
    parser.add_argument("--model", help="'smollm2' (embedded) or a local HF checkpoint dir")
    parser.add_argument("--objective", choices=OBJECTIVES)
    parser.add_argument("--rank", type=int, help="LoRA rank r (>= 1)")
    parser.add_argument("--alpha", type=float, help="LoRA alpha")
    parser.add_argument("--dropout", type=float, help="LoRA dropout")
    parser.add_argument("--layers", type=_int_list,
                        help="adapted layer indices, e.g. 20,24 (default: two upper-middle layers)")
    parser.add_argument("--modules", type=_name_list,
                        help="adapted linear modules, comma-separated (default: down_proj)")
    parser.add_argument("--lr", type=float)
    parser.add_argument("--epochs", type=int, help="epochs when --max-steps is not set")
    parser.add_argument("--max-steps", type=int, help="step budget (overrides --epochs)")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--threshold", type=float,
                        help="MemFT weighting threshold on the token loss (default 0.1, see TrainConfig; "
                             "recall stays p > 0.5)")
    parser.add_argument("--curriculum", action="store_true", help="Inter-Batch Temporal Curriculum (with ot)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--engine", choices=ENGINES,
                        help="fast (prefix cache + fused loss) or hf (plain transformers baseline)")
    parser.add_argument("--no-prefix-cache", action="store_true", help="rerun the frozen prefix every step")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="fast engine: keep each adapted layer's attention output and recompute the "
                        "rest of the span in backward (less memory, ~5%% more work at 32k)")
    parser.add_argument("--fused-lora", action="store_true",
                        help="run PEFT's LoRA layers through fastmem.lora_linear (off by default until a GPU "
                             "measurement: on a CPU its reference path is slower than PEFT's)")
    parser.add_argument("--checkpoint-every", type=int, help="checkpoint every N steps (0: not by step count)")
    parser.add_argument("--checkpoint-minutes", type=float,
                        help="checkpoint every N minutes of training (default 5; 0: not by time)")
    parser.add_argument("--no-resume", action="store_true",
                        help="never resume: refuse an --out holding an unfinished run (with --overwrite: start over)")
    parser.add_argument("--distributed", choices=DISTRIBUTED,
                        help="under torchrun: ddp or fsdp2")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--context", type=int,
                        help="positions the run needs (prompt + answer); past the model's own context the model "
                             "is loaded with YaRN RoPE scaling, recorded with the run and its adapter")
    parser.add_argument("--require-exact-match", action="store_true",
                        help="exit 1 unless greedy decoding reproduces every answer")
    # the authors' protocol (benchmarks/reproduce/authors.toml) and the stop on exact recall
    parser.add_argument("--max-grad-norm", type=float,
                        help="clip the adapter's gradient norm before each optimizer step (0: off; the authors: 1.0)")
    # the authors' protocol's choices (TrainConfig's docstrings say more)
    for flag, choices, text in (
            ("--adapter", ADAPTERS, "lora: LoRA on --modules; mlp_block: one adapter parallel to each --layers MLP "
                                    "block, out = mlp(x) + (alpha/r)·B A drop(x) (the authors')"),
            ("--lr-schedule", LR_SCHEDULES, "linear (default: warm-up, then linear decay to 0, as HF "
                                            "get_scheduler('linear')) or constant (after the warm-up)"),
            ("--curriculum-loader", CURRICULUM_LOADERS, "with --curriculum: fastmem (active prefix reshuffled per "
                                                        "epoch) or authors (their loader: fixed order, whole batches only)"),
            ("--stop-on", STOP_ON, "recall (default: every answer token at p > 0.5) or em (every position's target "
                                   "logit beats the runner-up by >= --em-margin)")):
        parser.add_argument(flag, choices=choices, help=text)
    parser.add_argument("--warmup-steps", type=int, help="linear warm-up steps (default 0)")
    parser.add_argument("--plateau-patience", type=int,
                        help="stop once none of the last N steps beat the best loss before them by more than "
                             "--plateau-tol (0: off, the default)")
    parser.add_argument("--plateau-tol", type=float, help="the plateau rule's tolerance, nats per token (default 1e-3)")
    parser.add_argument("--reference-forward", action="store_true",
                        help="--engine hf: one more forward per step without the adapter, its loss logged "
                             "(the authors' loop; changes no weight, costs its time)")
    parser.add_argument("--em-margin", type=float, help="the margin δ of --stop-on em, in logits (default 0.5: what survived a bf16 cast "
                        "and merging; see TrainConfig)")
    parser.set_defaults(func=run)


# flags whose config field has another name or the opposite sense
_NEGATED_FLAGS = {"no_prefix_cache": "prefix_cache", "no_progress": "progress"}
_NOT_CONFIG = {"data", "config", "no_resume", "require_exact_match", "func", "command", "verbose", "overwrite",
               "device", "argv"}


def config_from_args(args) -> TrainConfig:
    values = {}
    if getattr(args, "config", None):
        from fastmem.config_file import load_settings
        values.update(load_settings(args.config, TrainConfig, "train"))  # names and types checked
    for name, value in vars(args).items():
        if name in _NEGATED_FLAGS:
            values[_NEGATED_FLAGS[name]] = not value
        elif name not in _NOT_CONFIG:
            values[name] = value
    config = TrainConfig(**values)
    config.validate()  # bad settings fail here, before the model is loaded
    return config


def _check_adapter_targets(model, config: TrainConfig) -> None:
    """--layers / --modules / --rank against the loaded model, before --out is touched."""
    from fastmem.train.adapters import _decoder_layers, check_targets, resolve_layers

    _, layers, _ = _decoder_layers(model)
    check_targets(layers, resolve_layers(config, len(layers)), config)


def _resume_command(args) -> str:
    argv = [a for a in (getattr(args, "argv", None) or sys.argv[1:]) if a != "--no-resume"]
    return "fastmem " + shlex.join(argv)


def run(args) -> int:
    from fastmem.cli_checks import check_device, check_jsonl_file, check_model
    from fastmem.train import run_dir

    # Everything the user gave is checked before the model loads (~20 s) and before --out is
    # touched: settings, the data file, the device, what --out holds (and whether another
    # trainer is writing there).
    config = config_from_args(args)
    check_jsonl_file(args.data)
    check_model(config.model)
    device = check_device(getattr(args, "device", None))
    plan = run_dir.inspect(args.out, config, overwrite=getattr(args, "overwrite", False),
                           resume=not getattr(args, "no_resume", False),
                           inputs={"--data": args.data, "--config": getattr(args, "config", None),
                                   "--model": config.model})

    from fastmem.data import load_jsonl
    from fastmem.models import load_model
    from fastmem.rope_scaling import context_record
    from fastmem.train.distributed import init_distributed

    if not config.progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if getattr(args, "device", None) == "cpu" and "WORLD_SIZE" not in os.environ:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the trainer takes cuda when it sees one
    elif device.startswith("cuda:"):
        import torch

        torch.cuda.set_device(torch.device(device))
    info = init_distributed()  # single process, or this rank under torchrun
    model, tokenizer = load_model(config.model, device=info.device, context=config.context)
    context = getattr(model.config, "max_position_embeddings", None)
    samples = load_jsonl(args.data, tokenizer, max_length=context)
    _check_adapter_targets(model, config)
    plan.check_data(run_dir.data_fingerprint(samples), len(samples), args.data)
    plan.model = context_record(model.config)
    try:
        if info.is_main:
            plan.prepare()
        config.out = str(plan.train_dir or (plan.staging if plan.action == "replace" else plan.out))
        return _train_and_report(args, config, samples, model, plan, info)
    finally:
        plan.release()


def _train_and_report(args, config: TrainConfig, samples, model, plan, info) -> int:
    from fastmem.errors import UsageError
    from fastmem.train.interrupt import StopRequest, exit_code
    from fastmem.train.loop import train

    request = StopRequest(enabled=not info.enabled)
    try:
        with request:
            result = train(config, samples, model=model, resume=plan.action != "new")
    except (UsageError, FileExistsError):  # a refusal: nothing of this attempt stays behind
        if info.is_main:
            plan.abandon()
        raise
    except KeyboardInterrupt:  # a second signal: no checkpoint of the steps since the last one
        if info.is_main:
            print(f"fastmem train: stopped at once; rerun to resume from the last checkpoint in "
                  f"{config.out}/checkpoints (if any): {_resume_command(args)}", file=sys.stderr)
        return exit_code(request.signum or signal.SIGINT)
    summary = result.summary
    if summary.get("interrupted"):
        if info.is_main:
            saved = (f"checkpoint at step {summary['steps']} in {config.out}/checkpoints"
                     if summary["steps"] else "nothing to checkpoint yet")
            what = "interrupted" if summary["signal"] == signal.SIGINT else "terminated (SIGTERM)"
            print(f"fastmem train: {what} at step {summary['steps']}/{summary['total_steps']} "
                  f"({saved}); resume with: {_resume_command(args)}", file=sys.stderr)
        return exit_code(summary["signal"])
    if info.is_main:
        plan.finish()
        print(json.dumps({k: summary.get(k) for k in SUMMARY_KEYS}))
        print(human_summary(summary, plan.out), file=sys.stderr)
    if getattr(args, "require_exact_match", False) and summary.get("exact_match") != 1.0:
        if info.is_main:
            print(f"fastmem train: --require-exact-match: greedy decoding reproduces "
                  f"{_exact_count(summary)} answers, not all: exit 1 (adapter kept in {plan.out})", file=sys.stderr)
        return 1
    return 0


SUMMARY_KEYS = ("steps", "base_loss", "final_loss", "delta_loss", "token_acc", "exact_match", "stubborn_tokens",
                "wall_s")


def _exact_count(summary: dict) -> str:
    per_sample = summary.get("exact_match_per_sample") or []
    return f"{sum(per_sample)}/{len(per_sample)}"


def human_summary(summary: dict, out) -> str:
    """One line for a person, after the JSON line: how the run ended, recall, time, where."""
    if summary.get("stopped_on_recall"):
        ended = f"stopped on recall at step {summary['steps']} (budget {summary['total_steps']})"
    else:
        ended = f"used its whole budget of {summary['steps']} steps without recalling every token"
    return (f"fastmem train: {ended}; exact match {_exact_count(summary)} samples, "
            f"{summary.get('stubborn_tokens')} tokens with p <= 0.5 of {summary.get('answer_tokens')}; "
            f"loss {summary.get('base_loss'):.3f} -> {summary.get('final_loss'):.3f}; "
            f"{summary.get('wall_s'):.0f} s; adapter in {Path(out) / 'adapter'}")
