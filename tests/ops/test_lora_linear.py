"""fastmem.lora_linear: every backend against one float64 eager oracle, PEFT's lora.Linear,
the dropout mask contract, and input checks that fire before any launch."""

import math

import pytest
import torch

import fastmem.ops.lora_linear as lora_op
from fastmem.ops.lora_linear import lora_dropout_mask, lora_linear
from fastmem.ops.lora_linear_torch import eager_lora_linear

BACKENDS = ["torch", "triton"]
# Max error relative to the oracle's largest entry, written once per dtype. bf16 is loose
# because Triton's CPU interpreter truncates fp32 -> bf16 (a GPU rounds to nearest).
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2.5e-2}
SEED = 1234

# (id, leading dims, I, O, r, dtype, scaling, bias: None | "frozen" | "trainable", W trainable)
CASES = [
    ("fp32-r1-even-tiles", (7,), 32, 64, 1, torch.float32, 1.0, None, False),
    ("fp32-r4-odd-batch", (2, 5), 45, 29, 4, torch.float32, 2.0, "frozen", False),
    ("fp32-r16-trainable-bias", (37,), 33, 20, 16, torch.float32, 0.5, "trainable", False),
    ("fp32-r64-trainable-W", (3, 4), 40, 24, 64, torch.float32, 0.125, "frozen", True),
    ("fp32-r256", (5,), 24, 20, 256, torch.float32, 0.0625, None, False),
    ("bf16-r100-odd", (2, 7), 37, 33, 100, torch.bfloat16, 0.5, "frozen", False),
    ("bf16-r4-odd-batch", (2, 9), 45, 29, 4, torch.bfloat16, 2.0, "frozen", False),
    ("bf16-r16", (19,), 64, 48, 16, torch.bfloat16, 1.0, None, False),
    ("fp16-r4", (2, 9), 45, 29, 4, torch.float16, 4.0, "frozen", False),
    ("fp16-r64-trainable-bias", (21,), 32, 40, 64, torch.float16, 0.25, "trainable", False),
]


def make_inputs(lead, in_f, out_f, rank, dtype, bias_mode, w_trainable, device, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(device)

    x = randn(*lead, in_f).requires_grad_()
    weight = randn(out_f, in_f, scale=in_f ** -0.5).requires_grad_(w_trainable)
    lora_A = randn(rank, in_f, scale=in_f ** -0.5).requires_grad_()
    lora_B = randn(out_f, rank, scale=rank ** -0.5).requires_grad_()
    bias = None if bias_mode is None else randn(out_f).requires_grad_(bias_mode == "trainable")
    return x, weight, lora_A, lora_B, bias


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    return ((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def grads(output, inputs, grad_out):
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    found = iter(torch.autograd.grad(output, wanted, grad_out))
    return [next(found) if t is not None and t.requires_grad else None for t in inputs]


def oracle(inputs, scaling, grad_out, keep=None, p=0.0):
    """Float64 eager forward + autograd backward of the same inputs."""
    as64 = [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in inputs]
    x, weight, lora_A, lora_B, bias = as64
    y = eager_lora_linear(x, weight, lora_A, lora_B, scaling, bias, keep, p)
    return y, grads(y, as64, grad_out.double())


@pytest.mark.parametrize("dropout", [0.0, 0.25], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_float64_oracle(case, backend, dropout, device):
    _, lead, in_f, out_f, rank, dtype, scaling, bias_mode, w_trainable = case
    inputs = make_inputs(lead, in_f, out_f, rank, dtype, bias_mode, w_trainable, device)
    x, weight, lora_A, lora_B, bias = inputs
    y = lora_linear(x, weight, lora_A, lora_B, scaling, bias, dropout=dropout, seed=SEED, backend=backend)
    assert y.shape == (*lead, out_f) and y.dtype == dtype
    grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype).to(device)
    got = grads(y, inputs, grad_out)

    # The mask the backend says it used must be the one its forward AND backward applied.
    n_rows = math.prod(lead)
    keep = lora_dropout_mask(n_rows, in_f, dropout, SEED, device=device, backend=backend).reshape(*lead, in_f)
    y_ref, want = oracle(inputs, scaling, grad_out, keep if dropout else None, dropout)
    tol = TOLERANCE[dtype]
    assert rel_err(y, y_ref) < tol
    for name, g, g_ref in zip(["x", "weight", "lora_A", "lora_B", "bias"], got, want):
        assert (g is None) == (g_ref is None), name
        if g is not None:
            assert g.dtype == dtype and g.shape == g_ref.shape, name
            assert rel_err(g, g_ref) < tol, f"grad of {name}: {rel_err(g, g_ref):.3g} >= {tol}"


def test_torch_backend_float64_gradcheck_with_dropout(device):
    """The hand-written backward of the reference backend (Triton has no float64 kernels: its
    gradients are held to the float64 oracle above)."""
    x, weight, lora_A, lora_B, bias = make_inputs((2, 3), 7, 5, 3, torch.float64, "trainable", False, device)

    def fn(x, lora_A, lora_B, bias):
        return lora_linear(x, weight, lora_A, lora_B, 1.5, bias, dropout=0.3, seed=SEED, backend="torch")

    assert torch.autograd.gradcheck(fn, (x, lora_A, lora_B, bias))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rank", [1, 4, 16, 64])
def test_matches_peft_lora_linear(rank, dtype, backend, device):
    from peft import LoraConfig
    from peft.tuners.lora import Linear as PeftLoraLinear

    torch.manual_seed(rank)
    base = torch.nn.Linear(37, 23, device=device, dtype=dtype).requires_grad_(False)
    alpha = 2 * rank
    peft_layer = PeftLoraLinear(base, "default", config=LoraConfig(r=rank, lora_alpha=alpha), r=rank,
                                lora_alpha=alpha).to(dtype)
    torch.nn.init.normal_(peft_layer.lora_B["default"].weight, std=rank ** -0.5)  # B = 0 at init hides B's grad
    lora_A, lora_B = peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight
    x = torch.randn(3, 11, 37, device=device, dtype=dtype)

    y_peft = peft_layer(x)
    y_peft.float().square().sum().backward()
    peft_grads = [lora_A.grad.clone(), lora_B.grad.clone()]
    lora_A.grad = lora_B.grad = None
    y = lora_linear(x, base.weight, lora_A, lora_B, peft_layer.scaling["default"], base.bias, backend=backend)
    y.float().square().sum().backward()

    tol = TOLERANCE[dtype] * 2  # both sides round; neither is the oracle
    assert rel_err(y, y_peft) < tol
    assert rel_err(lora_A.grad, peft_grads[0]) < tol
    assert rel_err(lora_B.grad, peft_grads[1]) < tol


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_mask_statistics(backend, device):
    n_rows, in_f = 128, 256
    for p in (0.1, 0.5):
        keep = lora_dropout_mask(n_rows, in_f, p, SEED, device=device, backend=backend)
        assert keep.shape == (n_rows, in_f) and keep.dtype == torch.bool
        rate, count = keep.double().mean().item(), keep.numel()
        assert abs(rate - (1 - p)) < 5 * math.sqrt(p * (1 - p) / count), (p, rate)
        # Rows and columns are not copies of each other (offsets cover every element).
        assert not torch.equal(keep[0], keep[1]) and not torch.equal(keep[:, 0], keep[:, 1])
        # Each of the 4 words of a Philox draw keeps at the same rate, independently of its neighbour.
        for lane in range(4):
            lane_rate = keep[:, lane::4].double().mean().item()
            assert abs(lane_rate - (1 - p)) < 5 * math.sqrt(p * (1 - p) / (count / 4)), (p, lane, lane_rate)
        agree = (keep[:, 0::2] == keep[:, 1::2]).double().mean().item()
        p_agree = p * p + (1 - p) ** 2
        assert abs(agree - p_agree) < 5 * math.sqrt(p_agree * (1 - p_agree) / (count / 2)), (p, agree)
    again = lora_dropout_mask(n_rows, in_f, 0.5, SEED, device=device, backend=backend)
    other_seed = lora_dropout_mask(n_rows, in_f, 0.5, SEED + 1, device=device, backend=backend)
    assert torch.equal(keep, again) and not torch.equal(keep, other_seed)
    assert lora_dropout_mask(4, 5, 0.0, SEED, device=device, backend=backend).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_scales_kept_inputs(backend, device):
    """With W = 0, A = I, B = I, s = 1 the op returns drop(x) itself: zeros where dropped and
    x / (1 - p) where kept, at the expected rate."""
    n_rows, width, p = 64, 32, 0.25
    x = torch.randn(n_rows, width, device=device).abs() + 0.5
    eye = torch.eye(width, device=device)
    y = lora_linear(x, torch.zeros(width, width, device=device), eye, eye, 1.0, dropout=p, seed=7, backend=backend)
    kept = y != 0
    assert torch.allclose(y[kept], x[kept] / (1 - p), rtol=1e-6)
    assert abs(kept.double().mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / kept.numel())
    assert torch.equal(kept, lora_dropout_mask(n_rows, width, p, 7, device=device, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_seed_handling(backend, device):
    x, weight, lora_A, lora_B, _ = make_inputs((9,), 16, 8, 4, torch.float32, None, False, device)
    args = (x, weight, lora_A, lora_B, 1.0)

    def run(**kwargs):
        return lora_linear(*args, backend=backend, **kwargs).detach()

    assert torch.equal(run(dropout=0.5, seed=3), run(dropout=0.5, seed=3))
    assert not torch.equal(run(dropout=0.5, seed=3), run(dropout=0.5, seed=4))
    torch.manual_seed(11)
    first = run(dropout=0.5)
    torch.manual_seed(11)
    assert torch.equal(first, run(dropout=0.5))  # the drawn seed follows torch.manual_seed
    gen_a, gen_b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(run(dropout=0.5, generator=gen_a), run(dropout=0.5, generator=gen_b))
    assert torch.equal(run(dropout=0.0, seed=3), run())


@pytest.mark.parametrize("backend", BACKENDS)
def test_edge_layouts(backend, device):
    """Non-contiguous x, an empty batch, x without grad (only the adapter trains), 1-D x."""
    x, weight, lora_A, lora_B, bias = make_inputs((6,), 20, 12, 4, torch.float32, "frozen", False, device)
    x_t = torch.randn(20, 6, device=device).t()
    y = lora_linear(x_t, weight, lora_A, lora_B, 2.0, bias, backend=backend)
    assert rel_err(y, eager_lora_linear(x_t.double(), weight.double(), lora_A.double(), lora_B.double(),
                                        2.0, bias.double())) < TOLERANCE[torch.float32]
    y.sum().backward()
    assert lora_A.grad is not None and lora_B.grad is not None

    empty = torch.zeros(0, 20, device=device, requires_grad=True)
    y_empty = lora_linear(empty, weight, lora_A, lora_B, 2.0, bias, backend=backend)
    assert y_empty.shape == (0, 12)
    y_empty.sum().backward()
    assert empty.grad.shape == (0, 20)

    one = lora_linear(x[0].detach(), weight, lora_A, lora_B, 2.0, bias, backend=backend)
    assert one.shape == (12,)


BAD_INPUTS = [
    # (id, mutate(x, W, A, B, bias) -> args, error type, message fragment)
    ("rank-mismatch", lambda x, w, a, b, bias: (x, w, a, b[:, :3], bias), ValueError, "rank mismatch"),
    ("x-in-features", lambda x, w, a, b, bias: (x[:, :-1], w, a, b, bias), ValueError, "in_features"),
    ("A-in-features", lambda x, w, a, b, bias: (x, w, a[:, :-1], b, bias), ValueError, "lora_A must have shape"),
    ("B-out-features", lambda x, w, a, b, bias: (x, w, a, b[:-1], bias), ValueError, "lora_B must have shape"),
    ("bias-shape", lambda x, w, a, b, bias: (x, w, a, b, bias[:-1]), ValueError, "bias must have shape"),
    ("weight-1d", lambda x, w, a, b, bias: (x, w[0], a, b, bias), ValueError, "weight must have shape"),
    ("A-dtype", lambda x, w, a, b, bias: (x, w, a.double(), b, bias), TypeError, "lora_A dtype"),
    ("weight-dtype", lambda x, w, a, b, bias: (x, w.half(), a, b, bias), TypeError, "weight dtype"),
    ("x-int", lambda x, w, a, b, bias: (x.long(), w, a, b, bias), TypeError, "x must be"),
    ("B-device", lambda x, w, a, b, bias: (x, w, a, b.to("meta"), bias), ValueError, "lora_B is on meta"),
    ("bias-device", lambda x, w, a, b, bias: (x, w, a, b, bias.to("meta")), ValueError, "bias is on meta"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_raises_before_launch(bad, backend, device, monkeypatch):
    _, mutate, error, fragment = bad
    monkeypatch.setattr(lora_op, "_implementation", lambda name: pytest.fail("a backend ran on bad input"))
    inputs = [t.detach() for t in make_inputs((5,), 8, 6, 4, torch.float32, "frozen", False, device)]
    x, weight, lora_A, lora_B, bias = mutate(*inputs)
    with pytest.raises(error, match=fragment):
        lora_linear(x, weight, lora_A, lora_B, 1.0, bias, backend=backend)


@pytest.mark.parametrize("kwargs, error, fragment", [
    (dict(dropout=1.0), ValueError, "dropout must be in"),
    (dict(dropout=-0.1), ValueError, "dropout must be in"),
    (dict(dropout=0.1, seed=-1), ValueError, "seed must be"),
    (dict(dropout=0.1, seed=3, generator=torch.Generator()), ValueError, "either seed or generator"),
    (dict(backend="cuda-please"), ValueError, "backend must be one of"),
    (dict(scaling=float("nan")), ValueError, "scaling must be finite"),
    (dict(scaling="2"), TypeError, "scaling must be a number"),
], ids=["p=1", "p<0", "seed<0", "seed+generator", "unknown-backend", "nan-scaling", "str-scaling"])
def test_bad_options_raise_before_launch(kwargs, error, fragment, device, monkeypatch):
    monkeypatch.setattr(lora_op, "_implementation", lambda name: pytest.fail("a backend ran on bad input"))
    x, weight, lora_A, lora_B, _ = [t.detach() if t is not None else None
                                    for t in make_inputs((5,), 8, 6, 4, torch.float32, None, False, device)]
    scaling = kwargs.pop("scaling", 1.0)
    with pytest.raises(error, match=fragment):
        lora_linear(x, weight, lora_A, lora_B, scaling, **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the cuda backend may run")
def test_cuda_backend_without_a_gpu_says_why(monkeypatch):
    monkeypatch.setattr(lora_op, "_implementation", lambda name: pytest.fail("a backend ran"))
    x, weight, lora_A, lora_B, _ = make_inputs((5,), 8, 6, 4, torch.float32, None, False, torch.device("cpu"))
    with pytest.raises(RuntimeError, match="backend='cuda' cannot run lora_linear on cpu tensors"):
        lora_linear(x, weight, lora_A, lora_B, 1.0, backend="cuda")


def test_triton_limits_raise_before_launch(device, monkeypatch):
    monkeypatch.setattr(lora_op, "_implementation", lambda name: pytest.fail("a backend ran on bad input"))
    x, weight, lora_A, lora_B, _ = make_inputs((5,), 8, 6, 257, torch.float32, None, False, device)
    with pytest.raises(ValueError, match="ranks 1..256"):
        lora_linear(x, weight, lora_A, lora_B, 1.0, backend="triton")
    x, weight, lora_A, lora_B, _ = make_inputs((5,), 8, 6, 4, torch.float64, None, False, device)
    with pytest.raises(TypeError, match="float64 runs on backend='torch'"):
        lora_linear(x, weight, lora_A, lora_B, 1.0, backend="triton")
