"""A run directory belongs to the user: never overwritten, truncated or mixed into by accident.

`fastmem train --out DIR` goes through three steps here:

    inspect(DIR, ...)      before the model loads: refuse a file, unrelated files, a finished run
                           (without --overwrite), or an unfinished run whose settings differ
    plan.check_data(fp)    once the data is tokenized: refuse to resume a run trained on other
                           samples (fingerprint = hash of the tokenized samples)
    plan.prepare()         the directory to train into: DIR itself (new or resumed run), or a
                           staging directory beside it when --overwrite replaces a run; the
                           old run is swapped out only when the new one has finished
                           (plan.finish), so an interrupted replacement loses nothing

Every refusal happens before anything is read, written or truncated. DIR/run.json (the
manifest) records the settings that a resume must match and the data fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from fastmem.errors import UsageError
from fastmem.cli_checks import check_nearest_parent
from fastmem.train.checkpoint import clean_stale_temps, latest_checkpoint
from fastmem.train.config import RESUME_MUST_MATCH, TrainConfig, saved_setting

MANIFEST = "run.json"
SUMMARY = "summary.json"
CHECKPOINTS = "checkpoints"
# what a run writes into its directory; anything else there is the user's
RUN_FILES = {MANIFEST, SUMMARY, "metrics.jsonl", "adapter", CHECKPOINTS, "eval", "training_curves.png"}


def data_fingerprint(samples) -> str:
    """sha256 of the tokenized samples (prompt and answer ids, in order): the same text under
    another tokenizer, or a reordered file, is other data."""
    digest = hashlib.sha256()
    for sample in samples:
        digest.update(json.dumps([list(sample.prompt_ids), list(sample.answer_ids)]).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def run_settings(config: TrainConfig) -> dict:
    values = config.to_dict()
    return {key: values[key] for key in RESUME_MUST_MATCH}


def _differences(saved: dict, wanted: dict) -> list[str]:
    return [f"{key} {saved_setting(saved, key)!r} there, {wanted[key]!r} here"
            for key in wanted if saved_setting(saved, key) != wanted[key]]


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def is_finished(directory: Path) -> bool:
    summary = _read_json(directory / SUMMARY)
    return summary is not None and not summary.get("halted") and not summary.get("interrupted")


def _write_manifest(directory: Path, settings: dict, data: dict) -> None:
    from fastmem import __version__

    manifest = {"fastmem": __version__, "settings": settings, "data": data,
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    tmp = directory / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, directory / MANIFEST)


def _samples(count) -> str:
    return f"{count} sample" + ("" if count == 1 else "s")


@dataclass
class RunPlan:
    """What `fastmem train` will do with --out: "new", "resume" or "replace"."""

    out: Path
    action: str
    settings: dict
    manifest: dict | None = None  # the run already in `out` (resume)
    created: list[Path] = field(default_factory=list)  # directories this plan made
    train_dir: Path | None = None
    data: dict | None = None

    @property
    def staging(self) -> Path:
        return self.out.with_name(f".{self.out.name}.fastmem-new")

    def check_data(self, fingerprint: str, num_samples: int, data_path: str | None = None) -> None:
        """Refuse to resume a run trained on other samples (before anything is touched)."""
        self.data = {"fingerprint": fingerprint, "samples": num_samples,
                     "path": str(Path(data_path).resolve()) if data_path else None}
        if self.action != "resume":
            return
        saved = (self.manifest or {}).get("data", {})
        if saved.get("fingerprint") != fingerprint:
            raise UsageError(
                f"--out {self.out} holds a run trained on other data ({_samples(saved.get('samples'))} from "
                f"{saved.get('path')}, fingerprint {str(saved.get('fingerprint'))[:12]}; here "
                f"{_samples(num_samples)} from {data_path}, {fingerprint[:12]}): use another --out, "
                "or --overwrite to replace it")

    def prepare(self) -> Path:
        """Create (or reuse) the directory to train into and write its manifest."""
        if self.action == "resume":
            clean_stale_temps(self.out)
            self.train_dir = self.out
            return self.out
        target = self.staging if self.action == "replace" else self.out
        if self.action == "replace" and target.exists():
            # a replacement interrupted earlier: resume it when it is this very run
            manifest = _read_json(target / MANIFEST) or {}
            same = (manifest.get("settings") == self.settings
                    and manifest.get("data", {}).get("fingerprint") == (self.data or {}).get("fingerprint"))
            if same and not is_finished(target):
                clean_stale_temps(target)
                self.train_dir = target
                return target
            shutil.rmtree(target)
        if not target.exists():
            missing = []
            for parent in [target, *target.parents]:
                if parent.exists():
                    break
                missing.append(parent)
            target.mkdir(parents=True)
            self.created = missing
        _write_manifest(target, self.settings, self.data or {})
        self.train_dir = target
        return target

    def finish(self) -> None:
        """After a finished run: swap a replacement into place (two renames; the old run is
        deleted only once the new one is where the user asked for it)."""
        if self.action != "replace" or self.train_dir != self.staging:
            return
        old = self.out.with_name(f".{self.out.name}.fastmem-old-{os.getpid()}")
        os.replace(self.out, old)
        os.replace(self.staging, self.out)
        shutil.rmtree(old, ignore_errors=True)

    def abandon(self) -> None:
        """A refusal raised while setting up the run: leave nothing behind — but never remove
        a directory in which training made progress (metrics or a checkpoint)."""
        target = self.train_dir
        if target is None or not target.is_dir() or self.action == "resume":
            return
        metrics = target / "metrics.jsonl"
        if (target / CHECKPOINTS).exists() or (metrics.is_file() and metrics.stat().st_size > 0):
            return
        if target == self.staging or self.created:
            shutil.rmtree(target, ignore_errors=True)
            for parent in self.created[1:]:  # parents this plan made, innermost first
                try:
                    parent.rmdir()
                except OSError:
                    break
        else:  # an empty directory the user made: empty again
            for entry in target.iterdir():
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def _listing(directory: Path, limit: int = 4) -> str:
    names = sorted(entry.name for entry in directory.iterdir())
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def inspect(out: str | os.PathLike, config: TrainConfig, *, overwrite: bool = False,
            resume: bool = True, inputs: dict[str, str] | None = None) -> RunPlan:
    """Decide what to do with --out before the model loads; UsageError (one line) to refuse.
    `inputs`: {flag: path} of files the run reads, which --overwrite must not delete."""
    out = Path(out)
    settings = run_settings(config)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a directory")
    check_nearest_parent(out, "--out")  # also where --overwrite stages its replacement
    if not out.exists() or not any(out.iterdir()):
        return RunPlan(out, "new", settings)
    if overwrite:
        for flag, path in (inputs or {}).items():
            if path and out.resolve() in Path(path).resolve().parents:
                raise UsageError(f"{flag} {path} lies inside --out {out}, which --overwrite would delete: "
                                 "move it out first")
        return RunPlan(out, "replace", settings)
    manifest = _read_json(out / MANIFEST)
    if is_finished(out):
        raise UsageError(f"--out {out} holds a finished run ({SUMMARY}, adapter/): use another --out, "
                         "or --overwrite to replace it")
    if manifest is None:
        ours = {entry.name for entry in out.iterdir()} <= RUN_FILES
        what = "an unfinished run of an older fastmem (no run.json)" if ours else f"other files ({_listing(out)})"
        raise UsageError(f"--out {out} is not empty: it holds {what}; use another --out, "
                         "or --overwrite to replace its contents")
    checkpoint = latest_checkpoint(out / CHECKPOINTS)
    where = f"checkpoint {checkpoint.name}" if checkpoint else "no checkpoint"
    if not resume:
        raise UsageError(f"--out {out} holds an unfinished run ({where}): drop --no-resume to resume it, "
                         "or pass --overwrite to start over")
    changed = _differences(manifest.get("settings", {}), settings)
    if changed:
        raise UsageError(f"--out {out} holds a run with other settings ({'; '.join(changed)}): "
                         "use another --out, or --overwrite to replace it")
    return RunPlan(out, "resume", settings, manifest=manifest)
