"""backend="cuda" (csrc/ kernels) on a GPU: the kernels' chunk checks, no host sync under
set_sync_debug_mode("error"), CUDA-graph capture of a training step, the custom ops under
opcheck / torch.compile, > 2^31 logits. The float64-oracle cases are the table's "cuda" rows
(tests/ops/cross_entropy_cases.py, run by test_cross_entropy_table.py). Skipped, with the reason, where there is no GPU or the extension cannot load; the
kernels' math is checked without a GPU in tests/csrc/."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastmem
from fastmem._cuda_build import cuda_gpu_skip_reason
from tests.csrc.ce_reference import CASES, DTYPES, check_chunk_kernels
from tests.ops.cross_entropy_oracle import oracle_loss
from tests.ops.test_linear_cross_entropy import make_case, rel_err


SKIP_REASON = cuda_gpu_skip_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")]


@pytest.fixture(scope="module")
def cuda_ops():
    from fastmem.ops.cross_entropy.backend_cuda import cuda_ops as load_ops

    return load_ops()


@pytest.mark.parametrize("n_cols,offset,pad,threads", CASES, ids=[f"V{c[0]}-off{c[1]}-pad{c[2]}" for c in CASES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_chunk_kernels_on_gpu(cuda_ops, dtype, n_cols, offset, pad, threads):
    check_chunk_kernels(cuda_ops, dtype, n_cols, offset, pad, torch.device("cuda"))


def _gpu_step_inputs(dtype=torch.float32, seed=0):
    hidden, weight, bias, labels = make_case(dtype, batch=2, seq=300, hidden_size=64, vocab=1031, seed=seed)
    return hidden.cuda(), weight.cuda(), labels.cuda()


@pytest.mark.parametrize("objective", ["sft", "ot", "sw"])
@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
def test_no_host_sync_under_sync_debug_mode_error(backend, objective):
    """Forward + backward with torch.cuda.set_sync_debug_mode("error"): any host sync raises.
    One warm-up call first (backend choice, JIT build, Triton compile)."""
    hidden, weight, labels = _gpu_step_inputs()

    def step():
        h = hidden.clone().requires_grad_(True)
        loss, stats = fastmem.linear_cross_entropy(h, weight, labels, objective=objective, threshold=2.0,
                                                   return_stats=True, backend=backend, chunk_size=128)
        loss.backward()
        return loss, stats.entropy, h.grad

    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, entropy, grad = step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(loss) and torch.isfinite(entropy).all() and torch.isfinite(grad).all()


@pytest.mark.parametrize("objective", ["sft", "ot"])
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_graph_capture_of_a_training_step(backend, objective):
    """A training step (fused loss forward, backward, SGD update) captured in a CUDA graph and
    replayed gives the eager step's loss and weights."""
    hidden, weight, labels = _gpu_step_inputs(seed=1)
    proj = torch.nn.Linear(64, 64, device="cuda")
    eager_proj = torch.nn.Linear(64, 64, device="cuda")
    eager_proj.load_state_dict(proj.state_dict())

    def step(module, optimizer):
        optimizer.zero_grad(set_to_none=False)
        loss = fastmem.linear_cross_entropy(module(hidden), weight, labels, objective=objective, threshold=2.0,
                                            backend=backend, chunk_size=128)
        loss.backward()
        optimizer.step()
        return loss

    optimizer = torch.optim.SGD(proj.parameters(), lr=0.1)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as torch.cuda.graphs asks
        for _ in range(2):
            step(proj, optimizer)
    torch.cuda.current_stream().wait_stream(side)
    eager_optimizer = torch.optim.SGD(eager_proj.parameters(), lr=0.1)
    for _ in range(2):
        step(eager_proj, eager_optimizer)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured_loss = step(proj, optimizer)
    for _ in range(3):
        graph.replay()
        expected = step(eager_proj, eager_optimizer)
        torch.cuda.synchronize()
        torch.testing.assert_close(captured_loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(proj.weight, eager_proj.weight, rtol=1e-5, atol=1e-6)


def test_float64_matches_oracle():
    """The table's float64 rows cover the frozen head; here the trainable head and bias."""
    hidden, weight, bias, labels = make_case(torch.float64, seed=11)
    for objective in ("sft", "ot", "sw"):
        h = hidden.cuda().requires_grad_(True)
        w, b = weight.cuda().requires_grad_(True), bias.cuda().requires_grad_(True)
        loss = fastmem.linear_cross_entropy(h, w, labels.cuda(), b, objective=objective, backend="cuda",
                                            chunk_size=16)
        loss.backward()
        ref_h, ref_w, ref_b = (t.clone().requires_grad_(True) for t in (hidden, weight, bias))
        ref_loss, _, _ = oracle_loss(ref_h, ref_w, labels, ref_b, objective=objective)
        ref_loss.backward()
        assert rel_err(loss.detach().cpu(), ref_loss.detach()) <= 1e-10
        for got, want in ((h.grad, ref_h.grad), (w.grad, ref_w.grad), (b.grad, ref_b.grad)):
            assert rel_err(got.cpu(), want) <= 1e-10


def test_ties_count_as_wrong():
    weight = torch.eye(4, 4)
    weight = torch.cat([weight, weight[:1]])  # logits 0 and 4 tie
    hidden, labels = torch.tensor([[5.0, 0, 0, 0], [0, 5.0, 0, 0]]), torch.tensor([0, 1])
    _, stats = fastmem.linear_cross_entropy(hidden.cuda(), weight.cuda(), labels.cuda(), backend="cuda",
                                            return_stats=True)
    assert stats.correct.tolist() == [False, True] and int(stats.first_error) == 0


def test_auto_picks_cuda_on_a_gpu():
    from fastmem.backends import resolve_backend

    assert resolve_backend("linear_cross_entropy", "auto", torch.device("cuda"), ("torch", "triton", "cuda")) == "cuda"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_opcheck(cuda_ops, dtype):
    logits = (torch.randn(5, 40, device="cuda") * 3).to(dtype)[:, 1:38]
    labels = torch.randint(0, 37, (5,), device="cuda")
    torch.library.opcheck(cuda_ops.ce_row_stats, (logits, labels, 3.0))
    row_max, log_sum, *_ = cuda_ops.ce_row_stats(logits, labels, 0.0)
    weight = torch.linspace(0.0, 1.0, 5, device="cuda", dtype=row_max.dtype)
    torch.library.opcheck(cuda_ops.ce_softmax_grad_, (logits.clone(), labels, row_max, log_sum, weight, 0.0, 0.1,
                                                      1e-3))


def test_ops_compile_with_inductor(cuda_ops):
    def chunk_step(logits, labels):
        row_max, log_sum, target, best_other, _, _ = cuda_ops.ce_row_stats(logits, labels, 0.0)
        weight = ((row_max + log_sum - target) > 0.5).float()
        cuda_ops.ce_softmax_grad_(logits, labels, row_max, log_sum, weight, 0.0, 0.0, 0.0)
        return row_max + log_sum, target > best_other

    logits = torch.randn(64, 1000, device="cuda", dtype=torch.bfloat16) * 3
    labels = torch.randint(0, 1000, (64,), device="cuda")
    eager_logits, compiled_logits = logits.clone(), logits.clone()
    expected = chunk_step(eager_logits, labels)
    got = torch.compile(chunk_step, fullgraph=True)(compiled_logits, labels)
    torch.testing.assert_close(got[0], expected[0])
    assert torch.equal(got[1], expected[1]) and torch.equal(compiled_logits, eager_logits)


def test_binding_rejects_bad_tensors_clearly(cuda_ops):
    logits = torch.randn(4, 10, device="cuda")
    with pytest.raises(RuntimeError, match="labels must be int64"):
        cuda_ops.ce_row_stats(logits, torch.zeros(4, dtype=torch.int32, device="cuda"), 0.0)
    with pytest.raises(RuntimeError, match="column stride 1"):
        cuda_ops.ce_row_stats(torch.randn(4, 20, device="cuda")[:, ::2], torch.zeros(4, dtype=torch.long,
                                                                                       device="cuda"), 0.0)
    with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
        cuda_ops.ce_row_stats(torch.randn(4, 10), torch.zeros(4, dtype=torch.long), 0.0)
    with pytest.raises(RuntimeError, match="softcap must be >= 0"):
        cuda_ops.ce_row_stats(logits, torch.zeros(4, dtype=torch.long, device="cuda"), -1.0)


@pytest.mark.slow
def test_more_than_2_pow_31_logits_elements():
    n_rows, hidden_size, vocab = 16384 + 8, 64, 131101  # N * V > 2^31 in one chunk
    torch.manual_seed(0)
    hidden = torch.randn(n_rows, hidden_size, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(vocab, hidden_size, device="cuda", dtype=torch.bfloat16) * 0.2
    labels = torch.randint(0, vocab, (n_rows,), device="cuda")
    ours = fastmem.linear_cross_entropy(hidden, weight, labels, backend="cuda", chunk_size=n_rows)
    ref = sum(F.cross_entropy(hidden[i:i + 1024].float() @ weight.float().t(), labels[i:i + 1024], reduction="sum")
              for i in range(0, n_rows, 1024)) / n_rows
    torch.testing.assert_close(ours, ref, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("offset", [0.0, 20.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_confident_targets(dtype, offset):
    from tests.ops import test_cross_entropy_numerics as numerics_suite

    numerics_suite.test_confident_targets_keep_their_gradient("cuda", dtype, offset)


def test_minus_inf_columns(monkeypatch):
    from tests.ops import test_cross_entropy_numerics as numerics_suite

    numerics_suite.test_every_column_but_the_target_minus_inf("cuda", monkeypatch)
    numerics_suite.test_vocabulary_tiles_of_minus_inf("cuda", slice(0, 256), monkeypatch)


@pytest.mark.parametrize("name", ["softcap", "smoothing", "zloss", "all"])
def test_options(name):
    from tests.ops import test_cross_entropy_options as options_suite

    for objective, reduction in (("sft", "mean"), ("ot", "mean"), ("sw", "none")):
        options_suite.test_options_match_oracle("cuda", name, objective, reduction)
    options_suite.test_options_in_half_precision("cuda", torch.bfloat16)
