"""A stop on purpose: Ctrl-C or SIGTERM asks a long loop to stop at its next safe point.

While a `StopRequest` is active, the first SIGINT or SIGTERM only sets a flag; the loop checks it
between steps, saves what it has and raises `Stopped`, which the command line prints as one line
(where it saved, how to continue) with exit status 130 (SIGINT) or 143 (SIGTERM). A second
signal raises KeyboardInterrupt at once. The handlers in place before are put back at the end.
"""

from __future__ import annotations

import os
import signal
import threading

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + the signal, as shells report it
_ACTIVE: list["StopRequest"] = []


class Stopped(Exception):
    """A command stopped on request after saving: what it kept (message) and the command that
    continues it (resume); str() joins them into the one line the command line prints."""

    def __init__(self, message: str, exit_code: int, resume: str | None = None):
        super().__init__(message)
        self.message, self.exit_code, self.resume = message, exit_code, resume

    def __str__(self) -> str:
        return f"{self.message}. Resume with: {self.resume}" if self.resume else self.message


class StopRequest:
    """Catch SIGINT/SIGTERM while active (main thread only; elsewhere it never fires).

    when: what the notice promises, e.g. "after this step".
    """

    def __init__(self, when: str):
        self.when = when
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for signum in EXIT_CODES:
                self._previous[signum] = signal.signal(signum, self._handle)
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc) -> bool:
        _ACTIVE.remove(self)
        for signum, handler in self._previous.items():
            # None: a handler installed outside Python, which cannot be put back; use the default.
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        self._previous = {}
        return False

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        # os.write, not print: a handler may run in the middle of another print to stderr.
        os.write(2, f"\nessence: {signal.Signals(signum).name} received: stopping {self.when} "
                    "(press Ctrl-C again to stop at once)\n".encode())

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signum, 130)


def stop_requested() -> bool:
    """Whether an active StopRequest has caught a signal (the ESSENCE_FAULT wait hook)."""
    return any(r.requested for r in _ACTIVE)
