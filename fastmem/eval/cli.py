"""`fastmem eval`: score a model (+ adapter) on a JSONL of (prompt, answer) pairs."""

from __future__ import annotations

import argparse
from pathlib import Path

from fastmem.errors import UsageError

EPILOG = """examples:
  fastmem eval --data book.jsonl --adapter run/adapter --out eval/
  fastmem eval --data book.jsonl --adapter run/adapter --decode --out eval/
  fastmem eval --data book.jsonl --adapter run/adapter --metrics run/metrics.jsonl --out eval/

Exact match and i* come from one teacher-forced pass: greedy decoding reproduces the answer
iff every teacher-forced argmax is its target (ties count as wrong), and the first wrong
position is the greedy first divergence i*. A sample whose top-1 margin (target logit minus
the best other) comes within the dtype's numerical noise at a deciding position is decoded to
confirm; --decode decodes every sample (one step per answer token) as an independent check.

Writes OUT/report.json as {"records": [...], "totals": {...}}: per record exact_match,
first_error (i*, -1 if none), decided_by ("teacher_forcing" | "decoding"),
confirmed_by_decoding, the teacher-forced verdict and the decode's where one ran
(decode_agrees), token_acc, min_prob, min_margin, the per-token margins, the near ties and the
stubborn tokens (p <= 0.5) with position and text; a probability-grid PNG per record (the
first --grids records), and training_curves.png when --metrics is given.
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
    decode = parser.add_mutually_exclusive_group()
    decode.add_argument("--decode", dest="decode", action="store_const", const="all", default="auto",
                        help="greedy-decode every sample too (an independent check; one step per answer token)")
    decode.add_argument("--no-decode", dest="decode", action="store_const", const="none",
                        help="never decode, not even to confirm a near tie (reported as unconfirmed)")
    decode.add_argument("--no-greedy", dest="decode", action="store_const", const="none",
                        help=argparse.SUPPRESS)  # the old name of --no-decode
    parser.add_argument("--no-fast-fail", action="store_true",
                        help="when decoding, decode every answer token even after the first divergence")
    parser.add_argument("--grids", type=int, default=16, help="probability-grid PNGs for the first N records")
    parser.add_argument("--grid-width", type=int, default=50, help="tokens per row of a probability grid")
    parser.add_argument("--metrics", help="a trainer metrics.jsonl to plot as training_curves.png")
    parser.add_argument("--context", type=int, default=None,
                        help="the --context the adapter was trained with (RoPE scaling past the model's own "
                             "positions; an adapter trained with it is refused without it)")
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (as train and sweep)")
    parser.set_defaults(func=run)


def _load(args):
    from fastmem.models import load_config, load_model
    from fastmem.rope_scaling import check_adapter_context

    config = None  # the model's own, read by from_pretrained, unless an adapter or --context needs it first
    if args.adapter:  # the config alone (seconds) tells a mismatched scaling before the weights load
        config = load_config(args.model, context=args.context)
        check_adapter_context(args.adapter, config, args.context)
    model, tokenizer = load_model(args.model, device=args.device, context=args.context, config=config)
    if args.adapter:
        from fastmem.integrations.peft_adapter import load_adapter

        # checked by check_adapter_dir already (a LoRA or an MLP-block adapter)
        try:
            model = load_adapter(model, args.adapter).eval()
        except RuntimeError as err:  # torch's load_state_dict: weights of other shapes than the config says
            if "size mismatch" not in str(err):
                raise
            first = next(line.strip() for line in str(err).splitlines() if "size mismatch" in line)
            raise UsageError(f"--adapter {args.adapter} does not fit its adapter_config.json or --model "
                             f"{args.model} ({first})") from None
    from fastmem.nn.cpu_linear import use_onednn_linears

    use_onednn_linears(model)  # CPU fp32: teacher forcing and decode prefill through oneDNN
    return model, tokenizer


def run(args) -> int:
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.grid_width < 1:
        raise UsageError(f"--grid-width must be >= 1, got {args.grid_width}")
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
    from fastmem.rope_scaling import context_record

    model, tokenizer = _load(args)
    max_length = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    samples = load_jsonl(args.data, tokenizer, max_length=max_length)
    report = evaluate(model, samples, tokenizer, batch_size=args.batch_size, decode=args.decode,
                      fast_fail=not args.no_fast_fail, progress=not args.no_progress)
    report.model = context_record(model.config)
    out = Path(args.out)
    path = report.write(out, grids=args.grids, grid_width=args.grid_width)
    if args.metrics:
        plot_training_curves(args.metrics, out / "training_curves.png")

    totals = report.totals()
    em = f"{totals['n_exact_match']}/{totals['records']} ({100 * totals['exact_match']:.1f}%)"
    print(f"{totals['records']} records, {totals['tokens']} answer tokens: exact match {em}, "
          f"token acc {100 * totals['token_acc']:.2f}%, {totals['n_stubborn']} stubborn tokens "
          f"(p <= 0.5), min p {totals['min_prob']:.4f}, min margin {totals['min_margin']:.4f}")
    print(f"decided by one teacher-forced pass ({report.timing['teacher_forcing_s']:.1f} s); decoded "
          f"{totals['decoded']} in {report.timing['decoding_s']:.1f} s "
          f"({'every sample, --decode' if args.decode == 'all' else 'near ties only'}): "
          f"confirmed by decoding: {', '.join(totals['confirmed_by_decoding']) or 'none'}"
          + (f"; near ties NOT confirmed (--no-decode): {', '.join(totals['near_tie_unconfirmed'])}"
             if totals["near_tie_unconfirmed"] else "")
          + (f"; decode differs from teacher forcing: {', '.join(totals['decode_disagreements'])}"
             if totals["decode_disagreements"] else ""))
    for record in report.records[:10]:
        decoded = {"near_tie": ", confirmed by decoding", "requested": ", decoded"}.get(record.decode_reason, "")
        print(f"  {record.name or '-'}: {'EM' if record.exact_match else 'no EM'}{decoded}, token acc "
              f"{record.token_acc:.3f}, i* {record.first_error}, min p {record.min_prob:.3f}, "
              f"min margin {record.min_margin:.3f}, {len(record.stubborn)} stubborn")
    if len(report.records) > 10:
        print(f"  ... {len(report.records) - 10} more in {path}")
    print(f"wrote {path}")
    return 0
