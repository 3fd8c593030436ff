"""What a run does to its own process: torch's CPU threads, and Ctrl-C as a request to stop.

    cpu_threads(settings)       the CPU threads a run uses (``train.threads``; 1 for the tiny model)
    use_cpu_threads(settings)   set them in this process (0: leave torch's default)
    StopFlag                    Ctrl-C / SIGTERM sets a flag the loop reads between steps
    RunInterrupted              the loop stopped on it, after a checkpoint (exit code 130)
    command_signals()           around a whole command: SIGTERM as Ctrl-C, never a silent end
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class RunInterrupted(RuntimeError):
    """Ctrl-C: a checkpoint was saved (exit code 130)."""


class StopFlag:
    """Ctrl-C (SIGINT) or SIGTERM sets a flag the loop checks between steps; a second one, at
    least REPEAT_S seconds later, interrupts at once. Under a launcher a Ctrl-C reaches each
    process twice (from the terminal, and forwarded by the launcher) within that time: one
    request."""

    REPEAT_S = 3.0

    def __init__(self) -> None:
        self.set = False
        self._at = 0.0
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        self._old = _install(self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        now = time.monotonic()
        if self.set and now - self._at >= self.REPEAT_S:
            raise KeyboardInterrupt
        if not self.set:
            self.set, self._at = True, now

    def __exit__(self, *exc: Any) -> None:
        _restore(self._old)


def _install(handler: Any) -> dict[int, Any]:
    """``handler`` for Ctrl-C (SIGINT) and SIGTERM; the handlers it replaced. Off the main
    thread, where Python allows no handler, nothing changes (Ctrl-C stays a KeyboardInterrupt)."""
    old: dict[int, Any] = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            old[sig] = signal.signal(sig, handler)
        except ValueError:
            pass
    return old


def _restore(old: dict[int, Any]) -> None:
    for sig, handler in old.items():
        signal.signal(sig, handler)


@contextmanager
def command_signals() -> Iterator[None]:
    """Around a command that trains (``hpt-dsl run``): SIGTERM interrupts as Ctrl-C does, with
    ``KeyboardInterrupt``, where by default it would end the process without a word; and while
    an error is being handled (the run is stopping, its message not yet printed) both are
    noted and ignored. A launcher sends SIGTERM to every process once one of them has died;
    the others, stopping on the lost peer already, then still say why. ``StopFlag`` takes over
    inside the training loop and gives these handlers back when it ends."""

    def handle(signum: int, frame: Any) -> None:
        if sys.exc_info()[0] is None:  # nothing is stopping the run yet: stop it here
            raise KeyboardInterrupt

    old = _install(handle)
    try:
        yield
    finally:
        _restore(old)


def cpu_threads(settings: Any) -> int:
    """torch CPU threads for a run (``train.threads``; 0 = leave torch's default)."""
    if settings.train.threads is not None:
        return int(settings.train.threads)
    return 1 if settings.model.name == "tiny" else 0


def use_cpu_threads(settings: Any) -> None:
    """Set torch's CPU threads of this process to ``cpu_threads(settings)`` (none: unchanged)."""
    import torch

    if cpu_threads(settings):
        torch.set_num_threads(cpu_threads(settings))
