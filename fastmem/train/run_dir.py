"""A run directory belongs to the user: never overwritten, truncated or mixed into by accident.

`fastmem train --out DIR` goes through three steps here:

    inspect(DIR, ...)      before the model loads: refuse a file, unrelated files, a finished run
                           (without --overwrite), or an unfinished run whose settings differ
    plan.check_data(fp)    once the data is tokenized: refuse to resume a run trained on other
                           samples (fingerprint = hash of the tokenized samples)
    plan.prepare()         the directory to train into, locked (one trainer per directory: a
                           second one is refused naming the first one's pid): DIR itself (a new,
                           resumed or continued run), or a staging directory beside it when
                           --overwrite replaces a run; the old run is swapped out only when the
                           new one has finished (plan.finish), so an interrupted replacement
                           loses nothing

Every refusal happens before anything is read, written or truncated. DIR/run.json (the
manifest) records the settings that a resume must match and the data fingerprint.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from fastmem.errors import UsageError
from fastmem.files import check_nearest_parent, read_json, write_json_atomic
from fastmem import locks
from fastmem.locks import LOCK_NAME
from fastmem.train.checkpoint import clean_stale_temps, data_fingerprint, latest_checkpoint  # noqa: F401
from fastmem.train.config import BUDGET_SETTINGS, RESUME_MUST_MATCH, TrainConfig, saved_setting

MANIFEST = "run.json"
SUMMARY = "summary.json"
CHECKPOINTS = "checkpoints"
# what a run writes into its directory; anything else there is the user's
RUN_FILES = {MANIFEST, SUMMARY, "metrics.jsonl", "adapter", CHECKPOINTS, "eval", "training_curves.png", LOCK_NAME}


def run_settings(config: TrainConfig) -> dict:
    values = config.to_dict()
    return {key: values[key] for key in RESUME_MUST_MATCH}


def _differences(saved: dict, wanted: dict, ignore=()) -> list[str]:
    return [f"{key} {saved_setting(saved, key)!r} there, {wanted[key]!r} here"
            for key in wanted if key not in ignore and saved_setting(saved, key) != wanted[key]]


def _continues(out: Path, manifest: dict, settings: dict) -> bool:
    """A run that used its whole step budget, asked again with the same settings but a larger
    budget: a --max-steps above the steps it trained (or, planned by epochs both times, more
    epochs). The data must match too (RunPlan.check_data)."""
    summary = _read_json(out / SUMMARY) or {}
    steps = summary.get("steps")
    if summary.get("stopped_on_recall") is not False or steps != summary.get("total_steps") or \
            not isinstance(steps, int) or latest_checkpoint(out / CHECKPOINTS) is None:
        return False
    saved = manifest.get("settings", {})
    if _differences(saved, settings, ignore=BUDGET_SETTINGS):
        return False
    if settings["max_steps"] is not None:
        return settings["max_steps"] > steps
    return saved.get("max_steps") is None and settings["epochs"] > saved.get("epochs", settings["epochs"])


def _read_json(path: Path) -> dict | None:
    value = read_json(path)
    return value if isinstance(value, dict) else None


def is_finished(directory: Path) -> bool:
    summary = _read_json(directory / SUMMARY)
    return summary is not None and not summary.get("halted") and not summary.get("interrupted")


def _write_manifest(directory: Path, settings: dict, data: dict, model: dict | None) -> None:
    from fastmem import __version__

    manifest = {"fastmem": __version__, "settings": settings, "data": data, "model": model,
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_json_atomic(directory / MANIFEST, manifest)


def _samples(count) -> str:
    return f"{count} sample" + ("" if count == 1 else "s")


@dataclass
class RunPlan:
    """What `fastmem train` will do with --out: "new", "resume", "continue" (a run that used its
    whole budget, given a larger one) or "replace". `prepare` takes the directory's lock (one
    trainer per run directory); `finish` and `abandon` drop it."""

    out: Path
    action: str
    settings: dict
    manifest: dict | None = None  # the run already in `out` (resume)
    created: list[Path] = field(default_factory=list)  # directories this plan made
    train_dir: Path | None = None
    data: dict | None = None
    model: dict | None = None  # fastmem.rope_scaling.context_record of the loaded model
    locked: bool = False

    @property
    def staging(self) -> Path:
        return self.out.with_name(f".{self.out.name}.fastmem-new")

    def check_data(self, fingerprint: str, num_samples: int, data_path: str | None = None) -> None:
        """Refuse to resume a run trained on other samples (before anything is touched)."""
        self.data = {"fingerprint": fingerprint, "samples": num_samples,
                     "path": str(Path(data_path).resolve()) if data_path else None}
        if self.action not in ("resume", "continue"):
            return
        saved = (self.manifest or {}).get("data", {})
        if saved.get("fingerprint") != fingerprint:
            raise UsageError(
                f"--out {self.out} holds a run trained on other data ({_samples(saved.get('samples'))} from "
                f"{saved.get('path')}, fingerprint {str(saved.get('fingerprint'))[:12]}; here "
                f"{_samples(num_samples)} from {data_path}, {fingerprint[:12]}): use another --out, "
                "or --overwrite to replace it")

    def prepare(self) -> Path:
        """Create (or reuse) the directory to train into, take its lock (UsageError naming the
        holder's pid when another trainer has it) and write its manifest."""
        target = self.staging if self.action == "replace" else self.out
        self.created = _make_dirs(target)
        self.train_dir = target
        locks.acquire(target, "--out")
        self.locked = True
        if self.action in ("resume", "continue"):
            clean_stale_temps(target)
            if (self.manifest or {}).get("settings") != self.settings:  # a new budget is the run's from now on
                _write_manifest(target, self.settings, self.data or {}, self.model)
            return target
        if self.action == "replace" and not self.created:
            # a replacement interrupted earlier: resume it when it is this very run
            manifest = _read_json(target / MANIFEST) or {}
            same = (manifest.get("settings") == self.settings
                    and manifest.get("data", {}).get("fingerprint") == (self.data or {}).get("fingerprint"))
            if same and not is_finished(target):
                clean_stale_temps(target)
                return target
            _empty(target)
        _write_manifest(target, self.settings, self.data or {}, self.model)
        return target

    def release(self) -> None:
        """Drop the directory's lock (idempotent)."""
        if self.locked:
            locks.release(self.train_dir)
            self.locked = False

    def finish(self) -> None:
        """After a finished run: drop the lock and swap a replacement into place (two renames;
        the old run is deleted only once the new one is where the user asked for it)."""
        self.release()
        if self.action != "replace" or self.train_dir != self.staging:
            return
        old = self.out.with_name(f".{self.out.name}.fastmem-old-{os.getpid()}")
        os.replace(self.out, old)
        os.replace(self.staging, self.out)
        shutil.rmtree(old, ignore_errors=True)

    def abandon(self) -> None:
        """A refusal raised while setting up the run: leave nothing behind — but never remove
        a directory in which training made progress (metrics or a checkpoint), nor one another
        trainer holds."""
        if not self.locked:  # the lock was refused: the directory is the other trainer's
            if self.created:
                _remove_created(self.created)
            return
        self.release()
        target = self.train_dir
        if target is None or not target.is_dir() or self.action in ("resume", "continue"):
            return
        metrics = target / "metrics.jsonl"
        if (target / CHECKPOINTS).exists() or (metrics.is_file() and metrics.stat().st_size > 0):
            return
        if target == self.staging or self.created:
            shutil.rmtree(target, ignore_errors=True)
            _remove_created(self.created[1:])
        else:  # an empty directory the user made: empty again
            _empty(target)


def _make_dirs(target: Path) -> list[Path]:
    """Create `target` and its missing parents; the ones this call made, innermost first
    (none when `target` was there, or another process made it first)."""
    missing = []
    for parent in [target, *target.parents]:
        if parent.exists():
            break
        missing.append(parent)
    for folder in reversed(missing):
        try:
            folder.mkdir()
        except FileExistsError:  # made by a process racing this one: not ours to remove
            missing.remove(folder)
    return missing


def _remove_created(created: list[Path]) -> None:
    """Remove directories a plan made (innermost first), stopping at one that is not empty."""
    for folder in created:
        try:
            folder.rmdir()
        except OSError:
            break


def _empty(folder: Path) -> None:
    """Remove everything in `folder` but its lock file."""
    for entry in folder.iterdir():
        if entry.name != LOCK_NAME:
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
    for folder in (out, RunPlan(out, "new", settings).staging):  # another trainer there: refused now
        if folder.is_dir():
            locks.check_free(folder, "--out")
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
        if resume and manifest is not None and _continues(out, manifest, settings):
            return RunPlan(out, "continue", settings, manifest=manifest)
        raise UsageError(f"--out {out} holds a finished run ({SUMMARY}, adapter/): use another --out, "
                         "or --overwrite to replace it (a run that used its whole step budget is continued "
                         "by a larger --max-steps)")
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
    changed = _differences(manifest.get("settings", {}), settings, ignore=BUDGET_SETTINGS)
    if changed:
        raise UsageError(f"--out {out} holds a run with other settings ({'; '.join(changed)}): "
                         "use another --out, or --overwrite to replace it")
    return RunPlan(out, "resume", settings, manifest=manifest)
