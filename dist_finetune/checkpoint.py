"""DeepSpeed checkpoints beside the old ones, an atomic `latest`/`best` pointer, resume, and export.

Layout under `output_dir/checkpoints/`: one folder per tag (`step_000120`), written by every rank
through DeepSpeed, plus `rng_rank{R}.pt` per rank; then, after a barrier, rank 0 writes the folder's
`manifest.json` (every file with its size and SHA-256) and replaces the text files `latest` and `best`
atomically. A crash mid-save leaves the old pointer on a complete checkpoint, and resume checks a
checkpoint against its manifest before it trusts it.
"""
from __future__ import annotations

import hashlib
import json
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
# Keys that change speed or bookkeeping, not what the run computes: a resume may change them.
RESUME_FREE_KEYS = ("output_dir", "resume", "report.", "distributed.", "data.num_workers", "data.pin_memory",
                    "train.log_every_steps", "train.compile", "train.compile_mode", "train.nonfinite_check",
                    "train.sync_every_steps",
                    "model.fused_qkv", "model.attention_backend", "zero.overlap_comm",
                    "zero.reduce_bucket_size", "zero.allgather_bucket_size", "zero.contiguous_gradients",
                    "checkpoint.")


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
         is_best: bool, keep_last: int, checksums: bool = True) -> str:
    """Every rank calls this. Returns the tag written."""
    tag = tag_for(step)
    root = checkpoint_dir(run_dir)
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    torch.save(rng_state(), root / tag / f"rng_rank{env.rank}.pt")
    barrier(env)  # every rank's files are complete before any pointer moves
    if env.is_main:
        (root / tag / RUN_STATE).write_text(json.dumps(client_state, indent=1), encoding="utf-8")
        write_manifest(root / tag, checksums)
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


MANIFEST = "manifest.json"
RUN_STATE = "run_state.json"  # the loop's state and the world size, readable without DeepSpeed


def saved_world_size(run_dir: Path, tag: str) -> int | None:
    path = checkpoint_dir(run_dir) / tag / RUN_STATE
    return json.loads(path.read_text(encoding="utf-8")).get("world_size") if path.is_file() else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path, checksums: bool = True) -> None:
    """Written last, after every rank's files: its presence says the checkpoint is complete."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        entry = {"size": path.stat().st_size}
        if checksums:
            entry["sha256"] = _sha256(path)
        files[str(path.relative_to(folder))] = entry
    tmp = folder / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"files": files}, indent=1), encoding="utf-8")
    os.replace(tmp, folder / MANIFEST)


def verify(folder: Path) -> str | None:
    """None when the checkpoint matches its manifest, else what is wrong with it."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return "no manifest.json (the save did not finish)"
    try:
        files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError) as exc:
        return f"unreadable manifest.json ({exc})"
    for name, entry in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != entry["size"]:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {entry['size']}"
        if "sha256" in entry and _sha256(path) != entry["sha256"]:
            return f"{name} does not match its checksum"
    return None


def latest_valid_tag(run_dir: Path, pointer: str = "latest") -> str | None:
    """The pointer's checkpoint if it verifies, else the newest older one that does (with a warning)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return None
    first = read_pointer(run_dir, pointer)
    tags = sorted((p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("step_")), reverse=True)
    if first is not None:
        tags = [first] + [t for t in tags if t < first]
    for tag in tags:
        problem = verify(root / tag)
        if problem is None:
            return tag
        log.warning("checkpoint %s is incomplete or corrupted (%s); skipping it", root / tag, problem)
    return None


def best_valid_tag(run_dir: Path) -> str | None:
    """The best checkpoint, or the latest complete one (with a warning) if the best is damaged."""
    best = read_pointer(run_dir, "best")
    problem = verify(checkpoint_dir(run_dir) / best) if best else "no best checkpoint"
    if problem is None:
        return best
    log.warning("best checkpoint %s unusable (%s); using the latest complete checkpoint", best, problem)
    return latest_valid_tag(run_dir)


def find_resume_tag(cfg: Config, run_dir: Path) -> str | None:
    """`resume: auto` -> the latest complete checkpoint (or None); a path -> its tag, verified."""
    if cfg.resume == "none":
        return None
    if cfg.resume == "auto":
        return latest_valid_tag(run_dir)
    path = Path(cfg.resume)
    if not (path.is_dir() and path.parent.resolve() == checkpoint_dir(run_dir).resolve()):
        raise ConfigError(
            f"resume: {cfg.resume} is not a checkpoint folder of this run "
            f"({checkpoint_dir(run_dir)}/step_*); use resume=auto or one of those folders"
        )
    problem = verify(path)
    if problem is not None:
        raise ConfigError(f"resume: checkpoint {path} is incomplete or corrupted ({problem}); "
                          "use resume=auto to take the newest complete one")
    return path.name


def estimate_checkpoint_bytes(cfg: Config) -> int:
    """One checkpoint, roughly: every weight in fp32 plus fp32 master weights and two Adam moments
    for the trainable ones (an over-estimate for bf16 and for LoRA-style runs)."""
    arch = cfg.model.arch()
    c, layers = arch["n_embd"], arch["n_layer"]
    block = 12 * c * c + 13 * c
    total = layers * block + (cfg.model.vocab_size + arch["context_length"]) * c
    policy = cfg.model.trainable
    trained_blocks = layers if policy == "all" else 0 if policy in ("head", "last_layer", "lora") else \
        1 if policy == "last_block" else int(policy.split("_")[1])
    trainable = total if policy == "all" else trained_blocks * block + 2 * c
    return 4 * total + 12 * trainable


def check_free_space(cfg: Config, run_dir: Path) -> None:
    need = estimate_checkpoint_bytes(cfg) * (cfg.checkpoint.keep_last + 1)
    free = shutil.disk_usage(run_dir).free
    if free < need:
        raise ConfigError(
            f"output_dir {run_dir}: about {need / 2**30:.1f} GiB are needed for {cfg.checkpoint.keep_last + 1} "
            f"checkpoints (checkpoint.keep_last + the best) but only {free / 2**30:.1f} GiB are free; free some "
            "space, lower checkpoint.keep_last, or choose another output_dir"
        )


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
    # A key the saved config predates counts as its default.
    old, new = {**_flatten(to_dict(Config())), **_flatten(saved)}, _flatten(to_dict(cfg))
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
