"""torchrun support: DDP (or FSDP2) over the adapted span, and the collectives the loop needs.

Launch: `torchrun --nproc-per-node N -m fastmem train ...`. Each rank builds the same
schedule and takes its slice of every global batch; the stop / skip decision is reduced
over ranks so that every rank runs backward (or skips it) together.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from fastmem.train.stop_rule import BatchSignal


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistInfo:
    """Join the process group torchrun describes (nccl on GPUs, gloo on CPUs); single process
    otherwise. An already initialised group is reused."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world <= 1 and not dist.is_initialized():
        return DistInfo(device=torch.device("cuda" if cuda else "cpu"))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count()))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    return DistInfo(rank=rank, world_size=world, device=device)


def wrap_span(span: nn.Module, mode: str, info: DistInfo) -> nn.Module:
    """DDP: gradients of the LoRA parameters are averaged over ranks in backward.
    FSDP2: each decoder layer of the span and the span itself are sharded (fully_shard)."""
    if not info.enabled:
        return span
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [info.device.index] if info.device.type == "cuda" else None
        return DistributedDataParallel(span, device_ids=ids)
    from torch.distributed.device_mesh import init_device_mesh

    try:
        from torch.distributed.fsdp import fully_shard  # torch >= 2.6
    except ImportError:
        from torch.distributed._composable.fsdp import fully_shard  # torch 2.4 / 2.5

    mesh = init_device_mesh(info.device.type, (info.world_size,))
    for layer in span.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(span, mesh=mesh)
    return span


def reduce_signal(signal: BatchSignal, info: DistInfo) -> BatchSignal:
    if not info.enabled:
        return signal
    # On the rank's own device: NCCL reduces CUDA tensors only, gloo CPU ones.
    values = torch.tensor([signal.stubborn_tokens, signal.active_tokens, signal.weight_sum,
                           signal.em_short_tokens], dtype=torch.float64, device=info.device)
    dist.all_reduce(values)
    values = values.cpu()
    return BatchSignal(int(values[0]), int(values[1]), float(values[2]), int(values[3]))


def mean_over_ranks(value: float, info: DistInfo) -> float:
    """The mean of a per-rank number over ranks (every rank gets the same value back)."""
    if not info.enabled:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=info.device)
    dist.all_reduce(tensor)
    return float(tensor.cpu()) / info.world_size


def gather_first_errors(first_error: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """`[B]` per rank -> `[world * B]` in rank order (the global batch's order)."""
    first_error = first_error.reshape(-1).to(torch.int64)
    if not info.enabled:
        return first_error.cpu()
    first_error = first_error.to(info.device)
    parts = [torch.empty_like(first_error) for _ in range(info.world_size)]
    dist.all_gather(parts, first_error)
    return torch.cat(parts).cpu()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def full_adapter_state(peft_model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable (LoRA) parameters as full, unsharded CPU tensors, by state_dict name.
    Under FSDP2 the parameters are DTensor shards: gathering them is a collective, so every
    rank must call this."""
    state = {}
    for name, param in peft_model.named_parameters():
        if param.requires_grad:
            tensor = param.detach()
            if hasattr(tensor, "full_tensor"):
                tensor = tensor.full_tensor()
            state[name] = tensor.cpu().clone()
    return state


def any_rank(flags: list[bool], info: DistInfo) -> list[bool]:
    """Element-wise OR of `flags` over ranks (every rank passes a list of the same length), so
    that all ranks take the same decision from a check each ran on its own."""
    if not info.enabled or not flags:
        return list(flags)
    values = torch.tensor([int(f) for f in flags], dtype=torch.int64, device=info.device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return [bool(v) for v in values.tolist()]


@contextlib.contextmanager
def unsharded(span: nn.Module | None, mode: str, info: DistInfo):
    """Under FSDP2, gather the span's full parameters for the block (then shard them again): the
    evaluator runs the model's own forward, which does not go through the span's FSDP hooks,
    and a sharded (DTensor) weight cannot meet a plain activation. Every rank must enter."""
    if span is None or not (info.enabled and mode == "fsdp2"):
        yield
        return
    try:
        from torch.distributed.fsdp import FSDPModule  # torch >= 2.6
    except ImportError:
        from torch.distributed._composable.fsdp import FSDPModule
    sharded = [module for module in span.modules() if isinstance(module, FSDPModule)]
    for module in sharded:
        module.unshard()
    try:
        yield
    finally:
        for module in sharded:
            module.reshard()
