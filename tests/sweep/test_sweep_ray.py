"""The Ray executor: a local Ray (2 CPUs) started here, a tiny model, the driver as the only
writer of the same SQLite rows as the local executor."""

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from fastmem.cli import main
from fastmem.sweep import ResultsStore, SweepSpec
from fastmem.sweep.worker import run_worker

REPO = Path(__file__).resolve().parents[2]


def test_without_ray_the_ray_executor_is_refused_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    db = tmp_path / "sub" / "r.sqlite"
    assert main(["sweep", "--db", str(db), "--executor", "ray", "--ranks", "1", "--lengths", "8"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "needs Ray" in err and "pip install 'fastmem[ray]'" in err
    assert not db.exists() and not db.parent.exists()  # refused before anything was created
    assert main(["sweep", "--db", str(db), "--executor", "ray", "--workers", "2"]) == 2
    assert "--workers applies to --executor local" in capsys.readouterr().err and not db.parent.exists()



@pytest.fixture(scope="module")
def local_ray():
    """A local Ray with 2 CPUs whose workers import this checkout's fastmem (not an editable
    install elsewhere) and run torch single-threaded."""
    ray = pytest.importorskip("ray")  # the `ray` extra; the Makefile's test venv installs it
    env = {"PYTHONPATH": os.pathsep.join([str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                                                         if p]),
           "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20, runtime_env={"env_vars": env},
             logging_level="WARNING")

    @ray.remote(num_cpus=0)
    def fastmem_location():
        import fastmem
        return fastmem.__file__

    assert Path(ray.get(fastmem_location.remote())).resolve().is_relative_to(REPO)
    yield ray
    ray.shutdown()


def _spec(model_dir, tmp_path, **overrides):
    values = dict(model=str(model_dir), ranks=[1, 2], lengths=[8, 12], max_steps=3, ratios=[0.25],
                  adapters=str(tmp_path / "adapters"))
    values.update(overrides)
    return SweepSpec(**values)


@pytest.mark.ray
@pytest.mark.slow
def test_ray_grid_runs_every_cell_once_like_local_and_a_rerun_skips_them(tmp_path, tiny_model_dir, local_ray,
                                                                         capsys):
    from fastmem.models import load_model
    from fastmem.sweep.ray_executor import run_sweep_on_ray

    spec = _spec(tiny_model_dir, tmp_path)
    db = tmp_path / "ray.sqlite"
    assert run_sweep_on_ray(spec, db, progress=False) == {"done": 4}
    rows = ResultsStore(db).rows()
    assert len(rows) == 4 and all(row["attempts"] == 1 for row in rows)  # every cell done once
    # two CPU slots, one CPU per cell: two worker processes did it all (a task that lends its CPU
    # back to Ray while it waits would have let a third one start)
    assert len({row["owner"].rsplit("@", 1)[1] for row in rows}) <= 2
    for cell in spec.cells():  # each task wrote its own adapter to the shared path
        assert (Path(spec.adapter_dir(cell)) / "adapter" / "adapter_model.safetensors").is_file()

    # the same grid on the local executor: same rows, same losses (fp tolerance: other thread counts)
    local_db = tmp_path / "local.sqlite"
    model, tokenizer = load_model(str(tiny_model_dir))
    assert run_worker(_spec(tiny_model_dir, tmp_path, adapters=None), local_db, model=model, tokenizer=tokenizer,
                      progress=False) == 4
    local = {row["key"]: row for row in ResultsStore(local_db).rows()}
    assert set(local) == {row["key"] for row in rows}
    for row in rows:
        for column in ("base_loss", "final_loss", "delta_loss", "token_acc"):
            assert row[column] == pytest.approx(local[row["key"]][column], rel=1e-4, abs=1e-5), column
        assert row["steps"] == local[row["key"]]["steps"] == 3

    # a second invocation (the CLI this time) finds nothing to do: finished rows stay untouched
    finished = {row["key"]: (row["finished_at"], row["attempts"]) for row in rows}
    assert main(["sweep", "--db", str(db), "--model", str(tiny_model_dir), "--ranks", "1,2", "--lengths", "8,12",
                 "--ratios", "0.25", "--max-steps", "3", "--adapters", spec.adapters, "--executor", "ray",
                 "--no-progress"]) == 0
    assert capsys.readouterr().out.strip().endswith('{"done": 4}')
    assert {row["key"]: (row["finished_at"], row["attempts"]) for row in ResultsStore(db).rows()} == finished

    # --status: the counts, then one line per cell
    assert main(["sweep", "--db", str(db), "--status"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == '{"done": 4}' and sum(line.startswith("done ") for line in out) == 4


def _kill_first_attempt_mid_training(db, adapter_dir, driver, outcome, timeout_s=600):
    """Wait until the cell's task has trained a step (metrics.jsonl has a line), then SIGKILL
    its worker process; returns the pid killed. (A fresh Ray worker imports torch, transformers
    and peft first: on a loaded 2-core machine that alone can take minutes.)"""
    metrics = Path(adapter_dir) / "metrics.jsonl"
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if not driver.is_alive():
            raise AssertionError(f"the sweep ended before the kill: {outcome}")
        running = [row for row in ResultsStore(db).cell_states() if row["status"] == "running"]
        if running and metrics.is_file() and metrics.read_text().strip():
            pid = int(running[0]["owner"].rsplit(":", 1)[1])  # "driverhost:pid#ray@taskhost:taskpid"
            os.kill(pid, signal.SIGKILL)
            return pid
        time.sleep(0.05)
    raise AssertionError(f"the cell never started training: {ResultsStore(db).cell_states()}")


def _run_in_thread(target, **kwargs):
    outcome = {}

    def body():
        try:
            outcome["counts"] = target(**kwargs)
        except BaseException as err:  # surfaced by the test
            outcome["error"] = err

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread, outcome


@pytest.mark.ray
@pytest.mark.slow
def test_a_task_killed_mid_cell_is_retried_and_finishes(tmp_path, tiny_model_dir, local_ray):
    from fastmem.sweep.ray_executor import run_sweep_on_ray

    spec = _spec(tiny_model_dir, tmp_path, ranks=[2], lengths=[32], max_steps=3000)
    (cell,) = spec.cells()
    db = tmp_path / "r.sqlite"
    thread, outcome = _run_in_thread(run_sweep_on_ray, spec=spec, db_path=db, retries=2, progress=False)
    killed = _kill_first_attempt_mid_training(db, spec.adapter_dir(cell), thread, outcome)
    thread.join(timeout=600)
    assert not thread.is_alive() and "error" not in outcome, outcome
    assert outcome["counts"] == {"done": 1}
    (row,) = ResultsStore(db).rows()
    assert row["attempts"] == 2 and row["steps"] == 3000 and row["error"] is None
    assert f":{killed}" not in row["owner"]  # finished by another worker process
    lines = (Path(spec.adapter_dir(cell)) / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3000  # the retry trained from the start: one uninterrupted log
    assert (Path(spec.adapter_dir(cell)) / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.ray
@pytest.mark.slow
def test_a_task_killed_past_its_retries_is_marked_failed_with_the_error(tmp_path, tiny_model_dir, local_ray,
                                                                      capsys):
    from fastmem.sweep.ray_executor import run_sweep_on_ray

    spec = _spec(tiny_model_dir, tmp_path, ranks=[2], lengths=[32], max_steps=3000)
    (cell,) = spec.cells()
    db = tmp_path / "r.sqlite"
    thread, outcome = _run_in_thread(run_sweep_on_ray, spec=spec, db_path=db, retries=0, progress=False)
    _kill_first_attempt_mid_training(db, spec.adapter_dir(cell), thread, outcome)
    thread.join(timeout=600)
    assert not thread.is_alive() and outcome.get("counts") == {"failed": 1}, outcome
    (row,) = ResultsStore(db).rows("failed")
    assert row["attempts"] == 1 and "died on all 1 attempt(s)" in row["error"]
    assert main(["sweep", "--db", str(db), "--status"]) == 0
    assert "error: " in capsys.readouterr().out


@pytest.mark.ray
@pytest.mark.slow
def test_a_driver_stopped_early_cancels_its_tasks_and_gives_its_cells_back(tmp_path, tiny_model_dir, local_ray,
                                                                          monkeypatch):
    from fastmem.sweep import ray_executor

    def broken_record(*args, **kwargs):
        raise RuntimeError("the driver stops here")

    monkeypatch.setattr(ray_executor, "_record", broken_record)
    spec = _spec(tiny_model_dir, tmp_path, ranks=[1, 2], lengths=[8], max_steps=2)
    db = tmp_path / "r.sqlite"
    with pytest.raises(RuntimeError, match="the driver stops here"):
        ray_executor.run_sweep_on_ray(spec, db, progress=False)
    assert ResultsStore(db).status_counts() == {"pending": 2}  # nothing left claimed by a gone driver
    monkeypatch.undo()
    assert ray_executor.run_sweep_on_ray(spec, db, progress=False) == {"done": 2}
