"""How far a KV-cached greedy decode's logits are from one full teacher-forced forward.

The evaluator decides exact match from a teacher-forced pass and decodes only samples whose
top-1 margin is within this noise (fastmem/eval/exact_match.py). This measures the noise on
SmolLM2: greedy-decode N tokens with a KV cache (recording each step's logits), run one full
forward over prompt + those tokens, and compare logits and margins position by position.

    PYTHONPATH=. python benchmarks/margin_noise.py --dtype fp32 --tokens 400
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

PROMPTS = ["Write a long story about a lighthouse keeper.", "Explain how a compiler works, in detail."]


def _margin(logits: torch.Tensor, target: torch.Tensor):
    top = logits.gather(1, target[:, None]).squeeze(1)
    other = logits.scatter(1, target[:, None], float("-inf")).amax(1)
    return top - other


@torch.no_grad()
def measure(model, tokenizer, prompt: str, n: int) -> dict:
    from fastmem.data import encode_pair

    prompt_ids = list(encode_pair(tokenizer, prompt, "x").prompt_ids)
    cache, step_logits, tokens, inputs = None, [], [], torch.tensor([prompt_ids])
    for _ in range(n):
        out = model(input_ids=inputs, past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        step_logits.append(out.logits[0, -1].float())
        tokens.append(int(step_logits[-1].argmax()))
        inputs = torch.tensor([[tokens[-1]]])
    full = model(input_ids=torch.tensor([prompt_ids + tokens]), use_cache=False).logits[0].float()
    full = full[len(prompt_ids) - 1:len(prompt_ids) - 1 + n]
    decoded = torch.stack(step_logits)
    target = torch.tensor(tokens)
    lse = torch.logsumexp(full, 1)
    d_margin = (_margin(decoded, target) - _margin(full, target)).abs()
    eps = torch.finfo(model.dtype).eps
    return {"prompt": prompt, "tokens": n,
            "max_abs_logit_diff": float((decoded - full).abs().max()),
            "max_abs_margin_diff": float(d_margin.max()),
            "max_margin_diff_over_scale_in_eps": float((d_margin / lse.abs().clamp(min=1)).max() / eps),
            "max_abs_lse": float(lse.abs().max()),
            "min_margin_full_forward": float(_margin(full, target).min()),
            "argmax_mismatches": int((decoded.argmax(1) != full.argmax(1)).sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--tokens", type=int, default=400)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    from fastmem.models import load_model

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    model, tokenizer = load_model("smollm2", dtype=dtype)
    rows = [measure(model, tokenizer, prompt, args.tokens) for prompt in PROMPTS]
    result = {"what": "KV-cached greedy decode vs one full forward, SmolLM2-135M-Instruct (Q4_1 GGUF dequantized)",
              "dtype": args.dtype, "device": "cpu", "cpu": platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d"), "rows": rows}
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
