"""Checkpoint / resume, written atomically.

Layout under `<out>/checkpoints/`:
    step-000120/adapter/               PEFT `save_pretrained` (adapter_model.safetensors + config)
    step-000120/trainer_state.pt       optimizer, scheduler, step, RNG states, curriculum order,
                                       SW window state, stop-rule state, base losses
    latest                             the name of the newest complete checkpoint
A checkpoint is written into a temporary directory and renamed into place with os.replace,
then `latest` is replaced the same way, so a run killed at any moment leaves either the
previous or the new checkpoint, never half of one. A temporary directory orphaned by a kill
in the middle of a write (`.step-*`, `.adapter.*`) is removed by the next write and when a run
resumes (`clean_stale_temps`).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import tempfile
from pathlib import Path

import torch

from fastmem.errors import UsageError
from fastmem.files import write_text_atomic

LATEST = "latest"
STATE_FILE = "trainer_state.pt"
ADAPTER_DIR = "adapter"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# temporaries this module and fastmem.files leave only when killed mid-write
_TEMP_PATTERNS = (".step-*", ".adapter.*", f".{LATEST}.*", ".summary.json.*", ".metrics.jsonl.*", ".run.json.*")


def clean_stale_temps(directory: Path) -> None:
    """Remove temporaries a killed writer left in a run directory and its checkpoints/.
    Only one process writes a run, so whatever matches here is an orphan."""
    for folder in (Path(directory), Path(directory) / "checkpoints"):
        if not folder.is_dir():
            continue
        for pattern in _TEMP_PATTERNS:
            for orphan in folder.glob(pattern):
                shutil.rmtree(orphan, ignore_errors=True) if orphan.is_dir() else orphan.unlink(missing_ok=True)


@contextlib.contextmanager
def _remove_on_failure(tmp: Path):
    """A write interrupted by an exception (Ctrl-C included) leaves no temp dir behind."""
    try:
        yield
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_adapter_atomic(peft_model, target: Path, state_dict: dict | None = None) -> None:
    """`peft_model.save_pretrained` into a temp dir next to `target`, then swap it in.
    `state_dict`: full adapter tensors by parameter name (needed when parameters are sharded)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    with _remove_on_failure(tmp):
        peft_model.save_pretrained(str(tmp), safe_serialization=True, save_embedding_layers=False,
                                   state_dict=state_dict)
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


def save_checkpoint(directory: Path, step: int, peft_model, trainer_state: dict) -> Path:
    """Write checkpoint `step` (trainer_state: everything but the adapter) and point `latest` at it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(directory.parent)
    name = f"step-{step:07d}"
    tmp = Path(tempfile.mkdtemp(dir=directory, prefix=f".{name}."))
    with _remove_on_failure(tmp):
        peft_model.save_pretrained(str(tmp / ADAPTER_DIR), safe_serialization=True, save_embedding_layers=False)
        torch.save(dict(trainer_state, step=step, rng=rng_state()), tmp / STATE_FILE)
    final = directory / name
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    write_text_atomic(directory / LATEST, name)
    for old in directory.glob("step-*"):
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(directory: Path) -> Path | None:
    pointer = Path(directory) / LATEST
    if not pointer.is_file():
        return None
    path = Path(directory) / pointer.read_text().strip()
    return path if (path / STATE_FILE).is_file() else None


def load_checkpoint(path: Path, peft_model) -> dict:
    """Load the adapter weights into `peft_model` in place; return the trainer state (RNG not yet set)."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    adapter = load_file(str(Path(path) / ADAPTER_DIR / "adapter_model.safetensors"))
    # A checkpoint of another rank or other layers must fail as bad input naming the tensor,
    # not as a size-mismatch traceback from load_state_dict.
    own = {name: p for name, p in peft_model.named_parameters() if "lora_" in name}
    by_suffix = {name.replace(".default", ""): p for name, p in own.items()}
    for name, tensor in adapter.items():
        mine = by_suffix.get(name)
        if mine is not None and tuple(mine.shape) != tuple(tensor.shape):
            raise UsageError(f"checkpoint {path} does not match this adapter: {name} has shape "
                             f"{tuple(tensor.shape)} there, {tuple(mine.shape)} here (another --rank?)")
    result = set_peft_model_state_dict(peft_model, adapter)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise UsageError(f"checkpoint {path} does not match this adapter: unexpected keys {unexpected[:3]}")
    return torch.load(Path(path) / STATE_FILE, weights_only=False)
