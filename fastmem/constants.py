"""Constants from the paper ("How LoRA Remembers? A Parametric Memory Law for LLM Finetuning"),
named once; docs/design.md, section 1."""

import math

# Under greedy decoding a target with p > 0.5 is the argmax, so it is recalled:
# in loss terms L_t < ln 2.
L_CRIT = math.log(2.0)
P_RECALL = 0.5


def is_stubborn(loss, threshold: float = L_CRIT):
    """The recall rule, the one definition every workflow reads (TokenStats, the evaluator,
    the trainer's stop confirmation): True where a token is NOT recalled, L_t >= ln 2 (p <= 0.5).
    Written as "not below the line" so that a NaN loss is never recall. `loss`: a tensor of
    per-token losses; returns a bool tensor of its shape."""
    return ~(loss < threshold)

# The training objectives: plain SFT, and MemFT's two token weightings (only-threshold, sliding window).
OBJECTIVES = ("sft", "ot", "sw")

# MemFT defaults (the authors' code).
MEMFT_EPS = 0.01
SW_KAPPA = 10.0
SW_TAU = 20.0
SW_WINDOW = 50
SW_FLOOR = 0.01

IGNORE_INDEX = -100
