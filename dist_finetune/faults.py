"""Fault injection for tests and failure drills, driven by one environment variable.

    DIST_FINETUNE_FAULTS="nan_loss@step=5;exit@step=3,rank=1;sleep@step=3,rank=1,seconds=60;signal@step=4,name=INT"

`nan_loss` makes the training loss non-finite on that micro-batch, `nan_grad` keeps the loss finite
but makes its gradients non-finite, `nan_param` makes a parameter non-finite right after that step's
update (an update that overflowed), `exit` ends the process at once
(as a crashed or preempted-without-warning rank would), `sleep` stalls it (a hung peer), `signal` sends
the process SIG<name> (USR1 by default: a preemption notice; INT: Ctrl-C) at that exact step. `step` is
the optimizer step about to be taken (global_step + 1); `rank` defaults to every rank. Each fault
fires once per process.
Unset (always, in real runs): every check is a dictionary lookup that finds nothing.
"""
from __future__ import annotations

import os
import signal
import time

import torch
from dataclasses import dataclass

ENV = "DIST_FINETUNE_FAULTS"


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int
    rank: int | None
    seconds: float = 0.0
    name: str = "USR1"


def parse(text: str) -> list[Fault]:
    faults = []
    for item in filter(None, (part.strip() for part in text.split(";"))):
        kind, _, args = item.partition("@")
        values = dict(kv.split("=", 1) for kv in args.split(",") if kv)
        if kind not in ("nan_loss", "nan_grad", "nan_param", "exit", "sleep", "signal") or "step" not in values:
            raise ValueError(f"{ENV}: cannot read {item!r} (expected kind@step=N[,rank=R][,seconds=S][,name=USR1])")
        rank = int(values["rank"]) if "rank" in values else None
        faults.append(Fault(kind, int(values["step"]), rank, float(values.get("seconds", 0)),
                            values.get("name", "USR1")))
    return faults


_FAULTS = parse(os.environ.get(ENV, ""))


def _due(kind: str, step: int, rank: int) -> Fault | None:
    """The matching fault, fired once per process."""
    for fault in _FAULTS:
        if fault.kind == kind and fault.step == step and fault.rank in (None, rank):
            _FAULTS.remove(fault)
            return fault
    return None


class _NanGradient(torch.autograd.Function):
    """Identity forward; a non-finite gradient backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad * float("nan")


def perturb_loss(loss: torch.Tensor, step: int, rank: int) -> torch.Tensor:
    """The loss as the faults due at this step leave it (unchanged when none is)."""
    if _due("nan_loss", step, rank) is not None:
        return loss * float("nan")
    if _due("nan_grad", step, rank) is not None:
        return _NanGradient.apply(loss)
    return loss


def poison_parameters(params: list[torch.Tensor], step: int, rank: int) -> None:
    if params and _due("nan_param", step, rank) is not None:
        with torch.no_grad():
            params[0].view(-1)[0] = float("nan")


def crash_or_stall(step: int, rank: int) -> None:
    if _due("exit", step, rank) is not None:
        os._exit(17)
    fault = _due("sleep", step, rank)
    if fault is not None:
        time.sleep(fault.seconds)
    fault = _due("signal", step, rank)
    if fault is not None:
        os.kill(os.getpid(), getattr(signal, f"SIG{fault.name}"))
