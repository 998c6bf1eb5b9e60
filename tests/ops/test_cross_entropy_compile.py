"""torch.compile(fullgraph=True) over fastmem.linear_cross_entropy: the call becomes the custom
op fastmem::linear_cross_entropy (fake impl + registered autograd), forward and backward equal
to eager. CPU, torch backend; aot_eager for most cases (seconds), one case through inductor."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import fastmem
from tests.ops.test_linear_cross_entropy import make_case, pick_threshold


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def eager_and_compiled(fn, hidden, weight, bias, labels, *, train_head, compile_backend="aot_eager"):
    results = []
    for runner in (fn, torch.compile(fn, fullgraph=True, backend=compile_backend)):
        h = hidden.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(train_head)
        b = None if bias is None else bias.clone().requires_grad_(train_head)
        out = runner(h, w, b, labels)
        loss, stats = out if isinstance(out, tuple) else (out, None)
        grad_out = torch.linspace(0.5, 1.5, loss.numel()).reshape(loss.shape)
        loss.backward(grad_out)
        results.append(dict(loss=loss.detach(), stats=stats, grads=[h.grad, w.grad, None if b is None else b.grad]))
    return results


def assert_same(eager, compiled):
    torch.testing.assert_close(compiled["loss"], eager["loss"], rtol=1e-6, atol=1e-7)
    for ours, ref in zip(compiled["grads"], eager["grads"]):
        assert (ours is None) == (ref is None)
        if ref is not None:
            torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-7)
    if eager["stats"] is not None:
        assert isinstance(compiled["stats"], fastmem.TokenStats)
        for field in dataclasses.fields(eager["stats"]):
            torch.testing.assert_close(getattr(compiled["stats"], field.name), getattr(eager["stats"], field.name))


@pytest.mark.parametrize("objective", ["sft", "ot", "sw"])
def test_fullgraph_compile_equals_eager_with_stats(objective):
    hidden, weight, _, labels = make_case(torch.float32, seed=31)
    threshold = pick_threshold(hidden, weight, labels)

    def fn(h, w, b, y):
        return fastmem.linear_cross_entropy(h, w, y, b, objective=objective, threshold=threshold,
                                            return_stats=True, chunk_size=16)

    eager, compiled = eager_and_compiled(fn, hidden, weight, None, labels, train_head=False)
    assert_same(eager, compiled)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fullgraph_compile_trainable_head_bias_and_options(reduction):
    hidden, weight, bias, labels = make_case(torch.float32, seed=32)

    def fn(h, w, b, y):
        return fastmem.linear_cross_entropy(h, w, y, b, objective="sw", reduction=reduction, softcap=5.0,
                                            label_smoothing=0.1, lse_square_scale=1e-3, chunk_size=16)

    eager, compiled = eager_and_compiled(fn, hidden, weight, bias, labels, train_head=True)
    assert_same(eager, compiled)


def test_fullgraph_compile_through_inductor():
    hidden, weight, bias, labels = make_case(torch.float32, seed=33)

    def fn(h, w, b, y):
        loss, stats = fastmem.linear_cross_entropy(h, w, y, b, objective="ot", threshold=0.5, return_stats=True)
        return loss * 2.0, stats  # the op inside a larger graph

    eager, compiled = eager_and_compiled(fn, hidden, weight, bias, labels, train_head=True,
                                         compile_backend="inductor")
    assert_same(eager, compiled)


def test_custom_op_passes_opcheck():
    """Schema, fake impl (shapes / dtypes), autograd registration and AOT dispatch of the op."""
    from fastmem.ops.cross_entropy_custom_op import _OP_ARG_NAMES  # noqa: F401  (the op is registered on import)

    hidden, weight, bias, labels = make_case(torch.float32, batch=1, seq=9, hidden_size=8, vocab=13, seed=34, ignore="none")
    args = (hidden.reshape(-1, 8).requires_grad_(True), weight.requires_grad_(True), bias, labels.reshape(-1),
            None, torch.full((1,), 50.0), "sw", 0.7, 0.01, 10.0, 20.0, 0.01, 0.0, 0.0, 0.0, -100, "mean", 9, 1, 4,
            "torch", True, True, True, False)
    torch.library.opcheck(torch.ops.fastmem.linear_cross_entropy.default, args)
