"""Stopping a run cleanly: SIGTERM / SIGINT set a flag; the loop checkpoints and exits at the next step boundary."""
from __future__ import annotations

import signal


class StopRequested:
    """SIGTERM/SIGINT set a flag; the loop checkpoints and exits at the next step boundary."""

    def __init__(self):
        self.signal = None

    def __enter__(self):
        self._old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        for s in self._old:
            signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
