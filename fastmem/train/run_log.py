"""Per-step metrics (metrics.jsonl), the progress-bar figures, re-crossings and peak memory."""

from __future__ import annotations

import json
import resource
from pathlib import Path

import torch

from fastmem.files import write_json_atomic, write_jsonl_atomic  # noqa: F401 (write_json_atomic: older imports)


def peak_mem_bytes(device: torch.device) -> int:
    """Peak GPU memory allocated by torch on a GPU; on a CPU the process's peak RSS."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class MetricsLog:
    """metrics.jsonl, one line per step. On resume, lines after the checkpoint's step are
    dropped so that the file reads as one uninterrupted run."""

    def __init__(self, out: Path | None, resume_step: int, enabled: bool = True):
        self.path = None if out is None or not enabled else Path(out) / "metrics.jsonl"
        self.rows: list[dict] = []
        if self.path is None:
            return
        kept = []
        if resume_step > 0 and self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
        self.rows = [json.loads(line) for line in kept]
        write_jsonl_atomic(self.path, kept)  # a kill here leaves the old file, never half of one

    def write(self, row: dict) -> None:
        self.rows.append(row)
        if self.path is not None:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(row) + "\n")


class RunFigures:
    """The whole run's figures for the progress bar: each sample's latest teacher-forced
    stats (a batch shows one or a few samples; the bar must show all of them).

    `update(indices, stats)` after each step; `postfix()` -> loss (token-weighted mean), acc
    (token accuracy), min_p, stubborn (tokens with p <= 0.5) over the samples seen so far.
    """

    def __init__(self, num_samples: int):
        self.num_samples = num_samples
        self.latest: dict[int, tuple[float, int, int, int, float]] = {}

    def update(self, indices: list[int], stats) -> None:
        stubborn = stats.stubborn_mask()
        for row, index in enumerate(indices):
            valid = stats.valid[row]
            n = int(valid.sum())
            if n == 0:
                continue
            self.latest[index] = (float(stats.loss[row][valid].sum()), n,
                                  int((stats.correct[row] & valid).sum()), int(stubborn[row].sum()),
                                  float(stats.prob[row][valid].min()))

    def postfix(self) -> dict:
        if not self.latest:
            return {}
        rows = self.latest.values()
        tokens = sum(r[1] for r in rows)
        figures = {"loss": f"{sum(r[0] for r in rows) / tokens:.3f}",
                   "acc": f"{sum(r[2] for r in rows) / tokens:.3f}",
                   "min_p": f"{min(r[4] for r in rows):.2f}",
                   "stubborn": sum(r[3] for r in rows)}
        if len(self.latest) < self.num_samples:
            figures["seen"] = f"{len(self.latest)}/{self.num_samples}"
        return figures


class Recrossings:
    """Count tokens that were recalled (p > 0.5) at a sample's previous visit and are not now:
    the drift docs/design.md (section 9) records with OT at exactly ln 2 (the `recrossed` metric)."""

    def __init__(self):
        self.last: dict[int, torch.Tensor] = {}

    def count(self, indices: list[int], stats) -> int:
        total = 0
        for row, index in enumerate(indices):
            recalled = (~stats.stubborn_mask()[row])[stats.valid[row]].cpu()
            if index in self.last:
                total += int((self.last[index] & ~recalled).sum())
            self.last[index] = recalled
        return total
