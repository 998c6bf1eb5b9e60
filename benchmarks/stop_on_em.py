"""Stop on exact recall (issue 22, item 5): what `stop_on="em"` saves against the paper's
`stop_on="recall"` (every token at p > 0.5), and whether the exact recall it stops at survives
what users do next with the adapter.

For each case and each rule (recall; em at every δ of --margins) one run of the trainer on the
embedded SmolLM2 (trainer defaults unless the case says otherwise: rank 8, alpha 16, LoRA
dropout 0.1 (so every stop is confirmed by an eval-mode pass), down_proj of layers 20 and 24,
lr 1e-2, SFT), then on its saved adapter:
  - generate: `model.generate` greedy (do_sample False, one beam, KV cache on), fp32;
  - merged: the adapter merged into the base weights (PEFT `merge_and_unload`), fp32 `generate`;
  - bf16: base + adapter loaded and cast to bf16: fastmem's evaluator (one teacher-forced pass,
    near ties greedy-decoded), EM and the smallest top-1 margin left;
  - merged bf16: the merged model cast to bf16, the same check.
EM counts a sample when the generated tokens equal its answer (the answer's end-of-turn token
included). Wall is the steps' own time: the sum of step_s in metrics.jsonl (eval-mode
confirmation passes included; model loading, prefix cache and the final pass left out).

    OMP_NUM_THREADS=1 python -m benchmarks.stop_on_em --out benchmarks/results/stop_on_em_20261203

writes OUT.md (the table, with the command, machine and versions) and OUT/<case>-<rule>/
{metrics.jsonl, summary.json, checks.json} (the adapters are left out of the repository: rerun
to get them; --keep-adapters keeps them in OUT).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

CASES = {
    # a real-text stress answer (the default text, no random tokens), one sample
    "stress300": dict(kind="stress", length=300, ratio=0.0, train={}),
    # a PhoneBook of 256 answer tokens (20 entries), the whole book in each step (a step is an
    # epoch, as in the MemFT grid of docs/reproduction.md), rank 2: where that grid needed 61-70 steps
    "phonebook256": dict(kind="phonebook", length=256, ratio=0.0, train={"rank": 2, "alpha": 4.0, "batch_size": 20}),
    # the stress answer with 25% random tokens (the headline's kind of answer), trainer defaults
    "stress300_rho0.25": dict(kind="stress", length=300, ratio=0.25, train={}),
}


def _samples(case: dict, tokenizer, seed: int):
    from fastmem.data import phonebook, stress_test

    if case["kind"] == "stress":
        return [stress_test(tokenizer, case["length"], case["ratio"], seed=seed)]
    return phonebook(tokenizer, case["length"], seed=seed)


def _generate_em(model, samples, pad_token_id: int) -> tuple[int, list[int]]:
    """Samples whose greedy `generate` (KV cache) reproduces the answer; per sample the first
    differing position (-1: none)."""
    from transformers import GenerationConfig

    hits, firsts = 0, []
    for sample in samples:
        config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=sample.answer_len, use_cache=True,
                                  eos_token_id=None, pad_token_id=pad_token_id)
        prompt = torch.tensor([sample.prompt_ids])
        with torch.no_grad():
            out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), generation_config=config)
        generated = out[0, prompt.shape[1]:].tolist()
        answer = list(sample.answer_ids)
        first = next((i for i, (g, a) in enumerate(zip(generated, answer)) if g != a),
                     -1 if len(generated) == len(answer) else min(len(generated), len(answer)))
        hits += first < 0
        firsts.append(first)
    return hits, firsts


def _teacher_forced(model, samples) -> dict:
    """fastmem's evaluator: EM from one teacher-forced pass (greedy-decoding the samples whose
    verdict hinges on a near tie), and the smallest top-1 margin."""
    from fastmem.eval.evaluator import evaluate

    totals = evaluate(model, samples, decode="auto", progress=False).totals()
    return {"em": totals["n_exact_match"], "min_margin": totals["min_margin"], "min_p": totals["min_prob"]}


def _checks(base, adapter_dir: Path, samples, pad_token_id: int) -> dict:
    """What users do next. fp32 (adapter, and merged into the base): HF `generate` with the KV
    cache. bf16 (a CPU decode in bf16 is slow here): the teacher-forced verdict, which is greedy
    decoding's (every argmax right given the right prefix) up to the cache's rounding, plus the
    smallest margin left."""
    from fastmem.integrations.peft_adapter import load_adapter

    def adapted():
        return load_adapter(copy.deepcopy(base), adapter_dir).eval()

    variants = {
        "generate": (adapted, "generate"),
        "merged": (lambda: adapted().merge_and_unload().eval(), "generate"),
        "bf16": (lambda: adapted().to(torch.bfloat16), "teacher_forced"),
        "merged_bf16": (lambda: adapted().merge_and_unload().to(torch.bfloat16).eval(), "teacher_forced"),
    }
    results = {}
    for name, (build, how) in variants.items():
        t0 = time.perf_counter()
        model = build()
        if how == "generate":
            hits, firsts = _generate_em(model, samples, pad_token_id)
            results[name] = {"em": hits, "first_divergence": firsts}
        else:
            results[name] = _teacher_forced(model, samples)
        results[name].update(samples=len(samples), how=how, seconds=time.perf_counter() - t0)
        del model
    return results


def _run_one(base, samples, case: dict, rule: tuple[str, float], out: Path, seed: int, max_steps: int) -> dict:
    from fastmem.train import TrainConfig, train

    stop_on, margin = rule
    config = TrainConfig(model="smollm2", max_steps=max_steps, seed=seed, stop_on=stop_on, em_margin=margin,
                         out=str(out), progress=False, **case["train"])
    result = train(config, samples, model=copy.deepcopy(base))
    rows = result.metrics
    summary = result.summary
    return {"steps": summary["steps"], "stopped": summary["stopped_on_recall"],
            "wall_steps_s": sum(row["step_s"] for row in rows),
            "confirmations": sum(row["confirmation"] is not None for row in rows),
            "rejected": sum(row["confirmation"] == "rejected" for row in rows),
            "final_exact_match": summary["exact_match"], "final_min_margin": summary["min_margin"],
            "final_min_p": summary["min_p"], "final_stubborn_tokens": summary["stubborn_tokens"],
            "config": {k: v for k, v in config.to_dict().items() if k in (
                "rank", "alpha", "dropout", "modules", "layers", "lr", "objective", "max_steps", "seed",
                "stop_on", "em_margin")}}


def _rule_name(rule: tuple[str, float]) -> str:
    return "recall" if rule[0] == "recall" else f"em{rule[1]:g}"


def _table(results: dict) -> list[str]:
    lines = ["| case | stop on | δ | steps | × recall's steps | wall s (Σ step_s) | × recall's wall | confirmations "
             "(rejected) | final min margin | final min p | stubborn (p ≤ 0.5) | EM generate | EM merged (generate) "
             "| EM bf16 (min margin) | EM merged bf16 (min margin) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for case, runs in results.items():
        recall = runs.get("recall")
        for name, run in runs.items():
            checks = run["checks"]
            ratio_steps = f"{run['steps'] / recall['steps']:.2f}" if recall else "–"
            ratio_wall = f"{run['wall_steps_s'] / recall['wall_steps_s']:.2f}" if recall else "–"
            steps = f"{run['steps']}" + ("" if run["stopped"] else " (budget, no stop)")
            em = [f"{checks[k]['em']}/{checks[k]['samples']}" for k in ("generate", "merged")]
            em += [f"{checks[k]['em']}/{checks[k]['samples']} ({checks[k]['min_margin']:.3f})"
                   for k in ("bf16", "merged_bf16")]
            lines.append(f"| {case} | {run['config']['stop_on']} | "
                         f"{run['config']['em_margin'] if run['config']['stop_on'] == 'em' else '–'} | {steps} | "
                         f"{ratio_steps} | {run['wall_steps_s']:.1f} | {ratio_wall} | {run['confirmations']} "
                         f"({run['rejected']}) | {run['final_min_margin']:.3f} | {run['final_min_p']:.3f} | "
                         f"{run['final_stubborn_tokens']} | " + " | ".join(em) + " |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="OUT.md and OUT/ (per-run files)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated among {list(CASES)}")
    parser.add_argument("--margins", default="0,0.5,1,2", help="δ values of stop_on=em")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--keep-adapters", action="store_true")
    args = parser.parse_args(argv)

    from fastmem.models import load_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rules = [("recall", 0.0)] + [("em", float(m)) for m in args.margins.split(",")]
    base, tokenizer = load_model("smollm2")
    pad = tokenizer.pad_token_id
    results: dict = {}
    results_path = out / "results.json"
    if results_path.is_file():  # rerun: finished runs are kept
        results = json.loads(results_path.read_text())
    for case_name in args.cases.split(","):
        case = CASES[case_name]
        samples = _samples(case, tokenizer, args.seed)
        for rule in rules:
            name = _rule_name(rule)
            if name in results.get(case_name, {}):
                continue
            run_dir = out / f"{case_name}-{name}"
            if run_dir.exists():
                shutil.rmtree(run_dir)  # an unfinished run of this script: start it over
            t0 = time.perf_counter()
            run = _run_one(base, samples, case, rule, run_dir, args.seed, args.max_steps)
            run["checks"] = _checks(base, run_dir / "adapter", samples, pad)
            run["answer_tokens"] = sum(s.answer_len for s in samples)
            run["samples"] = len(samples)
            (run_dir / "checks.json").write_text(json.dumps(run["checks"], indent=1) + "\n")
            if not args.keep_adapters:
                shutil.rmtree(run_dir / "adapter")
            results.setdefault(case_name, {})[name] = run
            results_path.write_text(json.dumps(results, indent=1) + "\n")
            print(f"{case_name} {name}: {run['steps']} steps, {run['wall_steps_s']:.1f} s of steps, checks "
                  f"{ {k: v['em'] for k, v in run['checks'].items()} } ({time.perf_counter() - t0:.0f} s)",
                  flush=True)

    import peft
    import transformers

    now = datetime.datetime.now(datetime.timezone.utc)
    header = [f"# Stop on exact recall: stop_on=\"em\" against the paper's p > 0.5 ({now:%Y-%m-%d})", "",
              f"- command: `OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} python -m benchmarks.stop_on_em "
              + " ".join(sys.argv[1:] if argv is None else argv) + "`",
              f"- machine: {platform.machine()}, {os.cpu_count()} cores (shared), CPU only; torch {torch.__version__}, "
              f"transformers {transformers.__version__}, peft {peft.__version__}, Python {platform.python_version()}",
              f"- written {now:%Y-%m-%d %H:%M} UTC; model: the embedded SmolLM2-135M-Instruct (fp32); seed {args.seed}",
              "- per case: " + "; ".join(f"{k}: {v['kind']} ℓ={v['length']} ρ={v['ratio']}, "
                                         f"settings {v['train'] or 'trainer defaults'}"
                                         for k, v in CASES.items() if k in results),
              "- per run: metrics.jsonl, summary.json, checks.json in the directory beside this file", ""]
    (out.parent / f"{out.name}.md").write_text("\n".join(header + _table(results)) + "\n")
    print("\n".join(_table(results)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
