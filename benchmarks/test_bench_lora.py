"""Fused LoRA linear, forward + backward (dx, dA, dB; frozen base), against PEFT's eager layer.

The floor is the frozen base layer's two GEMMs, x W^T and dy W (4*N*I*O FLOPs): docs/design.md's
target (section 10) is <= 10% over them on a GPU (floor_fraction >= 0.91).
"""

from __future__ import annotations

import gc

import pytest
import torch

from benchmarks.conftest import skip_unless_runs_here
from benchmarks.suite.cases import DTYPES, LORA_DROPOUT, LORA_SHAPES, selected
from benchmarks.suite.contenders import lora_contenders
from benchmarks.suite.measure import cached_floor, lora_floor, run_case


def pytest_generate_tests(metafunc):
    if "lora_case" not in metafunc.fixturenames:
        return
    smoke = metafunc.config.getoption("--smoke")
    params = []
    for shape in selected(LORA_SHAPES, smoke):
        dtype = "bf16" if shape.where == "gpu" else "fp32"
        for contender in lora_contenders():
            params.append(pytest.param((shape, dtype, contender), id=f"{shape.id}-{dtype}-{contender.id}"))
    metafunc.parametrize("lora_case", params)


_layers: dict[tuple, tuple] = {}


def peft_layer(shape, dtype: str, device: torch.device):
    """A PEFT LoRA layer on a frozen base, its input and an upstream gradient (one alive at a time)."""
    key = (shape, dtype, device.type)
    if key not in _layers:
        from peft import LoraConfig
        from peft.tuners.lora import Linear as PeftLoraLinear

        _layers.clear()
        gc.collect()
        torch.manual_seed(0)
        torch_dtype = DTYPES[dtype]
        base = torch.nn.Linear(shape.in_features, shape.out_features, bias=False, device=device,
                               dtype=torch_dtype).requires_grad_(False)
        config = LoraConfig(r=shape.rank, lora_alpha=2 * shape.rank, lora_dropout=LORA_DROPOUT)
        layer = PeftLoraLinear(base, "default", config=config, r=shape.rank, lora_alpha=2 * shape.rank,
                               lora_dropout=LORA_DROPOUT).to(torch_dtype).train()
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=shape.rank ** -0.5)
        x = torch.randn(shape.n, shape.in_features, device=device, dtype=torch_dtype)
        grad_out = torch.randn(shape.n, shape.out_features, device=device, dtype=torch_dtype)
        _layers[key] = (layer, x, grad_out)
    return _layers[key]


def test_lora_linear(benchmark, request, lora_case, device, rounds):
    shape, dtype, contender = lora_case
    skip_unless_runs_here(shape.where, device, f"N={shape.n} {shape.in_features}->{shape.out_features} r={shape.rank}")
    reason = contender.skip_reason(device)
    if reason:
        pytest.skip(reason)
    layer, x0, grad_out = peft_layer(shape, dtype, device)
    weight = layer.get_base_layer().weight
    lora_A, lora_B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    scaling = layer.scaling["default"]

    if contender.backend is None:
        def step():
            x = x0.detach().requires_grad_(True)
            lora_A.grad = lora_B.grad = None
            layer(x).backward(grad_out)
    else:
        from fastmem.ops.lora_linear import lora_linear

        def step():
            x = x0.detach().requires_grad_(True)
            lora_A.grad = lora_B.grad = None
            lora_linear(x, weight, lora_A, lora_B, scaling, dropout=LORA_DROPOUT,
                        backend=contender.backend).backward(grad_out)

    floor = cached_floor(("lora", shape, dtype), lambda: lora_floor(x0, weight, grad_out, reps=rounds))
    benchmark.group = f"lora-linear {shape.id} {shape.in_features}->{shape.out_features} {dtype}"
    info = dict(op="lora-linear", preset=shape.preset, N=shape.n, I=shape.in_features, O=shape.out_features,
                rank=shape.rank, dropout=LORA_DROPOUT, dtype=dtype, contender=contender.id)
    try:
        run_case(benchmark, request, step, device, floor, info, rounds)
    except torch.OutOfMemoryError as err:
        pytest.skip(f"out of memory: {str(err).splitlines()[0][:120]}")
