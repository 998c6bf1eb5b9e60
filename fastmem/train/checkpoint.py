"""Checkpoint / resume, written atomically.

Layout under `<out>/checkpoints/`:
    step-000120/adapter/               PEFT `save_pretrained` (adapter_model.safetensors + config)
    step-000120/trainer_state.pt       optimizer, scheduler, step, RNG states, curriculum order,
                                       SW window state, stop-rule state, data fingerprint
    step-000120/checksums.json         sha256 of each file above, checked on load
    latest                             the name of the newest complete checkpoint
A checkpoint is written into a temporary directory and renamed into place with os.replace,
then `latest` is replaced the same way, so a run killed at any moment leaves either the
previous or the new checkpoint, never half of one. The two newest are kept: one that a disk
error or a copy truncated after the fact fails its checksums, and the run resumes from the
one before (train/setup.py says so in a line). A temporary directory orphaned by a kill
in the middle of a write (`.step-*`, `.adapter.*`) is removed by the next write and when a run
resumes (`clean_stale_temps`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import torch

from fastmem.errors import UsageError
from fastmem.files import write_text_atomic
from fastmem.rope_scaling import write_context_record

LATEST = "latest"
STATE_FILE = "trainer_state.pt"
ADAPTER_DIR = "adapter"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
CHECKSUMS = "checksums.json"
KEEP = 2  # checkpoints kept: a damaged newest one falls back to the one before


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
        write_context_record(tmp, peft_model.get_base_model().config)
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


def _file_digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` by relative path (the checksum file itself excluded)."""
    digests = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != CHECKSUMS:
            digest = hashlib.sha256()
            with path.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
            digests[str(path.relative_to(folder))] = digest.hexdigest()
    return digests


def save_checkpoint(directory: Path, step: int, peft_model, trainer_state: dict) -> Path:
    """Write checkpoint `step` (trainer_state: everything but the adapter), with the sha256 of its
    files, point `latest` at it and keep only the KEEP newest."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(directory.parent)
    name = f"step-{step:07d}"
    tmp = Path(tempfile.mkdtemp(dir=directory, prefix=f".{name}."))
    with _remove_on_failure(tmp):
        peft_model.save_pretrained(str(tmp / ADAPTER_DIR), safe_serialization=True, save_embedding_layers=False)
        write_context_record(tmp / ADAPTER_DIR, peft_model.get_base_model().config)
        torch.save(dict(trainer_state, step=step, rng=rng_state()), tmp / STATE_FILE)
        (tmp / CHECKSUMS).write_text(json.dumps(_file_digests(tmp), indent=1) + "\n")
    final = directory / name
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    write_text_atomic(directory / LATEST, name)
    for old in _step_dirs(directory)[KEEP:]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _step_dirs(directory: Path) -> list[Path]:
    """The checkpoint directories, newest (highest step) first."""
    found = [p for p in Path(directory).glob("step-*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]), reverse=True)


def checkpoint_candidates(directory: Path) -> list[Path]:
    """The checkpoints to try, in order: the one `latest` names, then the others newest first
    (a `latest` naming a missing step falls back to the newest one there)."""
    directory = Path(directory)
    candidates = _step_dirs(directory) if directory.is_dir() else []
    pointer = directory / LATEST
    if pointer.is_file():
        named = directory / pointer.read_text().strip()
        if named in candidates:
            candidates.remove(named)
            candidates.insert(0, named)
    return candidates


def latest_checkpoint(directory: Path) -> Path | None:
    """The newest checkpoint there (see checkpoint_candidates), None when there is none."""
    return next((path for path in checkpoint_candidates(directory) if (path / STATE_FILE).is_file()), None)


class CheckpointUnreadable(Exception):
    """A checkpoint's files are missing, truncated or altered (its checksums disagree)."""


def verify_checkpoint(path: Path) -> None:
    """Raise CheckpointUnreadable unless every file of `path` is there with its recorded sha256.
    (A checkpoint written before checksums existed is checked for its files only.)"""
    path = Path(path)
    for needed in (STATE_FILE, f"{ADAPTER_DIR}/{ADAPTER_WEIGHTS}"):
        if not (path / needed).is_file():
            raise CheckpointUnreadable(f"{needed} is missing")
    if not (path / CHECKSUMS).is_file():
        return
    try:
        recorded = json.loads((path / CHECKSUMS).read_text())
    except (OSError, ValueError) as err:
        raise CheckpointUnreadable(f"{CHECKSUMS} is unreadable ({err})") from None
    actual = _file_digests(path)
    changed = sorted(name for name in recorded if actual.get(name) != recorded[name])
    if changed:
        raise CheckpointUnreadable(f"{', '.join(changed)} differ from the checksums written with it "
                                   "(truncated or altered)")


def load_checkpoint(path: Path, peft_model) -> dict:
    """Verify `path`, load its adapter weights into `peft_model` in place and return the trainer
    state (RNG not yet set). CheckpointUnreadable for damaged files; UsageError for a checkpoint
    of another adapter shape."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    verify_checkpoint(path)
    try:
        adapter = load_file(str(Path(path) / ADAPTER_DIR / ADAPTER_WEIGHTS))
        state = torch.load(Path(path) / STATE_FILE, weights_only=False)
    except Exception as err:  # safetensors' and torch's own errors for a damaged file
        raise CheckpointUnreadable(" ".join(str(err).split())[:200]) from None
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
    return state


def data_fingerprint(samples) -> str:
    """sha256 of the tokenized samples (prompt and answer ids, in order): the same text under
    another tokenizer, or a reordered file, is other data. A checkpoint records it, and a
    resume refuses other data."""
    digest = hashlib.sha256()
    for sample in samples:
        digest.update(json.dumps([list(sample.prompt_ids), list(sample.answer_ids)]).encode())
        digest.update(b"\n")
    return digest.hexdigest()
