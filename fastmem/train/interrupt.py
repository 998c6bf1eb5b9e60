"""Ctrl-C during training: finish the current step, checkpoint, stop — a second Ctrl-C quits now.

A KeyboardInterrupt raised in the middle of an optimizer step (or a checkpoint write) would
leave state that cannot be saved consistently, so the first SIGINT only sets a flag that the
loop reads between steps.
"""

from __future__ import annotations

import signal
import sys
import threading


_ACTIVE: list["StopRequest"] = []


def stop_requested() -> bool:
    """True once Ctrl-C was pressed under an active StopRequest (the training loop polls it)."""
    return any(request.requested for request in _ACTIVE)


class StopRequest:
    """Context manager; `requested` turns True at the first SIGINT while it is active.
    `fastmem train` wraps the run in one; a script can too: `with StopRequest(): train(...)`.

    Inactive (plain KeyboardInterrupt) outside the main thread, or when `enabled` is False
    (under torchrun, where every rank would have to stop at the same step).
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame):
        if self.requested:  # the second Ctrl-C: stop now, whatever the state
            raise KeyboardInterrupt
        self.requested = True
        print("\nfastmem: stopping after this step (Ctrl-C again to quit at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> "StopRequest":
        if self.enabled:
            self._previous = signal.signal(signal.SIGINT, self._handle)
            _ACTIVE.append(self)
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            signal.signal(signal.SIGINT, self._previous)
            _ACTIVE.remove(self)
