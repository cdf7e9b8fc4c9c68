"""Fault injection for tests and failure drills, driven by one environment variable.

    DIST_FINETUNE_FAULTS="nan_loss@step=5;exit@step=3,rank=1;sleep@step=3,rank=1,seconds=60"

`nan_loss` makes the training loss non-finite on that micro-batch, `exit` ends the process at once
(as a crashed or preempted-without-warning rank would), `sleep` stalls it (a hung peer). `step` is
the optimizer step about to be taken (global_step + 1); `rank` defaults to every rank. Each fault
fires once per process.
Unset (always, in real runs): every check is a dictionary lookup that finds nothing.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

ENV = "DIST_FINETUNE_FAULTS"


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int
    rank: int | None
    seconds: float = 0.0


def parse(text: str) -> list[Fault]:
    faults = []
    for item in filter(None, (part.strip() for part in text.split(";"))):
        kind, _, args = item.partition("@")
        values = dict(kv.split("=", 1) for kv in args.split(",") if kv)
        if kind not in ("nan_loss", "exit", "sleep") or "step" not in values:
            raise ValueError(f"{ENV}: cannot read {item!r} (expected kind@step=N[,rank=R][,seconds=S])")
        rank = int(values["rank"]) if "rank" in values else None
        faults.append(Fault(kind, int(values["step"]), rank, float(values.get("seconds", 0))))
    return faults


_FAULTS = parse(os.environ.get(ENV, ""))


def _due(kind: str, step: int, rank: int) -> Fault | None:
    """The matching fault, fired once per process."""
    for fault in _FAULTS:
        if fault.kind == kind and fault.step == step and fault.rank in (None, rank):
            _FAULTS.remove(fault)
            return fault
    return None


def nan_loss(step: int, rank: int) -> bool:
    return _due("nan_loss", step, rank) is not None


def crash_or_stall(step: int, rank: int) -> None:
    if _due("exit", step, rank) is not None:
        os._exit(17)
    fault = _due("sleep", step, rank)
    if fault is not None:
        time.sleep(fault.seconds)
