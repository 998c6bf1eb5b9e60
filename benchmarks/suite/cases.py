"""The tables the suite is parametrized from. Add a row here to add a case.

Every shape row says where it runs: "smoke" rows form the `--smoke` subset (CI, seconds),
"cpu" rows the CPU-sized subset (`make bench` on a CPU), "gpu" rows need a GPU (on a CPU they
are collected and skipped with the reason, so the pending list is visible in every run).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GPU_N = (2048, 8192, 16384, 32768)


@dataclass(frozen=True)
class HeadShape:
    """An lm_head: N answer rows of width H against a vocabulary of V."""

    preset: str
    n: int
    hidden: int
    vocab: int
    where: str  # "smoke" | "cpu" | "gpu"

    @property
    def id(self) -> str:
        return f"{self.preset}-N{self.n}"


CE_SHAPES = [
    HeadShape("tiny", 256, 64, 1000, "smoke"),
    HeadShape("smollm2", 2048, 576, 49152, "cpu"),
    *[HeadShape("smollm2", n, 576, 49152, "gpu") for n in GPU_N[1:]],
    *[HeadShape("llama3-8b", n, 4096, 128256, "gpu") for n in GPU_N],
    *[HeadShape("qwen3-8b", n, 4096, 151936, "gpu") for n in GPU_N],
]


@dataclass(frozen=True)
class LossCase:
    """One configuration of the fused loss. `active_fraction` (OT only) picks the threshold that
    leaves that fraction of the tokens above it, i.e. in the second GEMM. `options` are passed to
    every contender as keyword arguments; a contender that does not implement one is not
    generated for the case (see contenders.py)."""

    id: str
    objective: str
    active_fraction: float | None = None
    options: dict = field(default_factory=dict)

    @property
    def floor_active_fraction(self) -> float:
        """Fraction of rows in the frozen-head gradient GEMM (SW weights are all non-zero)."""
        return 1.0 if self.active_fraction is None else self.active_fraction


LOSS_CASES = [
    LossCase("sft", "sft"),
    LossCase("ot-5%", "ot", active_fraction=0.05),
    LossCase("ot-50%", "ot", active_fraction=0.50),
    LossCase("sw", "sw"),
]


@dataclass(frozen=True)
class LoraShape:
    """A LoRA linear: x [N, I] -> y [N, O] with rank r (the MLP down_proj first)."""

    preset: str
    n: int
    in_features: int
    out_features: int
    rank: int
    where: str

    @property
    def id(self) -> str:
        return f"{self.preset}-N{self.n}-r{self.rank}"


LORA_SHAPES = [
    LoraShape("tiny", 256, 384, 128, 8, "smoke"),
    LoraShape("smollm2-down", 2048, 1536, 576, 8, "cpu"),
    *[LoraShape("qwen3-8b-down", n, 12288, 4096, r, "gpu") for n in (4096, 16384, 32768) for r in (8, 64)],
    *[LoraShape("llama3-8b-down", n, 14336, 4096, 64, "gpu") for n in (4096, 16384, 32768)],
]
LORA_DROPOUT = 0.1  # the paper trains with 0.1


@dataclass(frozen=True)
class TrainCase:
    """One MemFT step: `model` is "tiny" (random 4-layer llama), "smollm2" (the embedded model)
    or a local checkpoint named by FASTMEM_BENCH_MODEL; LoRA r on down_proj of `layers`."""

    model: str
    answer_tokens: int
    where: str
    rank: int = 8
    layers: tuple[int, ...] = (20, 24)

    @property
    def id(self) -> str:
        return f"{self.model}-A{self.answer_tokens}"


TRAIN_CASES = [
    TrainCase("tiny", 128, "smoke", layers=(2, 3)),
    TrainCase("smollm2", 1000, "cpu"),
    *[TrainCase("smollm2", n, "gpu") for n in (4096, 16384, 32768)],
    *[TrainCase("local-8b", n, "gpu", layers=(20, 24)) for n in (10000, 32768)],
]
TRAIN_OBJECTIVES = ("sft", "ot")


def selected(rows, smoke: bool):
    """The smoke rows under --smoke; every other row otherwise (GPU rows skip on a CPU)."""
    return [row for row in rows if (row.where == "smoke") == smoke]
