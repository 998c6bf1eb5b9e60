"""Per-step metrics (metrics.jsonl), the summary and peak memory."""

from __future__ import annotations

import json
import os
import resource
from pathlib import Path

import torch



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
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, row: dict) -> None:
        self.rows.append(row)
        if self.path is not None:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(row) + "\n")


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = Path(path).with_name(f".{Path(path).name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
