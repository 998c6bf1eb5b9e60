"""What a sweep shows: one bar for the whole grid, and the per-cell table of `--status`."""

from __future__ import annotations

import json
from collections import Counter

from tqdm import tqdm

from fastmem.sweep.store import ResultsStore


def counts_for(store: ResultsStore, keys) -> dict[str, int]:
    """Cells of `keys` by status (a database may hold other sweeps' cells too)."""
    wanted = set(keys)
    return dict(Counter(row["status"] for row in store.cell_states() if row["key"] in wanted))


class SweepBar:
    """One bar for the sweep: its count is the cells done, its postfix what is running,
    queued (waiting for a Ray slot) and failed. `refresh` re-reads the database, so the bar
    is right whichever process wrote the rows."""

    def __init__(self, store: ResultsStore, keys: list[str], enabled: bool = True, desc: str = "sweep"):
        self.store, self.keys = store, list(keys)
        done_before = counts_for(store, self.keys).get("done", 0)  # the rate counts this run's cells only
        self.bar = tqdm(total=len(self.keys), initial=done_before, desc=desc, unit="cell", disable=not enabled)
        self.refresh()

    def refresh(self) -> dict[str, int]:
        counts = counts_for(self.store, self.keys)
        self.bar.n = counts.get("done", 0)
        self.bar.set_postfix_str(", ".join(f"{counts.get(s, 0)} {s}" for s in ("running", "queued", "failed")),
                                 refresh=False)
        self.bar.refresh()
        return counts

    def close(self) -> None:
        self.refresh()
        self.bar.close()


def status_report(store: ResultsStore) -> str:
    """The counts as one JSON line, then one line per cell: status, attempts, key, final loss,
    where it runs (or ran), and the first line of its error."""
    lines = [json.dumps(store.status_counts(), sort_keys=True)]
    states = store.cell_states()
    if states:
        lines.append(f"{'status':<8} {'tries':>5}  {'final_loss':>10}  {'wall_s':>7}  key  [owner | error]")
    for row in states:
        loss = "" if row["final_loss"] is None else f"{row['final_loss']:.4f}"
        wall = "" if row["wall_s"] is None else f"{row['wall_s']:.1f}"
        tail = ""
        if row["status"] == "failed" and row["error"]:
            tail = "  error: " + row["error"].strip().splitlines()[-1][:160]
        elif row["status"] in ("queued", "running") and row["owner"]:
            tail = f"  on {row['owner']}"
        lines.append(f"{row['status']:<8} {row['attempts'] or 0:>5}  {loss:>10}  {wall:>7}  {row['key']}{tail}")
    return "\n".join(lines)
