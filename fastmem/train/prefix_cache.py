"""Frozen-prefix cache: the layers below the first adapted one run once per sample.

The base model is frozen and a sample's tokens are fixed, so everything that enters the
first adapted layer — its hidden states and the keyword arguments the decoder hands every
later layer (rotary position embeddings, the causal mask, position ids) — is the same at
every epoch. One no-grad forward per sample records them with forward pre-hooks; training
then runs only the adapted span `layers[first_adapted:]` + the final norm. The same forward
(adapter disabled) gives the base model's loss on the answer, needed once for ΔL.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from fastmem.data.sample import MemorySample
from fastmem.ops import linear_cross_entropy
from fastmem.train.adapters import ModelParts


@dataclass
class PrefixEntry:
    """What the adapted span needs for one sample.

    hidden: `[1, S, H]` hidden states entering layer `first_adapted` (model dtype, no grad).
    layer_kwargs: per layer from `first_adapted` on, the keyword arguments the decoder passed.
    answer_ids: `[A]` int64 answer tokens; `prompt_len` P: the hidden state at position
        P - 1 + t predicts answer token t.
    base_loss_sum: sum over answer tokens of the base model's cross-entropy (fp32 scalar).
    """

    hidden: torch.Tensor
    layer_kwargs: list[dict]
    answer_ids: torch.Tensor
    prompt_len: int
    base_loss_sum: float

    @property
    def seq_len(self) -> int:
        return self.hidden.shape[1]


def answer_slice(prompt_len: int, answer_len: int) -> slice:
    """Positions whose hidden state predicts the answer (shifted by one)."""
    return slice(prompt_len - 1, prompt_len - 1 + answer_len)


class _Captured(Exception):
    """Raised by the pre-hook to end a capture forward early (never escapes build_entry)."""


def _disabled_adapter(peft_model: nn.Module):
    import contextlib

    return peft_model.disable_adapter() if hasattr(peft_model, "disable_adapter") else contextlib.nullcontext()


@torch.no_grad()
def build_entry(peft_model: nn.Module, parts: ModelParts, sample: MemorySample,
                device: torch.device, *, with_base_loss: bool = True) -> PrefixEntry:
    """Run the frozen model once on `sample` and record the adapted span's inputs.

    With `with_base_loss=False` the forward stops at the last layer's pre-hook (the uncached
    reference path needs no base loss, but it needs every later layer's kwargs).
    """
    k = parts.first_adapted
    n_layers = len(parts.layers)
    captured: dict = {"kwargs": [None] * (n_layers - k)}

    def make_hook(index: int):
        def hook(module, args, kwargs):
            if index == k:
                captured["hidden"] = args[0] if args else kwargs["hidden_states"]
            captured["kwargs"][index - k] = {n: v for n, v in kwargs.items() if n != "hidden_states"}
            if index == n_layers - 1 and not with_base_loss:
                raise _Captured
        return hook

    handles = [parts.layers[i].register_forward_pre_hook(make_hook(i), with_kwargs=True)
               for i in range(k, n_layers)]
    input_ids = torch.tensor([sample.input_ids], dtype=torch.long, device=device)
    was_training = peft_model.training
    peft_model.eval()
    base_loss_sum = float("nan")
    try:
        with _disabled_adapter(peft_model):
            last_hidden = parts.decoder(input_ids=input_ids, use_cache=False).last_hidden_state
        answer = torch.tensor(sample.answer_ids, dtype=torch.long, device=device)
        rows = last_hidden[0, answer_slice(len(sample.prompt_ids), sample.answer_len)]
        base_loss_sum = float(linear_cross_entropy(rows, parts.head_weight, answer, parts.head_bias,
                                                   reduction="sum"))
    except _Captured:
        pass
    finally:
        for handle in handles:
            handle.remove()
        peft_model.train(was_training)
    return PrefixEntry(hidden=captured["hidden"], layer_kwargs=captured["kwargs"],
                       answer_ids=torch.tensor(sample.answer_ids, dtype=torch.long, device=device),
                       prompt_len=len(sample.prompt_ids), base_loss_sum=base_loss_sum)


class PrefixCache:
    """Entries by sample index. With `enabled=False` every lookup reruns the frozen prefix
    (the uncached reference path the equality test compares against)."""

    def __init__(self, peft_model: nn.Module, parts: ModelParts, samples: list[MemorySample],
                 device: torch.device, enabled: bool = True):
        self.peft_model, self.parts, self.samples, self.device = peft_model, parts, samples, device
        self.enabled = enabled
        self.entries: dict[int, PrefixEntry] = {}

    def build_all(self) -> list[float]:
        """Build every entry once; returns each sample's base-model loss sum."""
        sums = []
        for index, sample in enumerate(self.samples):
            entry = build_entry(self.peft_model, self.parts, sample, self.device)
            if self.enabled:
                self.entries[index] = entry
            sums.append(entry.base_loss_sum)
        return sums

    def get(self, index: int) -> PrefixEntry:
        if self.enabled and index in self.entries:
            return self.entries[index]
        entry = build_entry(self.peft_model, self.parts, self.samples[index], self.device,
                            with_base_loss=False)
        if self.enabled:
            self.entries[index] = entry
        return entry


# SDPA's fused attention kernels (CPU flash, CUDA flash / memory-efficient / cuDNN).
_ATTENTION_OPS = frozenset(getattr(torch.ops.aten, name) for name in (
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention")
    if hasattr(torch.ops.aten, name))


def _keep_attention(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Selective checkpointing: save the attention kernel's outputs, recompute the rest.

    At long ℓ a layer's causal attention costs more than its GEMMs (at 32k tokens ~1.2 TFLOP
    against ~0.23 for SmolLM2's linears), while its outputs (`[S, H]` + the `[heads, S]` log-sum-exp)
    weigh what one more hidden state does. Recomputing only the projections, norms and MLP keeps
    checkpointing's memory win for a fraction of a full recompute.
    """
    return CheckpointPolicy.MUST_SAVE if op.overloadpacket in _ATTENTION_OPS else CheckpointPolicy.PREFER_RECOMPUTE


class AdaptedSpan(nn.Module):
    """`layers[first_adapted:]` + the final norm, from cached inputs to answer hidden states.

    A module of its own so that DDP can wrap exactly the part that carries gradients.
    forward(entries) -> `[B, A_max, H]` answer hidden states (zero rows past each answer).
    """

    def __init__(self, parts: ModelParts, gradient_checkpointing: bool = False):
        super().__init__()
        self.layers = nn.ModuleList(parts.layers[parts.first_adapted:])
        self.norm = parts.norm
        self.gradient_checkpointing = gradient_checkpointing

    def _run_layer(self, layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            # Recompute the layer in backward, except its attention kernel (kept, see
            # _keep_attention); the LoRA dropout mask is replayed from the saved RNG state, so
            # the gradient is the same as without checkpointing.
            out = checkpoint(layer, hidden, use_reentrant=False,
                             context_fn=partial(create_selective_checkpoint_contexts, _keep_attention), **kwargs)
        else:
            out = layer(hidden, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def forward(self, entries: list[PrefixEntry]) -> torch.Tensor:
        # One right-padded batch. Exact for every real position: under the causal mask a real
        # token attends only to earlier positions, which are real too, and positions count from
        # 0 in every sample, so the longest sample's rotary embeddings / mask serve them all.
        longest = max(entries, key=lambda e: e.seq_len)
        hidden = nn.utils.rnn.pad_sequence([e.hidden[0] for e in entries], batch_first=True)
        for layer, kwargs in zip(self.layers, longest.layer_kwargs):
            hidden = self._run_layer(layer, hidden, kwargs)
        # Only the answer positions reach the norm and the head.
        rows = [hidden[b, answer_slice(e.prompt_len, e.answer_ids.numel())] for b, e in enumerate(entries)]
        return self.norm(nn.utils.rnn.pad_sequence(rows, batch_first=True))
