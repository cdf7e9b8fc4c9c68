"""Loading `.pt` files without running code: `torch.load(weights_only=True)` with a small allow-list.

A pickle can name any callable (`os.system`, `open`, ...) and unpickling calls it. Every torch file this
project reads, its own and the ones DeepSpeed reads for it, goes through `torch_load`: tensors, plain
Python data, and only the DeepSpeed classes that real ZeRO 0-3 checkpoints (fp32, bf16) hold.

- `torch_load` - one file; a refused or unreadable file raises `UnsafeFileError` (one line, the path).
- `screen` - every `.pt` file of a checkpoint folder checked statically (the pickle's opcodes, no tensor
  data) before any rank loads anything: each rank reads only its own shards, so without a screen a
  tampered shard of rank 3 would stop rank 3 alone while the others wait in a collective.
- `install(engine)` - DeepSpeed's checkpoint engine loads through `torch_load`.
- `zero_to_fp32_weights_only()` - DeepSpeed's zero_to_fp32 (consolidating ZeRO shards) loads through it.
"""
from __future__ import annotations

import pickle
import pickletools
import re
import warnings
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from .errors import UserError

CHECKPOINT_FIX = ("it was not written by dist_finetune or was altered after; restore the checkpoint from a "
                  "trusted copy or use another one")


class UnsafeFileError(UserError, ValueError):
    """A file that is not tensors + plain data (or cannot be read at all); the message names it."""


def deepspeed_globals() -> list[Any]:
    """What DeepSpeed's ZeRO optimizer states pickle besides tensors and plain data (seen in real ZeRO 1-3
    checkpoints, fp32 and bf16); DynamicLossScaler is fp16's loss scaler (CUDA only)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _pickle_globals(path: Path) -> list[str]:
    """Best effort, for the message only: the callables a plain (not zip) pickle names."""
    names: list[str] = []
    strings: list[str] = []
    try:
        with open(path, "rb") as f:
            for op, arg, _ in pickletools.genops(f):
                if op.name == "GLOBAL":
                    names.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    names.append(".".join(strings[-2:]))
                elif isinstance(arg, str):
                    strings.append(arg)
    except Exception:  # noqa: BLE001 - not a pickle at all: the caller says so
        pass
    return names


def _why(exc: BaseException, path: Path) -> str:
    text = str(exc)
    named = re.findall(r"GLOBAL ([\w.]+)", text)
    if not named and isinstance(exc, pickle.UnpicklingError) and not zipfile.is_zipfile(path):
        named = _pickle_globals(path)
    if named:
        names = ", ".join(dict.fromkeys(named))
        return f"a reference to {names}: not tensors or plain data, loading it could run code"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    detail = next((line for line in lines if line.startswith("Unsupported")), lines[0] if lines else "")
    return f"{type(exc).__name__}: {detail[:200]}"


def torch_load(path: Path, map_location: Any = "cpu", allowed: list[Any] | None = None, mmap: bool = False,
               fix: str = CHECKPOINT_FIX) -> Any:
    """torch.load(weights_only=True), trusting `allowed` classes too; anything else -> UnsafeFileError."""
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals(allowed or []):
            warnings.simplefilter("ignore")  # torch warns about pickle protocols before it refuses
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as exc:  # noqa: BLE001 - a damaged file fails in many ways; the user gets one line
        raise UnsafeFileError(f"{path}: refused to load it ({_why(exc, Path(path))}); {fix}") from None


def _check(path: Path, allowed: list[Any]) -> None:
    if not zipfile.is_zipfile(path):  # the legacy format: no static check, load it for real (still safe)
        torch_load(path, allowed=allowed)
        return
    try:
        with torch.serialization.safe_globals(allowed):
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as exc:  # noqa: BLE001
        raise UnsafeFileError(f"{path}: refused to load it ({_why(exc, Path(path))}); {CHECKPOINT_FIX}") from None
    if unsafe:
        raise UnsafeFileError(f"{path}: refused to load it (a reference to {', '.join(unsafe)}: not tensors or "
                              f"plain data, loading it could run code); {CHECKPOINT_FIX}")


def screen(folder: Path) -> None:
    """Every `.pt` file in a checkpoint folder, checked without loading its tensors; every rank calls
    this on the same files, so every rank refuses the same checkpoint at the same point."""
    allowed = deepspeed_globals()
    for path in sorted(Path(folder).rglob("*.pt")):
        _check(path, allowed)


class _WeightsOnlyLoads:
    """The engine's checkpoint engine, its `load` (DeepSpeed's one way to read a file) made weights-only."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def load(self, path: str, map_location: Any = None) -> Any:
        return torch_load(Path(path), map_location=map_location, allowed=deepspeed_globals())

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def install(engine: Any) -> None:
    """After deepspeed.initialize; idempotent."""
    if not isinstance(engine.checkpoint_engine, _WeightsOnlyLoads):
        engine.checkpoint_engine = _WeightsOnlyLoads(engine.checkpoint_engine)


class _TorchWithSafeLoad:
    """`torch` as zero_to_fp32 sees it inside `zero_to_fp32_weights_only`: the same, but `load` is ours."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def load(f: Any, map_location: Any = None, mmap: bool = False, **_ignored: Any) -> Any:
        return torch_load(Path(f), map_location=map_location, allowed=deepspeed_globals(), mmap=mmap)


@contextmanager
def zero_to_fp32_weights_only() -> Iterator[None]:
    """zero_to_fp32 calls `torch.load(..., weights_only=False)` through its module's `torch` name; this
    swaps that one name (not torch.load itself) for the duration."""
    from deepspeed.utils import zero_to_fp32

    saved = zero_to_fp32.torch
    zero_to_fp32.torch = _TorchWithSafeLoad()
    try:
        yield
    finally:
        zero_to_fp32.torch = saved
