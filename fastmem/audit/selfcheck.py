"""Run each fused op on every backend available on a device and compare with the reference.

The reference is the torch backend in float64 on the same inputs; tolerances are relative
(norm of the difference over the norm of the reference) and written once per dtype.
"""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass

import torch

import fastmem
from fastmem.backends import available_backends, cuda_extension_loaded, triton_installed, triton_interpreting

TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}


@dataclass
class CheckResult:
    op: str
    backend: str
    dtype: str
    case: str
    rel_err: float | None
    tolerance: float
    passed: bool
    error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    diff = (actual.double() - expected.double()).norm().item()
    return diff / max(expected.double().norm().item(), 1e-30)


def _cross_entropy_case(device, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, 37, 64, generator=gen)
    weight = torch.randn(1001, 64, generator=gen) / 8.0 * 3.0
    labels = torch.randint(0, 1001, (2, 37), generator=gen)
    labels = torch.where(torch.rand(2, 37, generator=gen) < 0.5, (hidden @ weight.t()).argmax(-1), labels)
    labels[0, :4] = -100
    return hidden.to(device, dtype), weight.to(device, dtype), labels.to(device)


def _loss_and_grad(hidden, weight, labels, backend, objective):
    h = hidden.detach().clone().requires_grad_(True)
    loss = fastmem.linear_cross_entropy(h, weight, labels, objective=objective, threshold=1.0, backend=backend)
    loss.backward()
    return loss.detach(), h.grad


def check_linear_cross_entropy(device: torch.device, backends: list[str]) -> list[CheckResult]:
    results = []
    dtypes = [torch.float32] + ([torch.bfloat16, torch.float16] if device.type == "cuda" else [])
    for backend in backends:
        for dtype in dtypes:
            hidden, weight, labels = _cross_entropy_case(device, dtype)
            for objective in ("sft", "ot", "sw"):
                tolerance = TOLERANCE[dtype]
                try:
                    loss, grad = _loss_and_grad(hidden, weight, labels, backend, objective)
                    ref_loss, ref_grad = _loss_and_grad(hidden.double().cpu(), weight.double().cpu(), labels.cpu(),
                                                        "torch", objective)
                    err = max(_rel_err(loss.cpu(), ref_loss), _rel_err(grad.cpu(), ref_grad))
                    results.append(CheckResult("linear_cross_entropy", backend, str(dtype).replace("torch.", ""),
                                               objective, err, tolerance, err <= tolerance))
                except Exception as failure:  # a crash on one backend is a finding, not the end of the audit
                    results.append(CheckResult("linear_cross_entropy", backend, str(dtype).replace("torch.", ""),
                                               objective, None, tolerance, False, f"{type(failure).__name__}: {failure}"))
    return results


def _lora_outputs(x, weight, lora_A, lora_B, backend):
    x = x.detach().clone().requires_grad_(True)
    lora_A, lora_B = lora_A.detach().clone().requires_grad_(True), lora_B.detach().clone().requires_grad_(True)
    y = fastmem.lora_linear(x, weight, lora_A, lora_B, 2.0, backend=backend)
    y.float().square().sum().backward()
    return [y.detach(), x.grad, lora_A.grad, lora_B.grad]


def check_lora_linear(device: torch.device, backends: list[str]) -> list[CheckResult]:
    """Output and dx, dA, dB at odd sizes, rank 8, no dropout (masks differ by backend)."""
    from fastmem.ops.lora_linear import SUPPORTED_BACKENDS

    results = []
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(3, 37, 96, generator=gen), torch.randn(80, 96, generator=gen) / 10,
            torch.randn(8, 96, generator=gen) / 10, torch.randn(80, 8, generator=gen) / 10]
    reference = _lora_outputs(*[t.double() for t in base], "torch")
    dtypes = [torch.float32] + ([torch.bfloat16, torch.float16] if device.type == "cuda" else [])
    for backend in [b for b in backends if b in SUPPORTED_BACKENDS]:
        for dtype in dtypes:
            name, tolerance = str(dtype).replace("torch.", ""), TOLERANCE[dtype]
            try:
                ours = _lora_outputs(*[t.to(device, dtype) for t in base], backend)
                err = max(_rel_err(a.cpu(), b) for a, b in zip(ours, reference))
                results.append(CheckResult("lora_linear", backend, name, "r8", err, tolerance, err <= tolerance))
            except Exception as failure:  # a crash on one backend is a finding, not the end of the audit
                results.append(CheckResult("lora_linear", backend, name, "r8", None, tolerance, False,
                                           f"{type(failure).__name__}: {failure}"))
    return results


def run_self_checks(device: torch.device | str | None = None) -> list[CheckResult]:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    backends = available_backends(device)
    return check_linear_cross_entropy(device, backends) + check_lora_linear(device, backends)


def environment_report() -> dict:
    report = {"fastmem": fastmem.__version__, "python": platform.python_version(), "torch": torch.__version__,
              "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
              "triton_installed": triton_installed(), "triton_interpret": triton_interpreting(),
              "cuda_extension": cuda_extension_loaded()}
    if torch.cuda.is_available():
        report["gpu"] = torch.cuda.get_device_name()
    if triton_installed():
        import triton
        report["triton"] = triton.__version__
    report["backends_cpu"] = available_backends(torch.device("cpu"))
    if torch.cuda.is_available():
        report["backends_cuda"] = available_backends(torch.device("cuda"))
    return report
