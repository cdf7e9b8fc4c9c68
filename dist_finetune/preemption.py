"""Preemption: SIGUSR1 / SIGTERM set a flag; the ranks agree on it at an optimizer-step boundary.

The handler only sets a flag, so a second signal while the checkpoint is being written changes
nothing: the save finishes, then the ranks exit together.
"""
from __future__ import annotations

import signal
from types import FrameType

from .distributed import DistEnv, all_reduce_sum

SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


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
        self.received = signum

    def agreed(self, env: DistEnv) -> bool:
        """True on every rank when any rank got a signal. Every rank calls it at the same step."""
        return all_reduce_sum([1.0 if self.received is not None else 0.0], env)[0].item() > 0
