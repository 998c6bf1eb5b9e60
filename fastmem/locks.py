"""One writer per run directory (or sweep database): a lock file holding the writer's pid.

The lock is an advisory `flock` on `<dir>/.fastmem.lock` (or `<db>.lock`), so the kernel
releases it when its process dies, however it dies: a lock file left by a killed process is
stale by construction and the next writer takes it over, with no pid guessing and no race
between two takers. The pid written into the file names the holder in the refusal.

Within one process the lock is re-entrant: `fastmem train` takes it before it writes into
`--out`, and the `train()` it calls takes the same lock again without blocking itself.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from fastmem.errors import UsageError

try:
    import fcntl
except ImportError:  # Windows: no flock; runs are not locked there
    fcntl = None

LOCK_NAME = ".fastmem.lock"

# path -> [fd, holds] for the locks this process holds
_HELD: dict[str, list[int]] = {}


def lock_path(target: str | os.PathLike) -> Path:
    """The lock file of a run directory (inside it) or of a file such as a database (beside it)."""
    target = Path(target)
    return target / LOCK_NAME if target.is_dir() else target.with_name(f"{target.name}.lock")


def holder(target: str | os.PathLike) -> int | None:
    """The pid of the live process that holds `target`'s lock, else None (free, stale, or ours)."""
    path = lock_path(target)
    if fcntl is None or not path.is_file() or str(path.resolve()) in _HELD:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read_pid(fd) or -1
    finally:
        os.close(fd)  # closing drops the probe's shared lock
    return None


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _in_use(what: str, target, pid: int | None) -> UsageError:
    who = f"process {pid}" if pid and pid > 0 else "another process"
    return UsageError(f"{what} {target} is in use by {who} (another fastmem writing to it; lock "
                      f"{lock_path(target).name}): wait for it to finish or stop it, or choose another {what}")


def check_free(target: str | os.PathLike, what: str = "--out") -> None:
    """UsageError naming the holder's pid when a live process holds `target`'s lock."""
    pid = holder(target)
    if pid is not None:
        raise _in_use(what, target, pid)


def acquire(target: str | os.PathLike, what: str = "--out") -> Path:
    """Take `target`'s lock (re-entrant in this process) or raise UsageError naming the holder.
    `target` must exist (a directory, or the file's parent). Pair with `release(target)`."""
    path = lock_path(target)
    key = str(path.resolve())
    if fcntl is None:
        return path
    if key in _HELD:
        _HELD[key][1] += 1
        return path
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            raise _in_use(what, target, pid) from None
        # The holder before us may have unlinked the file between our open and our lock: then we
        # hold a lock on a name nobody sees, and must lock the file that is there now.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n".encode(), 0)
    _HELD[key] = [fd, 1]
    return path


def release(target: str | os.PathLike) -> None:
    """Drop one hold of `target`'s lock; the last one removes the lock file and unlocks."""
    path = lock_path(target)
    held = _HELD.get(str(path.resolve()))
    if held is None:
        return
    held[1] -= 1
    if held[1] > 0:
        return
    del _HELD[str(path.resolve())]
    path.unlink(missing_ok=True)  # while still locked: a waiting taker re-checks the inode
    os.close(held[0])
