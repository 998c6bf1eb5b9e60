"""Run a sweep's pending cells as Ray tasks; this process stays the database's only writer.

SQLite on a shared filesystem is not safe past one machine, so the cluster never opens the
database: the driver claims the cells (status 'queued'), marks one 'running' when its task
reports in, and writes the small record the task returns. A task whose worker died (killed,
out of memory, node lost) is re-run by Ray up to `retries` times, then the cell is marked
failed with the error; a cell that raises is failed at once (it would raise again). The
schema and the claim rules are the local executor's, so `fastmem fit`, `--status` and
resumption read the same rows. A killed driver leaves its cells to the next invocation: their
owner (this process) is dead, so they are claimable again.
"""

from __future__ import annotations

import contextlib
import logging
import time

from fastmem.sweep.progress import SweepBar
from fastmem.sweep.ray_task import CellTracker, run_cell
from fastmem.sweep.spec import SweepSpec
from fastmem.sweep.store import ResultsStore, owner_id

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'fastmem[ray]'"


class RayNotInstalledError(ImportError):
    pass


def require_ray():
    """Import Ray, or raise RayNotInstalledError with a one-line install hint."""
    try:
        import ray
    except ImportError as err:
        raise RayNotInstalledError(f"--executor ray needs Ray, which is not installed here ({err}); "
                                   f"install it with: {INSTALL_HINT}") from None
    return ray


def _connect(ray, address: str | None, runtime_env: dict | None) -> bool:
    """Join the cluster at `address` (None: RAY_ADDRESS, else start a local one). Returns
    whether this call did the connecting (and so should disconnect)."""
    if ray.is_initialized():
        return False
    options = {} if address else {"include_dashboard": False}  # a local Ray for this call needs no dashboard
    ray.init(address=address, runtime_env=runtime_env, logging_level=logging.WARNING, **options)
    return True


def run_sweep_on_ray(spec: SweepSpec, db_path, *, address: str | None = None, retries: int = 2,
                     cpus_per_cell: float = 1.0, gpus_per_cell: float | None = None, lease_s: float = 600.0,
                     progress: bool = True, runtime_env: dict | None = None, poll_s: float = 1.0) -> dict:
    """Train every claimable cell of `spec` as a Ray task; returns the spec's cells by status.

    `address`: a running cluster ("ray://host:10001", "auto", ...); None starts a local Ray
    unless one is already initialized in this process (it is then used as it is).
    `retries`: how many times a cell whose task died is re-run before it is marked failed.
    `cpus_per_cell`: CPUs reserved per task (its torch threads). `gpus_per_cell`: None means 1
    when the cluster has GPUs, else 0.
    `runtime_env`: passed to `ray.init` (e.g. env_vars, or py_modules to ship fastmem).
    """
    ray = require_ray()
    if retries < 0:
        raise ValueError(f"retries must be >= 0, got {retries}")
    if cpus_per_cell <= 0:
        raise ValueError(f"cpus_per_cell must be > 0, got {cpus_per_cell}")
    cells = {cell.key: cell for cell in spec.cells()}
    store = ResultsStore(db_path, lease_s=lease_s)
    store.add_cells(list(cells.values()))
    connected_here = _connect(ray, address, runtime_env)
    driver = f"{owner_id()}#ray"
    bar, refs = None, {}
    try:
        if gpus_per_cell is None:
            gpus_per_cell = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        tracker = ray.remote(CellTracker).options(num_cpus=0).remote()
        # GPU tasks: a fresh worker per cell (Ray reassigns GPUs between tasks); CPU workers are
        # reused, and keep the base model loaded between cells.
        task = ray.remote(num_cpus=cpus_per_cell, num_gpus=gpus_per_cell, max_retries=retries,
                          retry_exceptions=False, max_calls=1 if gpus_per_cell else 0)(run_cell)
        threads = max(1, int(cpus_per_cell))
        keys = store.queue_all(list(cells), driver)
        refs = {task.remote(cells[key], spec, tracker, threads): key for key in keys}
        owners: dict[str, str] = {}  # the owner each running cell was given (it names where it runs)
        recorded: set[str] = set()
        bar = SweepBar(store, list(cells), enabled=progress)
        heartbeat_every, last_heartbeat = min(30.0, lease_s / 4), time.monotonic()
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=poll_s)
            for key, place in ray.get(tracker.drain.remote()):
                if key in recorded:
                    continue  # its result came first (the notice is sent without waiting)
                owners[key] = f"{driver}@{place}"
                if not store.start(key, driver, owners[key]):
                    log.warning("sweep cell %s started on %s but this driver no longer holds it", key, place)
            for ref in ready:
                key = refs.pop(ref)
                _record(ray, store, ref, key, driver, owners, retries)
                recorded.add(key)
            if time.monotonic() - last_heartbeat > heartbeat_every:
                store.heartbeat_owned(driver)
                last_heartbeat = time.monotonic()
            bar.refresh()
    finally:
        for ref in refs:  # stopped early (an error, Ctrl-C): no task may outlive its claim
            with contextlib.suppress(Exception):  # a broken connection must not skip the release below
                ray.cancel(ref, force=True)
        released = store.release(driver)  # only when stopped early: the next invocation takes them
        if released:
            log.warning("sweep stopped early: %d cell(s) back to pending", released)
        if bar is not None:
            bar.close()
        if connected_here:
            ray.shutdown()
    return SweepBar(store, list(cells), enabled=False).refresh()


def _record(ray, store: ResultsStore, ref, key: str, driver: str, owners: dict, retries: int) -> None:
    """Write one finished task's outcome: its result, its error, or how its worker died."""
    owner = owners.get(key, driver)
    try:
        record = ray.get(ref)
    except ray.exceptions.RayTaskError as err:  # run_cell itself raised (e.g. fastmem not importable)
        store.fail(key, f"task raised: {err}", owner)
        return
    except ray.exceptions.RayError as err:  # the worker or its node died on every attempt
        store.fail(key, f"task died on all {retries + 1} attempt(s): {type(err).__name__}: {err}", owner)
        return
    if owner != f"{driver}@{record['place']}":  # its start notice is still in flight: count the attempt now
        owner = owners[key] = f"{driver}@{record['place']}"
        store.start(key, driver, owner)
    if record["ok"]:
        store.complete(key, record["result"], owner)
    else:
        store.fail(key, record["error"], owner)
