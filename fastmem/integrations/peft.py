"""Run every PEFT `lora.Linear` of a model through the fused lora_linear op.

`patch_peft_model(model)` swaps the `forward` of each `peft.tuners.lora.Linear` instance (the
parameters, their names and PEFT's `save_pretrained` / `load_adapter` are untouched);
`unpatch_peft_model(model)` restores PEFT's own forward. A patched layer computes exactly PEFT's
`base(x) + scaling * lora_B(lora_A(dropout(x)))`, with LoRA dropout done by the op's seeded
in-kernel mask (a different random stream than torch's nn.Dropout, the same distribution).

A call the fused op does not cover goes to PEFT's own forward, so patching never changes what
a model can do: adapters disabled or merged, `adapter_names` (mixed batches) or other extra
arguments, more than one active adapter, LoRA variants (DoRA, ...), `lora_bias`,
`fan_in_fan_out` (GPT-2 Conv1D), a base layer that is not a plain nn.Linear (quantized), or a
base weight whose dtype differs from x's. Each such reason is logged once per process (a
warning for a feature the fused op lacks, info for adapters disabled / merged, where PEFT's
forward is the right path anyway).

Under autocast the fused op runs as autocast would run PEFT's layer: every operand in the
autocast dtype (the adapters' gradients still come back in their own dtype).
"""

from __future__ import annotations

import logging
import types

import torch
from torch import nn

from fastmem.ops.lora_linear import lora_linear

_BACKEND_ATTR = "_fastmem_lora_backend"
log = logging.getLogger("fastmem")


def _lora_linear_class():
    from peft.tuners.lora import Linear

    return Linear


def _fused_call(layer, x: torch.Tensor, args: tuple, kwargs: dict):
    """`((base, lora_A, lora_B, scaling, p, dtype), None)` when the fused op computes this call
    exactly (`dtype`: the one the GEMMs run in), else `(None, reason)`."""
    if args or kwargs:
        return None, f"extra forward arguments {sorted(kwargs) or '(positional)'} (e.g. adapter_names)"
    if layer.disable_adapters:
        return None, "adapters are disabled"
    if layer.merged:
        return None, "the adapter is merged into the base weight"
    if layer.fan_in_fan_out:
        return None, "fan_in_fan_out (Conv1D) layers are not covered"
    base = layer.get_base_layer()
    if type(base) is not nn.Linear:
        return None, f"the base layer is a {type(base).__name__}, not a plain nn.Linear"
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type) and x.dtype in (torch.float32, torch.float16, torch.bfloat16):
        dtype = torch.get_autocast_dtype(device_type)
    elif base.weight.dtype != x.dtype:
        return None, f"the base weight is {base.weight.dtype} but the input is {x.dtype}"
    else:
        dtype = x.dtype
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if len(active) != 1:
        return None, f"{len(active)} active adapters (the fused op runs exactly one)"
    name = active[0]
    if name in layer.lora_variant:
        return None, f"adapter {name!r} is a LoRA variant ({type(layer.lora_variant[name]).__name__})"
    if layer.lora_bias.get(name, False) or layer.lora_B[name].bias is not None:
        return None, f"adapter {name!r} has lora_bias"
    dropout_module = layer.lora_dropout[name]
    if isinstance(dropout_module, nn.Identity):
        p = 0.0
    elif type(dropout_module) is nn.Dropout:
        p = dropout_module.p if dropout_module.training else 0.0
    else:
        return None, f"the LoRA dropout is a {type(dropout_module).__name__}, not nn.Dropout"
    return (base, layer.lora_A[name].weight, layer.lora_B[name].weight, layer.scaling[name], p, dtype), None


# Capability gaps are warnings; these reasons are the intended use of PEFT's forward.
_EXPECTED_FALLBACKS = ("adapters are disabled", "the adapter is merged into the base weight")
_logged_fallbacks: set[str] = set()


def _log_fallback(reason: str) -> None:
    if reason in _logged_fallbacks:
        return
    _logged_fallbacks.add(reason)
    level = logging.INFO if reason in _EXPECTED_FALLBACKS else logging.WARNING
    log.log(level, "fastmem: a patched PEFT LoRA layer runs PEFT's own forward, not the fused lora_linear: %s "
            "(said once per reason)", reason)


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    call, reason = _fused_call(self, x, args, kwargs)
    if call is None:
        _log_fallback(reason)
        return type(self).forward(self, x, *args, **kwargs)
    base, lora_A, lora_B, scaling, p, dtype = call
    # PEFT keeps adapters in fp32 under a bf16/fp16 base by default and runs the branch in
    # fp32; the fused op runs it in the GEMM dtype (the cast is differentiable: grads stay fp32).
    # Under autocast that dtype is autocast's, for the base GEMM too, as autocast would run it.
    weight, bias = base.weight, base.bias
    x, weight, lora_A, lora_B = (t if t.dtype == dtype else t.to(dtype) for t in (x, weight, lora_A, lora_B))
    if bias is not None and bias.dtype != dtype:
        bias = bias.to(dtype)
    with torch.autocast(x.device.type, enabled=False):  # the operands are cast already
        return lora_linear(x, weight, lora_A, lora_B, scaling, bias, dropout=p, backend=getattr(self, _BACKEND_ATTR))


def patch_peft_model(model: nn.Module, backend: str = "auto") -> int:
    """Route every `peft.tuners.lora.Linear` in `model` (a PeftModel or any module holding them)
    through `fastmem.lora_linear` on `backend`. Patching twice only updates the backend.

    Returns the number of LoRA linear layers patched.
    """
    from fastmem.backends import BACKENDS

    if backend not in BACKENDS + ("auto",):
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
    lora_linear_class = _lora_linear_class()
    patched = 0
    for module in model.modules():
        # Exact type: subclasses (quantized layers, ...) have forwards of their own.
        if type(module) is lora_linear_class:
            module.forward = types.MethodType(_fused_forward, module)
            setattr(module, _BACKEND_ATTR, backend)
            patched += 1
    return patched


def unpatch_peft_model(model: nn.Module) -> int:
    """Give every patched layer back PEFT's own forward; returns how many were restored."""
    restored = 0
    for module in model.modules():
        if hasattr(module, _BACKEND_ATTR):
            del module.forward
            delattr(module, _BACKEND_ATTR)
            restored += 1
    return restored


def is_patched(module: nn.Module) -> bool:
    """True for a PEFT lora.Linear currently running through the fused op."""
    return hasattr(module, _BACKEND_ATTR)
