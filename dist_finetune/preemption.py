"""Preemption and Ctrl-C: SIGUSR1 / SIGTERM / SIGINT set a flag; the ranks agree on it at an
optimizer-step boundary, save a checkpoint together and exit.

The handler only sets a flag, so a second SIGUSR1 or SIGTERM while the checkpoint is being written
changes nothing: the save finishes, then the ranks exit together. A second Ctrl-C is the user saying
"now": the process exits at once with 130 (the last complete checkpoint stays; resume=auto continues).
"""
from __future__ import annotations

import os
import signal
import sys
from types import FrameType


SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


class PreemptionFlag:
    def __init__(self) -> None:
        self.received: int | None = None

    def install(self) -> "PreemptionFlag":
        for sig in SIGNALS:
            signal.signal(sig, self._handle)
        return self

    def ignore_from_now(self) -> None:
        """The run is over: later signals must not kill the process while it exits (the interpreter
        resets Python-level handlers to the default action during shutdown)."""
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_IGN)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            os.write(sys.stderr.fileno(), b"interrupted again: exiting now (no checkpoint)\n")
            os._exit(130)
        if signum == signal.SIGINT:
            os.write(sys.stderr.fileno(), b"interrupted: saving a checkpoint at the next step "
                                          b"(Ctrl-C again to exit at once)\n")
        if self.received is None or signum == signal.SIGINT:
            self.received = signum

    def flag(self) -> float:
        """1.0 when this rank got a signal; the trainer sums it over the ranks at its sync points, so
        every rank agrees at the same step."""
        return 1.0 if self.received is not None else 0.0
