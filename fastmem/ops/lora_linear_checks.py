"""Input checks of lora_linear: a clear error naming the argument, before any kernel launch.

Also checks `dropout` / `seed` / `generator` and turns them into the `DropoutSpec` every backend
receives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The Triton kernels keep a [rows, r] tile per program; 256 is the largest rank they are built for.
MAX_TRITON_RANK = 256
# Philox seeds stay in int32 so the kernel argument type never changes (no recompiles).
SEED_LIMIT = 2**31 - 1


@dataclass(frozen=True)
class DropoutSpec:
    """LoRA dropout of one call: probability `p` in (0, 1) and the seed its mask derives from."""

    p: float
    seed: int

    @property
    def keep_scale(self) -> float:
        return 1.0 / (1.0 - self.p)


def _tensor(name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_inputs(x, weight, lora_A, lora_B, scaling, bias) -> None:
    x, weight = _tensor("x", x), _tensor("weight", weight)
    lora_A, lora_B = _tensor("lora_A", lora_A), _tensor("lora_B", lora_B)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError("x must have shape [..., in_features], got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape [out_features, in_features], got {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    if x.shape[-1] != in_features:
        raise ValueError(f"x has in_features={x.shape[-1]} but weight expects in_features={in_features} "
                         f"(x {tuple(x.shape)}, weight {tuple(weight.shape)})")
    if lora_A.dim() != 2 or lora_A.shape[1] != in_features:
        raise ValueError(f"lora_A must have shape [r, in_features] = [r, {in_features}], got {tuple(lora_A.shape)}")
    rank = lora_A.shape[0]
    if rank < 1:
        raise ValueError("lora_A has rank r=0; the rank must be >= 1")
    if lora_B.dim() != 2 or lora_B.shape[0] != out_features:
        raise ValueError(f"lora_B must have shape [out_features, r] = [{out_features}, r], got {tuple(lora_B.shape)}")
    if lora_B.shape[1] != rank:
        raise ValueError(f"rank mismatch: lora_A has r={rank} (shape {tuple(lora_A.shape)}) but lora_B has "
                         f"r={lora_B.shape[1]} (shape {tuple(lora_B.shape)})")
    if bias is not None and tuple(_tensor("bias", bias).shape) != (out_features,):
        raise ValueError(f"bias must have shape [out_features] = ({out_features},), got {tuple(bias.shape)}")
    for name, tensor in (("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B), ("bias", bias)):
        if tensor is None:
            continue
        if tensor.dtype != x.dtype:
            raise TypeError(f"{name} dtype {tensor.dtype} must match x dtype {x.dtype} "
                            f"(cast the adapter with .to(x.dtype); autograd keeps its own dtype's grad)")
        if tensor.device != x.device:
            raise ValueError(f"{name} is on {tensor.device} but x is on {x.device}")
    if isinstance(scaling, torch.Tensor):
        if scaling.numel() != 1:
            raise ValueError(f"scaling must be a number or a one-element tensor, got shape {tuple(scaling.shape)}")
    elif not isinstance(scaling, (int, float)) or isinstance(scaling, bool):
        raise TypeError(f"scaling must be a number, got {type(scaling).__name__}")
    if not math.isfinite(float(scaling)):
        raise ValueError(f"scaling must be finite, got {float(scaling)}")


def check_backend_limits(backend: str, x: torch.Tensor, rank: int) -> None:
    """What the chosen backend cannot run, said before it launches anything."""
    if backend == "triton":
        if x.dtype not in TRITON_DTYPES:
            raise TypeError(f"backend='triton' supports float16, bfloat16 and float32, got {x.dtype}; "
                            "float64 runs on backend='torch'")
        if rank > MAX_TRITON_RANK:
            raise ValueError(f"backend='triton' supports ranks 1..{MAX_TRITON_RANK}, got r={rank}; "
                             "use backend='torch'")


def check_dropout(dropout, seed, generator) -> None:
    """Validate the dropout probability, seed and generator of a call (nothing is drawn)."""
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)):
        raise TypeError(f"dropout must be a float in [0, 1), got {type(dropout).__name__}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_LIMIT:
            raise ValueError(f"seed must be an int in [0, {SEED_LIMIT}], got {seed!r}")
        if generator is not None:
            raise ValueError("pass either seed or generator, not both")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")


def draw_seed(generator: torch.Generator | None) -> torch.Tensor:
    """A fresh seed as a 0-d int64 tensor, from `generator` (or torch's default CPU generator, so
    `torch.manual_seed` makes runs repeatable). A tensor, not an int: under torch.compile the
    draw stays in the graph instead of reading a number back to the host."""
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.randint(0, SEED_LIMIT, (), generator=generator, device=device, dtype=torch.int64)


def resolve_dropout(dropout, seed, generator) -> DropoutSpec | None:
    """None when dropout is off; otherwise the spec, drawing a seed from `generator` (or torch's
    default CPU generator) when none is given."""
    check_dropout(dropout, seed, generator)
    if dropout == 0.0:
        return None
    if seed is None:
        seed = int(draw_seed(generator))
    return DropoutSpec(float(dropout), seed)
