"""DeepSpeed checkpoints beside the old ones, an atomic `latest`/`best` pointer, resume, and export.

Layout under `output_dir/checkpoints/`: one folder per tag (`step_000120`), written by every rank
through DeepSpeed, plus `rng_rank{R}.pt` (tensors) and `rng_rank{R}.json` per rank; then, after a barrier,
rank 0 writes the folder's `manifest.json` (every file with its size and SHA-256) and replaces the text
files `latest` and `best` atomically. A crash mid-save leaves the old pointer on a complete checkpoint,
and resume checks a checkpoint against its manifest before it trusts it.
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

from .config import ConfigError
from . import safe_load
from .distributed import DistEnv, barrier
from .files import atomic_write_text, publish, temp_path_for
from .zero3 import writable

log = logging.getLogger(__name__)

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


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This process's RNG states as (tensors, JSON scalars): saved so that loading unpickles no object."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"python": torch.tensor(words, dtype=torch.int64),
               "numpy": torch.from_numpy(keys.astype(np.int64)), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda_{i}": t for i, t in enumerate(torch.cuda.get_rng_state_all())})
    scalars = {"python_version": version, "python_gauss": gauss, "numpy_kind": kind, "numpy_pos": int(pos),
               "numpy_has_gauss": int(has_gauss), "numpy_cached_gaussian": float(cached)}
    return tensors, scalars


def set_rng_state(tensors: dict[str, torch.Tensor], scalars: dict[str, Any]) -> None:
    random.setstate((scalars["python_version"], tuple(tensors["python"].tolist()), scalars["python_gauss"]))
    np.random.set_state((scalars["numpy_kind"], tensors["numpy"].numpy().astype(np.uint32), scalars["numpy_pos"],
                         scalars["numpy_has_gauss"], scalars["numpy_cached_gaussian"]))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda_{i}"] for i in range(len(tensors)) if f"cuda_{i}" in tensors]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def _rng_files(folder: Path, rank: int) -> tuple[Path, Path]:
    return folder / f"rng_rank{rank}.pt", folder / f"rng_rank{rank}.json"


def _save_rng(folder: Path, rank: int) -> None:
    tensors, scalars = rng_state()
    pt, js = _rng_files(folder, rank)
    tmp = temp_path_for(pt)
    torch.save(tensors, tmp)
    publish(tmp, pt)
    atomic_write_text(js, json.dumps(scalars))


def _restore_rng(folder: Path, rank: int) -> None:
    pt, js = _rng_files(folder, rank)
    if not pt.exists():
        return
    tensors = safe_load.torch_load(pt)
    try:
        set_rng_state(tensors, json.loads(js.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError, KeyError, AttributeError, RuntimeError) as exc:
        detail = " ".join(str(exc).split())[:160]
        raise safe_load.UnsafeFileError(f"{pt} with {js.name}: not this tool's RNG state ({type(exc).__name__}: "
                                        f"{detail}); {safe_load.CHECKPOINT_FIX}") from None


def _check_plain(value: Any, where: str = "client_state") -> None:
    """What we hand DeepSpeed to pickle must load back under weights_only: plain data only (a bug if not)."""
    if isinstance(value, dict):
        for k, v in value.items():
            _check_plain(k, where)
            _check_plain(v, f"{where}[{k!r}]")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
    elif not (value is None or type(value) in (str, int, float, bool)):
        raise TypeError(f"{where} is a {type(value).__name__}; checkpoints hold only plain data")


def save(engine, run_dir: Path, env: DistEnv, step: int, client_state: dict[str, Any],
         is_best: bool, keep_last: int, checksums: bool = True) -> str:
    """Every rank calls this. Returns the tag written."""
    tag = tag_for(step)
    root = checkpoint_dir(run_dir)
    _check_plain(client_state)
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    _save_rng(root / tag, env.rank)
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
    """Every rank calls this. Restores engine state (and this rank's RNG unless weights_only).

    Nothing is unpickled but tensors and plain data: the folder is screened first (every rank, the same
    files, so every rank refuses together), then DeepSpeed reads through a weights-only checkpoint engine.
    """
    root = checkpoint_dir(run_dir)
    safe_load.screen(root / tag)
    if weights_only and engine.zero_optimization_partition_weights():
        _load_module_zero3(engine, run_dir, tag)
        return _run_state(root / tag)
    safe_load.install(engine)
    path, client_state = engine.load_checkpoint(
        str(root), tag=tag,
        load_optimizer_states=not weights_only,
        load_lr_scheduler_states=not weights_only,
        load_module_only=weights_only,
    )
    if path is None:
        raise ConfigError(f"checkpoint {root / tag} could not be loaded (files missing?)")
    if not weights_only:
        _restore_rng(root / tag, env.rank)
    return client_state or {}


def _load_module_zero3(engine, run_dir: Path, tag: str) -> None:
    """Module-only load under ZeRO-3. DeepSpeed's own (load_module_only=True) consolidates the shards
    without the tag, i.e. whatever `latest` points to (issue 14): we read the tag's fp32 weights and
    copy them into the partitioned parameters, one parameter gathered at a time, on every rank."""
    sd = consolidated_state_dict(run_dir, tag)
    module = engine.module
    missing = [name for name, _ in module.named_parameters() if name not in sd]
    if missing:
        raise ConfigError(f"checkpoint {checkpoint_dir(run_dir) / tag} has no weights for {missing[:5]}: it was "
                          "written for another model; use a checkpoint of this run's own model")
    with torch.no_grad():
        for name, param in module.named_parameters():
            with writable(param) as writes:
                if writes:
                    param.data.copy_(sd[name].reshape(param.shape).to(param.device, param.dtype))
        for name, buffer in module.named_buffers():
            if name in sd:
                buffer.copy_(sd[name].to(buffer.device, buffer.dtype))
    if hasattr(engine.optimizer, "refresh_fp32_params"):
        engine.optimizer.refresh_fp32_params()  # the fp32 masters follow the module, as in DeepSpeed's own


def _run_state(folder: Path) -> dict[str, Any]:
    path = folder / RUN_STATE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


MANIFEST = "manifest.json"
RUN_STATE = "run_state.json"  # the loop's state and the world size, readable without DeepSpeed


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
    except (ValueError, KeyError, TypeError) as exc:
        return f"unreadable manifest.json ({exc})"
    well_formed = isinstance(files, dict) and all(
        isinstance(name, str) and isinstance(entry, dict) and isinstance(entry.get("size"), int)
        for name, entry in files.items())
    if not well_formed:
        return "unreadable manifest.json (not a map of files to their sizes)"
    for name, entry in files.items():
        path = folder / name
        if ".." in Path(name).parts or Path(name).is_absolute():
            return f"manifest.json names {name}, outside the checkpoint"
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != entry["size"]:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {entry['size']}"
        if "sha256" in entry and _sha256(path) != entry["sha256"]:
            return f"{name} does not match its checksum"
    return None


def consolidated_state_dict(run_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """fp32 weights of a checkpoint, read from its files alone (no process group needed).

    Trained parameters come from the fp32 master copies; frozen ones as the checkpoint holds them.
    """
    folder = checkpoint_dir(run_dir) / tag
    safe_load.screen(folder)
    states_file = folder / "mp_rank_00_model_states.pt"
    states = safe_load.torch_load(states_file, allowed=safe_load.deepspeed_globals()) if states_file.exists() else {}
    # ZeRO-3 keeps only placeholders in "module"; ZeRO 0-2 keep every tensor there (16-bit if bf16/fp16).
    sd = {k: v.detach().float().contiguous() for k, v in (states.get("module") or {}).items() if v.numel()}
    if any(folder.glob("*optim_states.pt")):  # ZeRO 1-3: fp32 partitions of the trained parameters
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with safe_load.zero_to_fp32_weights_only():
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
