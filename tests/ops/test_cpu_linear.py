"""Frozen fp32 CPU linears through oneDNN: same values and input gradients as F.linear."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastmem.nn.cpu_linear import ONEDNN_MIN_ROWS, onednn_linear, use_onednn_linears
from fastmem.ops import cpu_gemm

pytestmark = pytest.mark.skipif(cpu_gemm._ONEDNN_LINEAR is None, reason="this torch has no oneDNN linear op")


@pytest.fixture(autouse=True)
def onednn_route(monkeypatch):
    """The oneDNN route on every machine: where `auto` measures MKL faster, these tests would
    otherwise check nothing."""
    monkeypatch.setenv(cpu_gemm.ENV_VAR, "onednn")
    cpu_gemm.cpu_gemm_route.cache_clear()
    yield
    monkeypatch.undo()
    cpu_gemm.cpu_gemm_route.cache_clear()


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(2, 37, 24), (40, 24), (3, 5, 24)], ids=["3d", "2d", "few-rows"])
def test_values_and_input_grads_match_f_linear(shape, bias):
    gen = torch.Generator().manual_seed(0)
    lin = nn.Linear(24, 31, bias=bias).requires_grad_(False)
    x = torch.randn(*shape, generator=gen, requires_grad=True)
    grad_out = torch.randn(*shape[:-1], 31, generator=gen)
    expected = torch.nn.functional.linear(x, lin.weight, lin.bias)
    (expected_grad,) = torch.autograd.grad(expected, x, grad_out)
    assert use_onednn_linears(lin) == 1
    got = lin(x)
    (got_grad,) = torch.autograd.grad(got, x, grad_out)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_grad, expected_grad, rtol=1e-5, atol=1e-5)


def test_trainable_or_other_dtype_layers_are_left_alone():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8).requires_grad_(False),
                          nn.Linear(8, 8, dtype=torch.float64).requires_grad_(False))
    assert use_onednn_linears(model) == 1
    assert "forward" not in vars(model[0]) and "forward" in vars(model[1]) and "forward" not in vars(model[2])


def test_a_loaded_adapters_lora_layers_keep_f_linear():
    """Frozen after loading, LoRA A / B still compute as in training (the base layer is rerouted)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(nn.Sequential(nn.Linear(8, 8)), LoraConfig(r=2, target_modules=["0"]))
    model.requires_grad_(False)  # as a loaded adapter for inference
    lora = model.base_model.model[0]
    assert use_onednn_linears(model) == 1
    assert "forward" in vars(lora.base_layer)
    assert "forward" not in vars(lora.lora_A["default"]) and "forward" not in vars(lora.lora_B["default"])


def test_a_weight_unfrozen_later_still_gets_its_gradient():
    lin = nn.Linear(8, 4).requires_grad_(False)
    use_onednn_linears(lin)
    lin.requires_grad_(True)
    x = torch.randn(ONEDNN_MIN_ROWS, 8)
    lin(x).sum().backward()
    torch.testing.assert_close(lin.weight.grad, torch.ones(4, ONEDNN_MIN_ROWS) @ x)


def test_non_contiguous_input():
    weight = torch.randn(6, 10)
    x = torch.randn(20, 40)[:, ::4]
    torch.testing.assert_close(onednn_linear(x, weight), x @ weight.t(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_autocast_is_followed(dtype):
    """Under CPU autocast a rerouted layer gives what F.linear gives there (the autocast dtype),
    not an fp32 oneDNN product."""
    gen = torch.Generator().manual_seed(1)
    lin = nn.Linear(24, 31).requires_grad_(False)
    x = torch.randn(2, 37, 24, generator=gen, requires_grad=True)
    with torch.autocast("cpu", dtype=dtype):
        expected = torch.nn.functional.linear(x, lin.weight, lin.bias)
        use_onednn_linears(lin)
        got = lin(x)
    assert got.dtype == expected.dtype == dtype
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    (grad,) = torch.autograd.grad(got.float().sum(), x)
    assert grad.dtype == torch.float32 and torch.isfinite(grad).all()


def test_double_backward_is_refused():
    lin = nn.Linear(8, 4).requires_grad_(False)
    use_onednn_linears(lin)
    x = torch.randn(ONEDNN_MIN_ROWS, 8, requires_grad=True)
    (grad,) = torch.autograd.grad(lin(x).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad.sum().backward()
