"""A stop on a plateau of the training loss: the law's "trained until it stops improving".

The memory law measures what an adapter can hold (the paper trains 2000 epochs); a fixed short
budget measures how fast it gets there instead. With `plateau_patience` P > 0 the run stops
after the step where none of the last P steps' losses beat the best loss before them by more
than `plateau_tol` (nats per token): the loss has stopped falling. A run whose batch is every
sample (the law cells: a step is an epoch) reads the whole data's loss; a noisy loss (dropout,
small batches) needs a larger P. The rule never stops before P + 1 steps.
"""

from __future__ import annotations


class PlateauRule:
    def __init__(self, patience: int, tol: float):
        self.patience, self.tol = patience, tol
        self.losses: list[float] = []

    def update(self, loss: float) -> bool:
        """Record this step's loss; True when the run has reached the plateau."""
        self.losses.append(loss)
        if self.patience <= 0 or len(self.losses) <= self.patience:
            return False
        best_before = min(self.losses[:-self.patience])
        return not min(self.losses[-self.patience:]) < best_before - self.tol

    def state_dict(self) -> dict:
        return {"losses": list(self.losses)}

    def load_state_dict(self, state: dict | None) -> None:
        self.losses = list((state or {}).get("losses", []))
