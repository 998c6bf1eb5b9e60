"""`fastmem eval`: score a model (+ adapter) on a JSONL of (prompt, answer) pairs."""

from __future__ import annotations

import argparse
from pathlib import Path


EPILOG = """examples:
  fastmem eval --data book.jsonl --adapter run/adapter --out eval/
  fastmem eval --data book.jsonl --model path/to/hf_checkpoint --no-greedy --out eval/
  fastmem eval --data book.jsonl --adapter run/adapter --metrics run/metrics.jsonl --out eval/

Writes OUT/report.json as {"records": [...], "totals": {...}}: per record exact_match
(greedy decoding reproduces the answer; null with --no-greedy), token_acc (teacher-forced
argmax matches / answer length), first_error (i*, -1 if none), min_prob and the stubborn
tokens (p <= 0.5) with position and text; a probability-grid PNG per record (the first
--grids records), and training_curves.png when --metrics is given.
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="evaluate memorization (EM, token acc, i*, stubborn tokens)",
                                   description="Teacher-forced and greedy evaluation of memorized answers.",
                                   epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help='JSONL of {"prompt": ..., "answer": ...} records')
    parser.add_argument("--model", default="smollm2", help="'smollm2' (embedded) or a local HF checkpoint dir")
    parser.add_argument("--adapter", help="a PEFT adapter directory to apply to the model")
    parser.add_argument("--out", required=True, help="output directory (report.json, PNGs)")
    parser.add_argument("--batch-size", type=int, default=4, help="samples per forward")
    parser.add_argument("--no-greedy", action="store_true", help="skip the greedy-decoding exact-match check")
    parser.add_argument("--no-fast-fail", action="store_true",
                        help="decode every answer token even after the first divergence")
    parser.add_argument("--grids", type=int, default=16, help="probability-grid PNGs for the first N records")
    parser.add_argument("--grid-width", type=int, default=50, help="tokens per row of a probability grid")
    parser.add_argument("--metrics", help="a trainer metrics.jsonl to plot as training_curves.png")
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    parser.set_defaults(func=run)


def _load(args):
    from fastmem.models import load_model

    model, tokenizer = load_model(args.model, device=args.device)
    if args.adapter:
        from peft import PeftModel

        # checked by check_adapter_dir already; local_files_only: a path is never a hub id
        model = PeftModel.from_pretrained(model, args.adapter, local_files_only=True).eval()
    return model, tokenizer


def run(args) -> int:
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.grid_width < 1:
        raise ValueError(f"--grid-width must be >= 1, got {args.grid_width}")
    # every file is checked before the model loads (~20 s), and nothing is written on a refusal
    from fastmem.cli_checks import check_adapter_dir, check_device, check_jsonl_file, check_model, check_out_dir

    check_jsonl_file(args.data)
    check_model(args.model)
    if args.adapter:
        check_adapter_dir(args.adapter)
    if args.metrics:
        check_jsonl_file(args.metrics, "--metrics", records="metrics")
    check_out_dir(args.out)
    args.device = check_device(args.device)
    from fastmem.data import load_jsonl  # imported here: only this command needs the data layer
    from fastmem.eval.evaluator import evaluate
    from fastmem.eval.plots import plot_training_curves

    model, tokenizer = _load(args)
    max_length = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    samples = load_jsonl(args.data, tokenizer, max_length=max_length)
    report = evaluate(model, samples, tokenizer, batch_size=args.batch_size, greedy=not args.no_greedy,
                      fast_fail=not args.no_fast_fail)
    out = Path(args.out)
    path = report.write(out, grids=args.grids, grid_width=args.grid_width)
    if args.metrics:
        plot_training_curves(args.metrics, out / "training_curves.png")

    totals = report.totals()
    em = "not run" if totals["exact_match"] is None else (
        f"{totals['n_exact_match']}/{totals['records']} ({100 * totals['exact_match']:.1f}%)")
    print(f"{totals['records']} records, {totals['tokens']} answer tokens: exact match {em}, "
          f"token acc {100 * totals['token_acc']:.2f}%, {totals['n_stubborn']} stubborn tokens "
          f"(p <= 0.5), min p {totals['min_prob']:.4f}")
    for record in report.records[:10]:
        status = "" if record.exact_match is None else ("EM, " if record.exact_match else "no EM, ")
        print(f"  {record.name or '-'}: {status}token acc {record.token_acc:.3f}, i* {record.first_error}, "
              f"min p {record.min_prob:.3f}, {len(record.stubborn)} stubborn")
    if len(report.records) > 10:
        print(f"  ... {len(report.records) - 10} more in {path}")
    print(f"wrote {path}")
    return 0
