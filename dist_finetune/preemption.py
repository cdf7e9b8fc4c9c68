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
        self._previous = {}

    def install(self) -> "PreemptionFlag":
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum

    def agreed(self, env: DistEnv) -> bool:
        """True on every rank when any rank got a signal. Every rank calls it at the same step."""
        return all_reduce_sum([1.0 if self.received is not None else 0.0], env)[0].item() > 0
