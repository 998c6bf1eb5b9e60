"""One MemFT training step (forward + backward + AdamW) of a LoRA-adapted model, per engine.

Engines (suite/contenders.py TRAIN_ENGINES): fastmem's lean engine, the HF + PEFT path
(`--engine hf`), and the authors' design (that plus a no-adapter reference forward per step).
The floor counts the matmuls that cannot be skipped: forward and grad-input of the adapted span's
linear layers over prompt + answer, and of the head over the answer (4*S*P_span + 4*A*H*V
FLOPs; attention and LoRA excluded), at the rate this device reaches on one [S, H] x [H, I] GEMM.
"""

from __future__ import annotations

import gc
import os
import random

import pytest
import torch

from benchmarks.conftest import skip_unless_runs_here
from benchmarks.suite.cases import TRAIN_CASES, TRAIN_OBJECTIVES, selected
from benchmarks.suite.contenders import TRAIN_ENGINES
from benchmarks.suite.measure import cached_floor, gemm_rate_floor, run_case

LOCAL_MODEL_ENV = "FASTMEM_BENCH_MODEL"


def pytest_generate_tests(metafunc):
    if "train_case" not in metafunc.fixturenames:
        return
    smoke = metafunc.config.getoption("--smoke")
    params = [pytest.param((case, objective, engine), id=f"{case.id}-{objective}-{engine}")
              for case in selected(TRAIN_CASES, smoke) for objective in TRAIN_OBJECTIVES for engine in TRAIN_ENGINES]
    metafunc.parametrize("train_case", params)


def _tiny_model_and_sample(case):
    from transformers import LlamaConfig, LlamaForCausalLM

    from fastmem.data.sample import MemorySample

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval().requires_grad_(False)
    rng = random.Random(0)
    prompt = tuple(rng.randrange(512) for _ in range(16))
    answer = tuple(rng.randrange(512) for _ in range(case.answer_tokens))
    return model, MemorySample("tiny", "", "", prompt, answer)


def _load_model_and_sample(case, device):
    from fastmem.data import stress_test
    from fastmem.models import load_model

    if case.model == "tiny":
        model, sample = _tiny_model_and_sample(case)
        return model.to(device), sample
    source = "smollm2" if case.model == "smollm2" else os.environ.get(LOCAL_MODEL_ENV)
    if not source:
        pytest.skip(f"set {LOCAL_MODEL_ENV} to a local 8B checkpoint directory (nothing is downloaded)")
    model, tokenizer = load_model(source, device=device)
    return model, stress_test(tokenizer, case.answer_tokens, 0.25, seed=42)


class TrainSetup:
    """Model with LoRA attached, its prefix cache, both engines and an AdamW on the adapter."""

    def __init__(self, case, device):
        from fastmem.train import TrainConfig
        from fastmem.train.adapters import adapter_parameters, attach_lora, model_parts
        from fastmem.train.engine_fast import FastEngine
        from fastmem.train.engine_hf import HFEngine
        from fastmem.train.prefix_cache import PrefixCache

        model, self.sample = _load_model_and_sample(case, device)
        config = TrainConfig(model=case.model, rank=case.rank, alpha=2.0 * case.rank, layers=list(case.layers),
                             progress=False)
        self.peft_model, layer_ids = attach_lora(model, config)
        self.parts = model_parts(self.peft_model, layer_ids)
        self.peft_model.to(device).train()
        cache = PrefixCache(self.peft_model, self.parts, [self.sample], device)
        cache.build_all()
        self.optimizer = torch.optim.AdamW(list(adapter_parameters(self.peft_model).values()), lr=config.lr)
        self.engines = {"fastmem": FastEngine(config, self.parts, cache),
                        "peft-hf": HFEngine(config, self.peft_model, [self.sample], device)}
        self.input_ids = torch.tensor([self.sample.input_ids], device=device)
        self.dtype = self.parts.head_weight.dtype

    def step_fn(self, engine: str, objective: str):
        forward_engine = self.engines["fastmem" if engine == "fastmem" else "peft-hf"]

        def step():
            loss, _ = forward_engine.forward([0], objective=objective)
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if engine == "authors":
                with torch.no_grad(), self.peft_model.disable_adapter():
                    self.peft_model(input_ids=self.input_ids, use_cache=False).logits
        return step

    def floor(self, rounds):
        span = self.parts.layers[self.parts.first_adapted:]
        span_params = sum(m.weight.numel() for layer in span for m in layer.modules()
                          if isinstance(m, torch.nn.Linear) and "lora_" not in type(m).__name__)
        seq, answer = len(self.sample.input_ids), self.sample.answer_len
        vocab, hidden = self.parts.head_weight.shape
        inter = getattr(self.parts.causal_lm.config, "intermediate_size", 4 * hidden)
        flops = 4.0 * seq * span_params + 4.0 * answer * hidden * vocab
        return gemm_rate_floor(flops, seq, hidden, inter, self.dtype, self.parts.head_weight.device,
                               "span linears + head, fwd + grad-input (attention excluded)", rounds)


_setups: dict = {}


def train_setup(case, device) -> TrainSetup:
    if case not in _setups:
        _setups.clear()
        gc.collect()
        _setups[case] = TrainSetup(case, device)
    return _setups[case]


def test_train_step(benchmark, request, train_case, device, rounds):
    case, objective, engine = train_case
    skip_unless_runs_here(case.where, device, f"{case.model}, {case.answer_tokens}-token answer")
    setup = train_setup(case, device)
    floor = cached_floor(("train", case), lambda: setup.floor(rounds))
    benchmark.group = f"train-step {case.id} {objective}"
    info = dict(op="train-step", preset=case.model, answer_tokens=setup.sample.answer_len,
                prompt_tokens=len(setup.sample.prompt_ids), rank=case.rank, layers=list(case.layers),
                objective=objective, dtype=str(setup.dtype).removeprefix("torch."), contender=engine,
                engine_does=TRAIN_ENGINES[engine])
    try:
        run_case(benchmark, request, setup.step_fn(engine, objective), device, floor, info, rounds)
    except torch.OutOfMemoryError as err:
        pytest.skip(f"out of memory: {str(err).splitlines()[0][:120]}")
