"""DeepSpeed checkpoints beside the old ones, an atomic `latest`/`best` pointer, resume, and export.

Layout under `output_dir/checkpoints/`: one folder per tag (`step_000120`), written by every rank
through DeepSpeed, plus `rng_rank{R}.pt` per rank; then, after a barrier, rank 0 replaces the text
files `latest` and `best` atomically. A crash mid-save leaves the old pointer on a complete checkpoint.
"""
from __future__ import annotations

import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import Config, ConfigError, to_dict
from .distributed import DistEnv, barrier

log = logging.getLogger(__name__)

# Keys that may differ between a run and its resumption: they do not change the result.
RESUME_FREE_KEYS = ("output_dir", "resume", "report.", "distributed.", "data.num_workers",
                    "train.log_every_steps", "checkpoint.")


def tag_for(step: int) -> str:
    return f"step_{step:07d}"


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def read_pointer(run_dir: Path, name: str) -> str | None:
    path = checkpoint_dir(run_dir) / name
    if not path.is_file():
        return None
    tag = path.read_text(encoding="utf-8").strip()
    return tag if tag and (checkpoint_dir(run_dir) / tag).is_dir() else None


def _write_pointer(run_dir: Path, name: str, tag: str) -> None:
    path = checkpoint_dir(run_dir) / name
    tmp = path.with_name(f".{name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(tag + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(engine, run_dir: Path, env: DistEnv, step: int, client_state: dict[str, Any],
         is_best: bool, keep_last: int) -> str:
    """Every rank calls this. Returns the tag written."""
    tag = tag_for(step)
    root = checkpoint_dir(run_dir)
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    torch.save(rng_state(), root / tag / f"rng_rank{env.rank}.pt")
    barrier(env)  # every rank's files are complete before any pointer moves
    if env.is_main:
        _write_pointer(run_dir, "latest", tag)
        if is_best:
            _write_pointer(run_dir, "best", tag)
        _prune(run_dir, keep_last)
    barrier(env)
    return tag


def _prune(run_dir: Path, keep_last: int) -> None:
    root = checkpoint_dir(run_dir)
    keep = {read_pointer(run_dir, "latest"), read_pointer(run_dir, "best")}
    tags = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))
    for tag in tags[:-keep_last]:
        if tag not in keep:
            shutil.rmtree(root / tag, ignore_errors=True)


def load(engine, run_dir: Path, env: DistEnv, tag: str, weights_only: bool = False) -> dict[str, Any]:
    """Every rank calls this. Restores engine state (and this rank's RNG unless weights_only)."""
    root = checkpoint_dir(run_dir)
    path, client_state = engine.load_checkpoint(
        str(root), tag=tag,
        load_optimizer_states=not weights_only,
        load_lr_scheduler_states=not weights_only,
        load_module_only=weights_only,
    )
    if path is None:
        raise ConfigError(f"checkpoint {root / tag} could not be loaded (files missing?)")
    rng_file = root / tag / f"rng_rank{env.rank}.pt"
    if not weights_only and rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return client_state or {}


def find_resume_tag(cfg: Config, run_dir: Path) -> str | None:
    """`resume: auto` -> the latest complete checkpoint (or None); a path -> its tag."""
    if cfg.resume == "none":
        return None
    if cfg.resume == "auto":
        return read_pointer(run_dir, "latest")
    path = Path(cfg.resume)
    if not (path.is_dir() and path.parent.resolve() == checkpoint_dir(run_dir).resolve()):
        raise ConfigError(
            f"resume: {cfg.resume} is not a checkpoint folder of this run "
            f"({checkpoint_dir(run_dir)}/step_*); use resume=auto or one of those folders"
        )
    return path.name


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k != "deepspeed":
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def result_changing_differences(saved: dict[str, Any], cfg: Config) -> list[str]:
    old, new = _flatten(saved), _flatten(to_dict(cfg))
    keys = sorted(set(old) | set(new))
    free = lambda k: any(k == f or (f.endswith(".") and k.startswith(f)) for f in RESUME_FREE_KEYS)
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if not free(k) and old.get(k) != new.get(k)]


def consolidated_state_dict(run_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """fp32 weights of a checkpoint, read from its files alone (no process group needed).

    Trained parameters come from the fp32 master copies; frozen ones as the checkpoint holds them.
    """
    folder = checkpoint_dir(run_dir) / tag
    states_file = folder / "mp_rank_00_model_states.pt"
    states = torch.load(states_file, map_location="cpu", weights_only=False) if states_file.exists() else {}
    # ZeRO-3 keeps only placeholders in "module"; ZeRO 0-2 keep every tensor there (16-bit if bf16/fp16).
    sd = {k: v.detach().float().contiguous() for k, v in (states.get("module") or {}).items() if v.numel()}
    if any(folder.glob("*optim_states.pt")):  # ZeRO 1-3: fp32 partitions of the trained parameters
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        masters = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir(run_dir)), tag=tag)
        sd.update({k: v.detach().float().contiguous() for k, v in masters.items()})
        return sd
    groups = (states.get("optimizer") or {}).get("fp32_groups")
    if groups:  # stage 0 with bf16/fp16: the module holds 16-bit copies, the optimizer fp32 masters
        names = [n for group in states["param_group_names"] for n in group]
        flat = [p for group in groups for p in group]
        for name, tensor in zip(names, flat, strict=True):
            sd[name] = tensor.detach().float().reshape(sd[name].shape).contiguous()
    return sd
