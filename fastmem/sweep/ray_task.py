"""What one Ray task does: train one sweep cell and hand back a small record.

Runs inside a Ray worker process. It never touches the results database (the driver is its
only writer); the adapter goes to `spec.adapter_dir(cell)` on storage the user shares between
nodes, so nothing larger than a few numbers travels through Ray's object store.
"""

from __future__ import annotations

import os
import socket
import traceback

from fastmem.sweep.spec import Cell, SweepSpec

# A CPU worker process runs many cells: keep its base model between them, as a local worker
# does (each cell unloads its adapter, so the next one starts from the clean base). GPU tasks
# get a fresh process per cell (Ray's max_calls=1), so nothing stays on a GPU Ray reassigned.
_LOADED: dict[str, tuple] = {}


def where() -> str:
    """This task's place in the cluster: host and pid (the pid is what a kill needs)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _base_model(name: str, context: int | None = None):
    import torch

    from fastmem.models import load_model

    if (name, context) not in _LOADED:
        _LOADED.clear()
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        _LOADED[name, context] = load_model(name, device=device, context=context)
    return _LOADED[name, context]


def run_cell(cell: Cell, spec: SweepSpec, tracker, threads: int) -> dict:
    """Train `cell`; returns {"key", "ok": True, "result": {...}} or {"key", "ok": False, "error"}.

    `tracker`: the driver's CellTracker actor, told first that this attempt started here, so
    the driver can mark the cell running and count the attempt. Not waited for: a task blocked
    in `ray.get` lends its CPU back to Ray, which would start one task too many meanwhile.
    `threads`: torch CPU threads, the CPUs Ray reserved for the task.
    The record also names `place`, for a result that arrives before its start notice.
    """
    import torch

    from fastmem.sweep.worker import _has_lora_layers, train_cell

    place = where()
    tracker.started.remote(cell.key, place)
    torch.set_num_threads(max(1, threads))
    model = None
    try:
        model, tokenizer = _base_model(spec.model, spec.context)
        return {"key": cell.key, "place": place, "ok": True, "result": train_cell(cell, spec, model, tokenizer)}
    except Exception:  # a cell that raises is recorded as failed: retrying would raise again
        if model is not None and _has_lora_layers(model):
            _LOADED.clear()  # the adapter is stuck on the base: load it afresh for the next cell
        return {"key": cell.key, "place": place, "ok": False, "error": traceback.format_exc()}


class CellTracker:
    """A mailbox actor: tasks post (key, where) when an attempt starts; the driver drains it."""

    def __init__(self):
        self.events: list[tuple[str, str]] = []

    def started(self, key: str, place: str) -> None:
        self.events.append((key, place))

    def drain(self) -> list[tuple[str, str]]:
        events, self.events = self.events, []
        return events
