"""A sweep worker: claim a cell, train it with the fixed budget, write its row; repeat.

Workers share nothing but the database: start several processes (`--workers K`), or one per
GPU under torchrun (each rank is an independent worker on its own GPU; the trainer inside a
worker runs single-process).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import threading
import traceback

import torch

from fastmem.sweep.progress import SweepBar
from fastmem.sweep.spec import Cell, SweepSpec
from fastmem.sweep.store import ResultsStore, owner_id

log = logging.getLogger(__name__)


def versions() -> dict:
    import peft
    import transformers

    import fastmem
    from fastmem.ops.cpu_gemm import cpu_model

    # The machine too: two cells' wall times compare only on the same one.
    found = {"fastmem": fastmem.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
             "peft": peft.__version__, "python": platform.python_version(), "cpu": cpu_model()}
    if torch.cuda.is_available():
        found["gpu"] = torch.cuda.get_device_name()
    return found


def cell_samples(cell: Cell, tokenizer):
    from fastmem.data import phonebook, stress_test

    if cell.data == "stress":
        return [stress_test(tokenizer, cell.length, cell.ratio, seed=cell.seed)]
    return phonebook(tokenizer, cell.length, seed=cell.seed)


def cell_config(cell: Cell, spec: SweepSpec, n_samples: int = 1):
    from fastmem.train import TrainConfig

    extra = {} if spec.threshold is None else {"threshold": spec.threshold}
    return TrainConfig(model=cell.model, objective=cell.objective, rank=cell.rank,
                       alpha=spec.alpha_per_rank * cell.rank, dropout=spec.dropout, modules=list(spec.modules),
                       layers=spec.layers, lr=spec.lr, max_steps=spec.max_steps, seed=cell.seed,
                       batch_size=spec.batch_size or n_samples, curriculum=spec.curriculum,
                       stop_on_recall=spec.stop_on_recall, progress=False, out=spec.adapter_dir(cell),
                       context=spec.context, **extra, **spec.train)


def recall_check(report) -> dict:
    """Per sample of a trained cell, from the trainer's final pass (an EvalReport): min token p,
    mean loss, teacher-forced EM and (decoded samples only, else None) greedy-decoded EM — the
    data of the recall-threshold study."""
    records = report.records
    return {"min_p_per_sample": [r.min_prob for r in records],
            "mean_loss_per_sample": [r.mean_loss for r in records],
            "teacher_forced_em_per_sample": [bool(r.scores.exact_match) for r in records],
            "decoded_em_per_sample": [None if r.greedy is None else bool(r.greedy.exact_match) for r in records],
            "answer_len_per_sample": [r.answer_len for r in records],
            "decoding_s": report.timing["decoding_s"]}


def train_cell(cell: Cell, spec: SweepSpec, model, tokenizer) -> dict:
    from fastmem.nn.mlp_block_adapter import unwrap_mlp_blocks
    from fastmem.train import train

    samples = cell_samples(cell, tokenizer)
    config = cell_config(cell, spec, len(samples))
    # One evaluation per cell: the trainer's final pass (decoding every sample for the decode
    # check; a sample that is not recalled stops decoding at its first wrong token) is the check.
    result = train(config, samples, model=model, overwrite=True,  # a redone cell replaces its own earlier attempt
                   final_decode="all" if spec.decode_check else None)
    check = recall_check(result.report)
    # tokens that fell back above the recall line after crossing below it, summed over steps
    check["recrossings"] = sum(int(row.get("recrossed") or 0) for row in result.metrics)
    # the first step whose training forward had every token right / every token at p > 0.5
    # (budget runs, stop_on_recall off: when EM came; with dropout on these forwards are noisy)
    check["first_em_step"] = next((row["step"] for row in result.metrics if row["token_acc"] == 1.0), None)
    check["first_recall_step"] = next((row["step"] for row in result.metrics if row["stubborn_tokens"] == 0), None)
    base = result.model.unload()  # the base model goes back to the next cell without the adapter
    unwrap_mlp_blocks(base.get_decoder().layers)  # adapter "mlp_block": its blocks unwrapped too
    summary = result.summary
    return {**{k: summary.get(k) for k in ("base_loss", "final_loss", "delta_loss", "token_acc", "exact_match",
                                           "stubborn_tokens", "steps", "wall_s", "peak_mem_bytes", "min_p",
                                           "stopped_on_recall", "stopped_on_plateau")},
            **check, "layers": summary.get("layers"), "config": config.to_dict(), "versions": versions()}


class _Heartbeat(threading.Thread):
    """Keeps a claimed cell's lease fresh while it trains."""

    def __init__(self, store: ResultsStore, key: str, owner: str, every_s: float):
        super().__init__(daemon=True)
        self.store, self.key, self.owner, self.every_s = store, key, owner, every_s
        self.done = threading.Event()

    def run(self):
        while not self.done.wait(self.every_s):
            self.store.heartbeat(self.key, self.owner)


def _has_lora_layers(model) -> bool:
    from peft.tuners.lora import LoraLayer
    return any(isinstance(module, LoraLayer) for module in model.modules())


def run_worker(spec: SweepSpec, db_path, *, worker: int = 0, model=None, tokenizer=None,
               lease_s: float = 600.0, progress: bool = True, max_cells: int | None = None) -> int:
    """Train cells until none is claimable (or `max_cells`); returns how many this worker did.

    `model`/`tokenizer`: a base model to reuse (default: load `spec.model`). A cell that fails
    after its adapter was attached leaves LoRA layers in the model: a model this worker loaded
    is then reloaded; a model passed in stops the worker with an error.
    """
    store = ResultsStore(db_path, lease_s=lease_s)
    cells = {c.key: c for c in spec.cells()}
    store.add_cells(list(cells.values()))
    owner = f"{owner_id()}#{worker}"
    owns_model = model is None

    def load():
        from fastmem.models import load_model
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        return load_model(spec.model, device=device, context=spec.context)

    if owns_model:
        model, tokenizer = load()
    done = 0
    bar = SweepBar(store, list(cells), enabled=progress, desc="sweep" if worker == 0 else f"sweep (worker {worker})")
    while max_cells is None or done < max_cells:
        key = store.claim(list(cells), owner)
        if key is None:
            break
        heartbeat = _Heartbeat(store, key, owner, every_s=min(30.0, lease_s / 4))
        heartbeat.start()
        try:
            store.complete(key, train_cell(cells[key], spec, model, tokenizer), owner)
        except Exception:  # a failed cell is recorded and the sweep goes on
            log.exception("sweep cell %s failed", key)
            store.fail(key, traceback.format_exc(), owner)
            if _has_lora_layers(model):
                if not owns_model:
                    raise RuntimeError(f"sweep cell {key} failed with its adapter attached to the model "
                                       "passed in; the worker stops (see the failed row's error)")
                model, tokenizer = load()
        finally:
            heartbeat.done.set()
        done += 1
        bar.refresh()
    bar.close()
    return done


def torchrun_worker_index() -> tuple[int, torch.device | None]:
    """Under torchrun every rank is its own worker on its own GPU; the trainer inside must not
    join a process group, so the world is reduced to one process for it."""
    rank = int(os.environ.get("RANK", "0"))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        os.environ["WORLD_SIZE"] = "1"
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            return rank, torch.device("cuda", local)
    return rank, None


def describe(store: ResultsStore) -> str:
    return json.dumps(store.status_counts(), sort_keys=True)
