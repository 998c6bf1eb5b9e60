"""Input checks the commands run before anything slow (a model load takes ~20 s) or lasting
(a directory, a database) happens. Each raises UsageError with one line naming the flag and
the file; none writes anything.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from fastmem.files import check_nearest_parent, parse_json_object
from fastmem.data.jsonl import _KNOWN_FIELDS as KNOWN_FIELDS
from fastmem.data.jsonl import check_text_fields
from fastmem.errors import UsageError

SQLITE_HEADER = b"SQLite format 3\x00"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def check_jsonl_file(path: str, flag: str = "--data", records: str = "prompt/answer") -> Path:
    """A readable UTF-8 JSONL file of objects with string "prompt" and "answer" (the full
    per-record checks run again when the data is tokenized; these need no tokenizer).
    records="metrics": any JSON objects (a trainer's metrics.jsonl)."""
    file = Path(path)
    if not file.exists():
        raise UsageError(f"{flag} {path} does not exist")
    if file.is_dir():
        raise UsageError(f"{flag} {path} is a directory, not a JSONL file")
    try:
        raw = file.read_bytes()
    except OSError as err:
        raise UsageError(f"{flag} {path} cannot be read ({err.strerror})") from None
    count = 0
    for number, line in enumerate(raw.split(b"\n"), start=1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as err:
            raise UsageError(f"{flag} {path}:{number}: not UTF-8 text (byte 0x{line[err.start]:02x} at "
                             f"column {err.start + 1}); save the file as UTF-8") from None
        if not text.strip():
            continue
        record = parse_json_object(text, f"{flag} {path}:{number}", ' like {"prompt": "...", "answer": "..."}')
        count += 1
        if records != "prompt/answer":
            continue
        for key in ("prompt", "answer"):
            if not isinstance(record.get(key), str):
                what = "missing" if key not in record else f"not a string ({type(record[key]).__name__})"
                raise UsageError(f"{flag} {path}:{number}: field {key!r} is {what}; records need string "
                                 "'prompt' and 'answer'")
        if not record["answer"]:
            raise UsageError(f"{flag} {path}:{number}: answer is empty: there is nothing to memorize")
        check_text_fields(record, f"{flag} {path}:{number}")
        unknown = set(record) - KNOWN_FIELDS
        if unknown:
            raise UsageError(f"{flag} {path}:{number}: unknown field(s) {sorted(unknown)}; allowed: "
                             f"{sorted(KNOWN_FIELDS)}")
    if not count:
        raise UsageError(f"{flag} {path} holds no records (expected one JSON object per line)")
    return file


def check_adapter_dir(path: str, flag: str = "--adapter") -> Path:
    """A PEFT adapter directory: adapter_config.json with a peft_type, and readable weights
    holding LoRA tensors. Checked before the model loads, and nothing is looked up on a hub."""
    folder = Path(path)
    if not folder.exists():
        raise UsageError(f"{flag} {path} does not exist")
    if not folder.is_dir():
        raise UsageError(f"{flag} {path} is not a directory (give the adapter directory, e.g. run/adapter)")
    config_file = folder / ADAPTER_CONFIG
    if not config_file.is_file():
        raise UsageError(f"{flag} {path} has no {ADAPTER_CONFIG}: not a PEFT adapter directory")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(f"{flag} {config_file} is not valid JSON ({err})") from None
    if not isinstance(config, dict) or "peft_type" not in config:
        raise UsageError(f"{flag} {config_file} is not a PEFT adapter config (no 'peft_type')")
    weights = [folder / name for name in ADAPTER_WEIGHTS if (folder / name).is_file()]
    if not weights:
        raise UsageError(f"{flag} {path} has no adapter weights ({' or '.join(ADAPTER_WEIGHTS)})")
    if weights[0].suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(weights[0]), framework="pt") as handle:
                keys = list(handle.keys())
                shapes = {key: list(handle.get_slice(key).get_shape()) for key in keys if ".lora_" in key}
        except Exception as err:  # safetensors raises its own SafetensorError (and OSError)
            raise UsageError(f"{flag} {weights[0]} is not a readable safetensors file "
                             f"({' '.join(str(err).split())})") from None
        if not any("lora_" in key for key in keys):
            raise UsageError(f"{flag} {weights[0]} holds no LoRA tensors ({len(keys)} tensors, none named lora_*)")
        check_adapter_ranks(config, shapes, f"{flag} {path}")
    return folder


def check_adapter_ranks(config: dict, shapes: dict[str, list[int]], label: str) -> None:
    """Each LoRA pair's rank in the weights (lora_A: [r, in], lora_B: [out, r]) is the `r` of
    adapter_config.json (or its `rank_pattern` entry): PEFT would otherwise fail mid-load with
    a size-mismatch traceback, after the model has loaded."""
    import re

    rank, pattern = config.get("r", 8), config.get("rank_pattern") or {}
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1 or not isinstance(pattern, dict):
        raise UsageError(f"{label}: {ADAPTER_CONFIG} has r = {rank!r}, not an integer >= 1")
    for key, shape in sorted(shapes.items()):
        module, _, part = key.partition(".lora_")
        if not part.startswith(("A.", "B.")) or len(shape) != 2:
            continue
        found = shape[0] if part.startswith("A.") else shape[1]
        name = module.removeprefix("base_model.model.")
        want = next((r for p, r in pattern.items() if re.fullmatch(rf"(.*\.)?{p}", name)), rank)
        if found != want:
            raise UsageError(f"{label}: {ADAPTER_CONFIG} says r = {want} but {key} has shape {shape} (rank "
                             f"{found}): the config and the weights come from different adapters")


def check_device(text: str | None, flag: str = "--device") -> str:
    """'cpu', 'cuda' or 'cuda:N' that this machine has; None: cuda when available, else cpu."""
    import torch

    if text is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise UsageError(f"{flag} {text!r} is not a device (cpu, cuda or cuda:N)") from None
    if device.type == "cpu":
        return "cpu"
    if device.type != "cuda":
        raise UsageError(f"{flag} {text}: only cpu and cuda are supported")
    if not torch.cuda.is_available():
        raise UsageError(f"{flag} {text}: no CUDA device is visible to torch on this machine (use --device cpu)")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"{flag} {text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return str(device)


def check_sqlite_file(path: str, flag: str = "--db", must_exist: bool = True) -> Path | None:
    """An existing SQLite database (by its header; an empty file is one too). Returns None when
    it does not exist and `must_exist` is False."""
    file = Path(path)
    if not file.exists():
        if must_exist:
            raise UsageError(f"{flag} {path} does not exist")
        return None
    if file.is_dir():
        raise UsageError(f"{flag} {path} is a directory, not an SQLite database")
    with file.open("rb") as handle:
        header = handle.read(len(SQLITE_HEADER))
    if header and header != SQLITE_HEADER:
        raise UsageError(f"{flag} {path} is not an SQLite database")
    return file


def check_out_dir(path: str, flag: str = "--out") -> Path:
    """An output directory that exists or can be created (nothing is created here)."""
    import os

    folder = Path(path)
    if folder.exists():
        if not folder.is_dir():
            raise UsageError(f"{flag} {path} is a file, not a directory")
        if not os.access(folder, os.W_OK):
            raise UsageError(f"{flag} {path} is not writable")
        return folder
    check_nearest_parent(folder, flag)
    return folder


def check_model(name: str, flag: str = "--model") -> str:
    """'smollm2' (embedded) or a local checkpoint directory with a config.json: nothing is
    ever downloaded, so anything else is refused before a load is attempted."""
    from fastmem.models import SMOLLM2

    if name == SMOLLM2:
        return name
    folder = Path(name)
    if not folder.is_dir():
        raise UsageError(f"{flag} {name!r} is neither 'smollm2' nor a local checkpoint directory "
                         "(nothing is downloaded)")
    if not (folder / "config.json").is_file():
        raise UsageError(f"{flag} {name} has no config.json: not a Hugging Face checkpoint directory")
    return name


def model_dimensions(name: str, flag: str = "--model") -> tuple[int, int | None]:
    """`(width, context)` of a model from its metadata alone (no weights are read): the hidden
    size, the highest rank a LoRA update can have, and the context in tokens (None: not stated)."""
    from fastmem.models import SMOLLM2, smollm2_gguf_path

    if name == SMOLLM2:
        from gguf import GGUFReader

        reader = GGUFReader(str(smollm2_gguf_path()))
        arch_field = reader.fields["general.architecture"]
        arch = bytes(arch_field.parts[arch_field.data[0]]).decode()

        def number(key):
            found = reader.fields.get(f"{arch}.{key}")
            return None if found is None else int(found.parts[found.data[0]][0])

        return number("embedding_length"), number("context_length")
    config_file = Path(check_model(name, flag)) / "config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(f"{flag} {config_file} is not valid JSON ({err})") from None
    config = config.get("text_config", config) if isinstance(config, dict) else {}
    width = next((config[k] for k in ("hidden_size", "n_embd", "d_model") if isinstance(config.get(k), int)), None)
    if width is None:
        raise UsageError(f"{flag} {name}: config.json names no hidden size")
    context = next((config[k] for k in ("max_position_embeddings", "n_positions", "max_seq_len")
                    if isinstance(config.get(k), int)), None)
    return width, context


# A chat template's prompt (system turn included) is far shorter than this; within it of the
# context the stress prompt is measured with the tokenizer.
PROMPT_MARGIN = 1024


@functools.lru_cache(maxsize=4)
def stress_prompt_tokens(model: str) -> int:
    """Tokens of the stress test's templated prompt on `model` (loads its tokenizer only)."""
    from fastmem.data.chat import template_prompt_ids
    from fastmem.data.stress import DEFAULT_PROMPT
    from fastmem.models import load_tokenizer

    return len(template_prompt_ids(load_tokenizer(model), DEFAULT_PROMPT)[0])


def check_sweep_fits_model(spec, cells) -> None:
    """Every cell of a sweep is trainable on `spec.model`, before the database is created and
    before a model loads: ranks within the model's width, stress answers within its context,
    and each cell's trainer settings valid."""
    from fastmem.sweep.worker import cell_config

    width, context = model_dimensions(spec.model)
    if spec.context is not None and (context is None or spec.context > context):
        context = spec.context  # --context: RoPE-scaled past the model's own positions
    too_wide = sorted({cell.rank for cell in cells if cell.rank > width})
    if too_wide:
        raise UsageError(f"sweep ranks {too_wide} exceed the width {width} (hidden size) of {spec.model}: "
                         "a LoRA update cannot have a higher rank")
    stress = sorted({cell.length for cell in cells if cell.data == "stress"})
    if context is not None and stress and stress[-1] >= context:  # no room even for a one-token prompt
        raise UsageError(f"sweep lengths {[n for n in stress if n >= context]} do not fit the context of "
                         f"{spec.model}: prompt + answer must be <= {context} tokens")
    if context is not None and stress and stress[-1] > context - PROMPT_MARGIN:
        prompt = stress_prompt_tokens(spec.model)
        too_long = [length for length in stress if prompt + length > context]
        if too_long:
            raise UsageError(f"sweep lengths {too_long} do not fit the context of {spec.model}: {prompt} prompt "
                             f"tokens + the answer must be <= {context} tokens (at most "
                             f"{context - prompt} answer tokens; --context N trains past it)")
    for cell in cells:
        try:
            cell_config(cell, spec).validate()
        except ValueError as err:
            raise UsageError(f"sweep cell {cell.key}: {err}") from None
