"""lora_linear under torch.compile(fullgraph=True): the custom ops trace whole, forward and
backward equal eager; the op passes torch.library.opcheck; a double backward raises."""

import pytest
import torch
import torch._dynamo.testing

from fastmem.ops import lora_linear as lora_op
from fastmem.ops.lora_linear import lora_linear
from tests.ops.test_lora_linear import TOLERANCE, grads, make_inputs, rel_err

# (id, leading dims, I, O, r, dtype, bias mode, W trainable, dropout)
CASES = [
    ("fp32-frozen-bias", (2, 5), 24, 16, 4, torch.float32, "frozen", False, 0.0),
    ("fp32-dropout", (9,), 16, 12, 8, torch.float32, None, False, 0.25),
    ("fp32-trainable-W-and-bias", (7,), 12, 20, 2, torch.float32, "trainable", True, 0.0),
    ("bf16-dropout", (3, 4), 16, 8, 4, torch.bfloat16, "frozen", False, 0.1),
]


def _run(fn, inputs, grad_out):
    y = fn(*inputs)
    return y, grads(y, inputs, grad_out)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_compiled_forward_and_backward_equal_eager(case, backend, device):
    _, lead, in_f, out_f, rank, dtype, bias_mode, w_trainable, dropout = case
    inputs = make_inputs(lead, in_f, out_f, rank, dtype, bias_mode, w_trainable, device)

    def fn(x, weight, lora_A, lora_B, bias):
        return torch.nn.functional.silu(lora_linear(x, weight, lora_A, lora_B, 0.5, bias, dropout=dropout, seed=7,
                                                    backend=backend))

    grad_out = torch.randn(*lead, out_f, generator=torch.Generator().manual_seed(3)).to(dtype).to(device)
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager" if backend == "triton" else "inductor")
    y_eager, g_eager = _run(fn, inputs, grad_out)
    y_comp, g_comp = _run(compiled, inputs, grad_out)
    # The fused op computes the same in both (same backend, same seed); only the silu around it
    # may be fused differently by inductor.
    tol = TOLERANCE[dtype]
    assert rel_err(y_comp, y_eager) < tol
    for name, a, b in zip(["x", "weight", "lora_A", "lora_B", "bias"], g_comp, g_eager):
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.dtype == b.dtype and rel_err(a, b) < tol, name


def test_compile_sees_one_graph_with_the_custom_ops(device):
    x, weight, lora_A, lora_B, bias = make_inputs((6,), 8, 8, 2, torch.float32, "frozen", False, device)
    counts = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, backend=counts)
    def fn(x, lora_A, lora_B):
        return lora_linear(x, weight, lora_A, lora_B, 2.0, bias, backend="torch").square().sum()

    fn(x, lora_A, lora_B).backward()
    assert counts.frame_count == 1
    graph_ops = {str(node.target) for graph in counts.graphs for node in graph.graph.nodes}
    assert "fastmem.lora_linear_forward.default" in graph_ops


def test_backend_choice_is_a_trace_time_constant(device, monkeypatch):
    """Choosing a backend probes the installation with code the compiler cannot trace (here
    os.stat, as a stand-in for imports and the CUDA extension cache): it runs at trace time."""
    import os

    import fastmem.backends as backends

    probes = []
    real = backends._backend_runs

    def probing(backend, device):
        probes.append(os.stat(__file__).st_size)
        return real(backend, device)

    monkeypatch.setattr(backends, "_backend_runs", probing)
    x, weight, lora_A, lora_B, _ = make_inputs((4,), 8, 8, 2, torch.float32, None, False, device)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: lora_linear(x, weight, lora_A, lora_B, 1.0, backend="triton"), fullgraph=True,
                             backend="aot_eager")
    compiled(x).sum().backward()
    assert probes  # it did run, in Python, once per trace
    assert rel_err(compiled(x), lora_linear(x, weight, lora_A, lora_B, 1.0, backend="triton")) < 1e-6


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_opcheck(dropout, device):
    """Schema, fake impl, autograd registration and aliasing, checked by torch itself."""
    x, weight, lora_A, lora_B, bias = make_inputs((5,), 6, 7, 3, torch.float32, "frozen", False, device)
    seed = torch.tensor(11)
    torch.library.opcheck(lora_op._forward_op, (x.reshape(-1, 6), weight, lora_A, lora_B, bias, 1.5, dropout, seed,
                                                "torch"))
    grad_y = torch.randn(5, 7, device=device)
    xa = x.detach() @ lora_A.detach().t()
    torch.library.opcheck(lora_op._backward_op, (grad_y, x.detach(), weight, lora_A.detach(), lora_B.detach(), xa,
                                                 1.5, dropout, seed, "torch", True, False, True))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_seedless_dropout_compiles_whole(backend, device):
    """A LoRA layer in training draws a fresh seed per call: that draw stays inside the graph
    (no host read), and forward and backward still apply one and the same mask."""
    n_rows, width, p = 32, 16, 0.25
    x = (torch.rand(n_rows, width, device=device) + 0.5).requires_grad_()
    eye = torch.eye(width, device=device).requires_grad_()

    def fn(x, lora_A):  # W = 0, A = B = I, s = 1: y = drop(x), dx = drop'(dy)
        return lora_linear(x, torch.zeros(width, width, device=device), lora_A, eye.detach(), 1.0, dropout=p,
                           backend=backend)

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.manual_seed(0)
    y = compiled(x, eye)
    (grad_x,) = torch.autograd.grad(y.sum(), x)
    kept = y != 0
    assert 0.5 < kept.double().mean().item() < 0.95
    torch.testing.assert_close(y[kept], x.detach()[kept] / (1 - p))
    torch.testing.assert_close(grad_x, kept.to(grad_x.dtype) / (1 - p))  # the forward's mask, regenerated
    assert not torch.equal(compiled(x, eye) != 0, kept)  # a new seed per call


def test_double_backward_raises(device):
    x, weight, lora_A, lora_B, _ = make_inputs((4,), 6, 5, 2, torch.float64, None, False, device)
    y = lora_linear(x, weight, lora_A, lora_B, 1.0, backend="torch")
    (grad_x,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="autograd"):
        torch.autograd.grad(grad_x.sum(), lora_A)


def test_lora_linear_module_in_training_compiles_whole(device):
    """fastmem.nn.LoRALinear with dropout, in training mode, under fullgraph compile: one graph,
    a fresh mask per step, eval mode equal to eager."""
    from fastmem.nn.lora_linear import LoRALinear

    torch.manual_seed(0)
    layer = LoRALinear(12, 10, r=4, lora_alpha=8, lora_dropout=0.2, backend="torch").to(device)
    torch.nn.init.normal_(layer.lora_B.weight)
    torch._dynamo.reset()
    counts = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(layer, fullgraph=True, backend=counts)
    x = torch.randn(6, 12, device=device)
    first = compiled(x)
    first.square().sum().backward()
    assert layer.lora_A.weight.grad is not None and layer.lora_B.weight.grad is not None
    assert not torch.equal(compiled(x), first)  # dropout: a new mask per call
    layer.eval()
    torch.testing.assert_close(compiled(x), layer(x))
    assert counts.frame_count <= 2  # train and eval each trace once, no graph breaks
