"""Run every PEFT `lora.Linear` of a model through the fused lora_linear op.

`patch_peft_model(model)` swaps the `forward` of each `peft.tuners.lora.Linear` instance (the
parameters, their names and PEFT's `save_pretrained` / `load_adapter` are untouched);
`unpatch_peft_model(model)` restores PEFT's own forward. A patched layer computes exactly PEFT's
`base(x) + scaling * lora_B(lora_A(dropout(x)))`, with LoRA dropout done by the op's seeded
in-kernel mask (a different random stream than torch's nn.Dropout, the same distribution).

A call the fused op does not cover goes to PEFT's own forward, so patching never changes what
a model can do: adapters disabled or merged, `adapter_names` (mixed batches) or other extra
arguments, more than one active adapter, LoRA variants (DoRA, ...), `lora_bias`,
`fan_in_fan_out` (GPT-2 Conv1D), a base layer that is not a plain nn.Linear (quantized),
autocast, or a base weight whose dtype differs from x's.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from fastmem.ops.lora_linear import lora_linear

_BACKEND_ATTR = "_fastmem_lora_backend"


def _lora_linear_class():
    from peft.tuners.lora import Linear

    return Linear


def _fused_call(layer, x: torch.Tensor, args: tuple, kwargs: dict):
    """`(base, lora_A, lora_B, scaling, p)` when the fused op computes this call exactly, else None."""
    if args or kwargs or layer.disable_adapters or layer.merged or layer.fan_in_fan_out:
        return None
    base = layer.get_base_layer()
    if type(base) is not nn.Linear or base.weight.dtype != x.dtype:
        return None
    if torch.is_autocast_enabled(x.device.type):
        return None
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if len(active) != 1:
        return None
    name = active[0]
    if name in layer.lora_variant or layer.lora_bias.get(name, False) or layer.lora_B[name].bias is not None:
        return None
    dropout_module = layer.lora_dropout[name]
    if isinstance(dropout_module, nn.Identity):
        p = 0.0
    elif type(dropout_module) is nn.Dropout:
        p = dropout_module.p if dropout_module.training else 0.0
    else:
        return None
    return base, layer.lora_A[name].weight, layer.lora_B[name].weight, layer.scaling[name], p


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    call = _fused_call(self, x, args, kwargs)
    if call is None:
        return type(self).forward(self, x, *args, **kwargs)
    base, lora_A, lora_B, scaling, p = call
    # PEFT keeps adapters in fp32 under a bf16/fp16 base by default and runs the branch in
    # fp32; the fused op runs it in x's dtype (the cast is differentiable: grads stay fp32).
    if lora_A.dtype != x.dtype:
        lora_A, lora_B = lora_A.to(x.dtype), lora_B.to(x.dtype)
    return lora_linear(x, base.weight, lora_A, lora_B, scaling, base.bias, dropout=p,
                       backend=getattr(self, _BACKEND_ATTR))


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
