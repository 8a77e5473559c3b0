"""Stopping a run cleanly: SIGTERM / SIGINT set a flag; the loop checkpoints and exits at the next step boundary."""
from __future__ import annotations

import signal


class Interrupted(KeyboardInterrupt):
    """A second stop signal: unwind at once (closing the loader on the way). A KeyboardInterrupt, so code that
    lets Ctrl-C through lets this through too; it carries the signal, so the command exits with 128 + signal."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = int(signum)


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
            raise Interrupted(signum)
        self.signal = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
