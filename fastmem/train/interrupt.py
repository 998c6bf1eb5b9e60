"""Ctrl-C or SIGTERM during training: finish the current step, checkpoint, stop — a second
signal quits at once.

A KeyboardInterrupt raised in the middle of an optimizer step (or a checkpoint write) would
leave state that cannot be saved consistently, so the first SIGINT (Ctrl-C) or SIGTERM (what
`kill`, `timeout` and job schedulers send) only sets a flag that the loop reads between steps.
"""

from __future__ import annotations

import signal
import sys
import threading

HANDLED = (signal.SIGINT, signal.SIGTERM)

_ACTIVE: list["StopRequest"] = []


def stop_requested() -> int:
    """The signal number (SIGINT or SIGTERM) once one arrived under an active StopRequest,
    else 0 (the training loop polls it between steps)."""
    return next((request.signum for request in _ACTIVE if request.signum), 0)


def exit_code(signum: int) -> int:
    """The shell's code for a process ended by `signum`: 130 for SIGINT, 143 for SIGTERM."""
    return 128 + int(signum)


class StopRequest:
    """Context manager; `signum` turns to the signal's number at the first SIGINT or SIGTERM
    while it is active. `fastmem train` wraps the run in one; a script can too:
    `with StopRequest(): train(...)`.

    Inactive (plain KeyboardInterrupt, default SIGTERM) outside the main thread, or when
    `enabled` is False (under torchrun, where every rank would have to stop at the same step).
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.signum = 0
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return bool(self.signum)

    def _handle(self, signum, frame):
        if self.signum:  # the second signal: stop now, whatever the state
            raise KeyboardInterrupt
        self.signum = signum
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        print(f"\nfastmem: {name}: stopping after this step with a checkpoint (a second signal quits at once)",
              file=sys.stderr, flush=True)

    def __enter__(self) -> "StopRequest":
        if self.enabled:
            for signum in HANDLED:
                self._previous[signum] = signal.signal(signum, self._handle)
            _ACTIVE.append(self)
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            for signum, previous in self._previous.items():
                signal.signal(signum, previous)
            _ACTIVE.remove(self)
