"""Constants from the paper ("How LoRA Remembers? A Parametric Memory Law for LLM Finetuning"),
named once; docs/design.md, section 1."""

import math

# Under greedy decoding a target with p > 0.5 is the argmax, so it is recalled:
# in loss terms L_t < ln 2.
L_CRIT = math.log(2.0)
P_RECALL = 0.5

# MemFT defaults (the authors' code).
MEMFT_EPS = 0.01
SW_KAPPA = 10.0
SW_TAU = 20.0
SW_WINDOW = 50
SW_FLOOR = 0.01

IGNORE_INDEX = -100
