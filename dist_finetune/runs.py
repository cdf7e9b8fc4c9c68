"""The run folder: its rules (create, check, lock, what may be replaced, the resume target) and, read back
after training, its config, a checkpoint's weights, its label map and max_length.

Training claims its folder with `claim_run_dir` (rank 0 checks and locks, deletes nothing) and
`RunDir.commit`s it once everything that can fail before training has passed; only then is an old run
it replaces removed. evaluate/export read files only (no process group, no DeepSpeed engine) and
refuse a folder a training run holds.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Iterator
from typing import Any, Callable

import torch

from .checkpoint import RUN_STATE, checkpoint_dir, consolidated_state_dict, read_pointer, verify
from .config import Config, ConfigError, Trainable, load_config, read_yaml, to_dict, to_yaml
from .distributed import DistEnv, broadcast_object
from .files import atomic_write_text
from .hf_export import HF_EXPORT_FILES, HF_EXPORT_SUBDIR
from .onnx_export import ONNX_EXPORT_SUBDIR
from .data import DataBundle, LabelMap, load_data
from .families import (RUN_ARCH_FILE, RUN_TOKENIZER_DIR, TOKENIZER_FILES, backbone_config, block_parameters,
                       embedding_parameters, load_tokenizer, save_run_files)
from .families import RUN_ARCH_FILE
from .model import GPTClassifier, build_model
from .splits import SPLIT_FILE, DataSplit, read_split
from .trackers import IDS_FILE as TRACKER_IDS
from .weights import EXPORT_CONFIG, EXPORT_LABELS, load_state_strict
from .errors import UserError

log = logging.getLogger(__name__)

POINTERS = ("best", "latest")


class RunError(UserError, ValueError):
    """A user error about a run folder or checkpoint; the message names the path and the fix."""


@dataclass(frozen=True)
class RunFacts:
    """What training decided and the run recorded: the label map and the truncation length."""

    labels: LabelMap
    max_length: int
    precision: str  # as trained (summary.json), else as configured


def load_run_config(run_dir: Path) -> Config:
    if not run_dir.is_dir():
        raise RunError(f"run folder {run_dir} not found; pass --run the output_dir of a training run")
    if not (run_dir / "config.yaml").is_file():
        raise RunError(f"{run_dir} is not a run folder (no config.yaml); pass --run the output_dir of a training run")
    return load_config(run_dir / "config.yaml")


def resolve_checkpoint(run_dir: Path, spec: str) -> tuple[Path, str]:
    """(the run folder that holds it, its tag) for `best`, `latest` or a `RUN/checkpoints/step_*` folder."""
    if spec in POINTERS:
        tag = read_pointer(run_dir, spec)
        if tag is None:
            raise RunError(
                f"{run_dir} has no '{spec}' checkpoint ({checkpoint_dir(run_dir) / spec} is missing or points "
                "to no folder); pass --checkpoint latest, best or a checkpoints/step_* folder of the run"
            )
        return run_dir, _verified(run_dir, tag)
    path = Path(spec)
    if not path.is_dir():
        raise RunError(f"--checkpoint {spec}: no such folder; use best, latest or a RUN/checkpoints/step_NNNNNNN folder")
    if path.parent.name != "checkpoints" or not any(path.glob("*model_states.pt")):
        raise RunError(
            f"--checkpoint {spec}: not a DeepSpeed checkpoint folder (expected RUN/checkpoints/step_NNNNNNN "
            "holding *model_states.pt); use best, latest or such a folder"
        )
    return path.parent.parent, _verified(path.parent.parent, path.name)


def _verified(run_dir: Path, tag: str) -> str:
    problem = verify(checkpoint_dir(run_dir) / tag)
    if problem is not None:
        raise RunError(f"checkpoint {checkpoint_dir(run_dir) / tag} is incomplete or corrupted ({problem}); "
                       "pass another --checkpoint")
    return tag


def load_checkpoint_model(cfg: Config, num_classes: int, ckpt_run: Path, tag: str, run_dir: Path) -> GPTClassifier:
    """The run's architecture with the checkpoint's fp32 weights (all of them, strictly)."""
    folder = checkpoint_dir(ckpt_run) / tag
    try:
        state_dict = consolidated_state_dict(ckpt_run, tag)
    except UserError:  # already one line naming the file (a refused or unreadable file)
        raise
    except Exception as exc:  # noqa: BLE001 - DeepSpeed's reader raises many kinds; the user needs one line
        detail = " ".join(str(exc).split())[:200]
        raise RunError(
            f"checkpoint {folder} cannot be read ({type(exc).__name__}: {detail}); it may be incomplete: "
            "pass another --checkpoint"
        ) from None
    bad = [name for name, t in state_dict.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise RunError(f"checkpoint {folder} holds non-finite weights ({', '.join(bad[:3])}); it is not a usable "
                       "state: pass another --checkpoint")
    model = build_model(cfg.model, num_classes, cfg.lora, run_dir)
    load_state_strict(
        model, state_dict, str(folder),
        fix=f"the model is built from {run_dir / 'config.yaml'}: pass --run the run folder that wrote this checkpoint",
    )
    return model.eval()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, json.JSONDecodeError):
        return None


def _as_label_list(raw: Any) -> list | None:
    if isinstance(raw, dict):  # {label: id}
        return [label for label, _ in sorted(raw.items(), key=lambda item: item[1])]
    return raw if isinstance(raw, list) and raw else None


def recorded_facts(run_dir: Path) -> tuple[list | None, int | None, str | None]:
    """Labels, max_length and precision as the run wrote them (export folder, then summary.json)."""
    export_cfg = _read_json(run_dir / "export" / EXPORT_CONFIG) or {}
    summary = _read_json(run_dir / "summary.json") or {}
    labels = _as_label_list(_read_json(run_dir / "export" / EXPORT_LABELS)) or _as_label_list(summary.get("labels"))
    max_length = export_cfg.get("max_length") or summary.get("max_length")
    return labels, max_length, summary.get("precision")


def load_run_data(cfg: Config, run_dir: Path, saved: bool = True) -> DataBundle:
    """The run's data. A split data.train_file is split as RUN/data_split.json records when `saved`
    (resume, evaluate), afresh otherwise (a new run, which writes the record when it commits). A saved run's
    tokenizer and context length are its own (families.save_run_files), a new run's those of model.weights."""
    source = run_dir if saved else None  # a new run may replace an old one whose files are still there
    folder_split = cfg.data.dataset_dir is not None and (run_dir / SPLIT_FILE).is_file()  # a folder without val
    split = read_split(run_dir) if saved and (cfg.data.split_fractions() is not None or folder_split) else None
    return load_data(cfg.data, backbone_config(cfg.model, source).context_length, split, cfg.task,
                     load_tokenizer(cfg.model, source))


def run_facts(run_dir: Path, cfg: Config, bundle: DataBundle | None = None) -> RunFacts:
    """From the run's records; a run that recorded nothing (stopped early) re-reads its training data
    (or takes `bundle`, the run's data already loaded)."""
    labels, max_length, precision = recorded_facts(run_dir)
    if labels is None or max_length is None:
        bundle = bundle or load_run_data(cfg, run_dir)
        labels = labels or bundle.label_map.to_json()
        max_length = max_length or bundle.max_length
    return RunFacts(LabelMap.from_json(labels), int(max_length), precision or cfg.precision)


def check_same_labels(run_dir: Path, recorded: LabelMap, rebuilt: LabelMap) -> None:
    if recorded != rebuilt:
        raise RunError(
            f"{run_dir}: the run was trained with labels {list(recorded.labels)!r} but its data files now give "
            f"{list(rebuilt.labels)!r}; restore the training data, or evaluate the files with --data"
        )


# ---------------------------------------------------------------- the resume target

# Keys that change speed or bookkeeping, not what the run computes: a resume may change them.
RESUME_FREE_KEYS = ("output_dir", "resume", "report.", "distributed.", "data.num_workers", "data.pin_memory",
                    "train.log_every_steps", "train.compile", "train.compile_mode", "train.nonfinite_check",
                    "train.sync_every_steps",
                    "model.fused_qkv", "model.attention_backend", "zero.overlap_comm",
                    "zero.reduce_bucket_size", "zero.allgather_bucket_size", "zero.contiguous_gradients",
                    "checkpoint.")


def _step_tags(run_dir: Path) -> list[str]:
    """The run's checkpoint folders, newest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted((p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("step_")), reverse=True)


def latest_valid_tag(run_dir: Path, pointer: str = "latest") -> str | None:
    """The pointer's checkpoint if it verifies, else the newest older one that does (with a warning)."""
    root = checkpoint_dir(run_dir)
    first = read_pointer(run_dir, pointer)
    tags = _step_tags(run_dir)
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


def saved_world_size(run_dir: Path, tag: str) -> int | None:
    path = checkpoint_dir(run_dir) / tag / RUN_STATE
    if not path.is_file():
        return None
    state = _read_json(path)
    world = state.get("world_size") if isinstance(state, dict) else None
    if not isinstance(world, int) or world < 1:
        raise RunError(f"{path} is damaged (no world_size in it); resume from another checkpoint with "
                       "resume=RUN/checkpoints/step_N, or start again with --overwrite")
    return world


def estimate_checkpoint_bytes(cfg: Config) -> int:
    """One checkpoint, roughly: every weight in fp32 plus fp32 master weights and two Adam moments
    for the trainable ones (an over-estimate for bf16 and for LoRA-style runs)."""
    arch = backbone_config(cfg.model)
    c, block = arch.n_embd, block_parameters(arch)
    total = arch.n_layer * block + embedding_parameters(arch)
    policy = Trainable.parse(cfg.model.trainable)
    trainable = total if policy.blocks is None else policy.blocks * block + 2 * c
    return 4 * total + 12 * trainable


def check_free_space(cfg: Config, run_dir: Path, reclaimable: int = 0) -> None:
    """`reclaimable`: the bytes of an old run this one replaces (removed once it starts)."""
    need = estimate_checkpoint_bytes(cfg) * (cfg.checkpoint.keep_last + 1)
    free = shutil.disk_usage(run_dir).free + reclaimable
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


def result_changing_differences(saved: dict[str, Any], cfg: Config, also_free: tuple[str, ...] = ()) -> list[str]:
    # A key the saved config predates counts as its default.
    old, new = {**_flatten(to_dict(Config())), **_flatten(saved)}, _flatten(to_dict(cfg))
    keys = sorted(set(old) | set(new))
    free = lambda k: any(k == f or (f.endswith(".") and k.startswith(f)) for f in RESUME_FREE_KEYS + also_free)
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if not free(k) and old.get(k) != new.get(k)]


# ---------------------------------------------------------------- what a run folder is

MARKER = ".dist_finetune_run"  # written when training creates a run folder: JSON {version, created, host}
LOCK = ".dist_finetune_lock"  # held by the training run that uses the folder (see RunLock)
OURS_PREFIX = ".dist_finetune_"  # the marker, the lock, a lock being broken, an old run moved aside
MARKER_VERSION = 1
# What training and evaluate write at the top of a run folder. `--overwrite` replaces a folder holding the
# marker and only these (and their temporary twins `NAME.tmp`, `.NAME.*` of an interrupted write).
RUN_FILES = frozenset({"config.yaml", SPLIT_FILE, "checkpoints", "metrics.jsonl", "history.csv", "loss.png",
                       "accuracy.png", "confusion_test.png", "scatter_test.png", "summary.json", "report.md", "tensorboard", "export",
                       HF_EXPORT_SUBDIR, ONNX_EXPORT_SUBDIR, "samples", "eval", "logs", ".write_probe", TRACKER_IDS, "mlruns", "wandb",
                       RUN_ARCH_FILE, RUN_TOKENIZER_DIR})
PACKAGE_DIR = Path(__file__).resolve().parent


# Inside the run's folders: exactly what training, evaluate and export write there.
_TOKENIZER_NAMES = "|".join(map(re.escape, TOKENIZER_FILES))  # a decoder's tokenizer files
RUN_SUBFOLDERS = {
    "checkpoints": re.compile(r"(latest|best|\.(latest|best)\.tmp|step_\d+|zero_to_(fp32|torch)\.py)"),
    "eval": re.compile(r"[^/]+\.json|confusion_[^/]+\.png"),
    "export": re.compile(r"model\.safetensors|model_config\.json|labels\.json|" + _TOKENIZER_NAMES),
    RUN_TOKENIZER_DIR: re.compile(_TOKENIZER_NAMES),  # a decoder run's copy of its tokenizer (families.py)
    HF_EXPORT_SUBDIR: re.compile("|".join(map(re.escape, HF_EXPORT_FILES))),
    ONNX_EXPORT_SUBDIR: re.compile(r"model\.onnx(\.data)?|model_config\.json|labels\.json"),
    "tensorboard": re.compile(r"events\.out\.tfevents\.[^/]+"),
    "samples": re.compile(r"rank\d+\.jsonl"),
    "logs": re.compile(r"train_rank\d+\.log"),
}
# Tracker folders (trackers.py), checked to the last file: every path under them, relative to the folder, must be
# one these patterns name. Links are W&B's own (its newest run, its logs); rmtree unlinks them, never follows.
_REPORTS = r"(report\.md|summary\.json|[a-z_]+\.png)"  # the artifacts the trackers are given
_WANDB_RUN = r"(offline-)?run-\d{8}_\d{6}-[A-Za-z0-9_-]+"
TRACKER_TREES = {
    "mlruns": re.compile(r"mlflow\.db(-journal|-wal|-shm)?|artifacts(/[0-9a-f]{32}(/artifacts(/" + _REPORTS + ")?)?)?"),
    "wandb": re.compile(r"latest-run|debug(-internal)?\.log|" + _WANDB_RUN + r"(/run-[A-Za-z0-9_-]+\.wandb(\.synced)?"
                        r"|/files(/(requirements\.txt|output\.log|wandb-metadata\.json|wandb-summary\.json|"
                        r"config\.yaml|" + _REPORTS + r"))?|/logs(/debug(-internal|-core)?\.log)?|/tmp(/code)?)?"),
}
TRACKER_LINKS = re.compile(r"latest-run|debug(-internal)?\.log|" + _WANDB_RUN + r"/logs/debug-core\.log")
CHECKPOINT_FILE = re.compile(r"[^/]+\.pt|rng_rank\d+\.json|manifest\.json|run_state\.json|latest")
# The temporary twins our writers leave when a kill interrupts them (files.py, checkpoint.py):
# `.NAME.<random>.tmp`, `.NAME.old.<random>`, `.NAME.new.<random>` and `NAME.tmp`.
TWIN_ENDINGS = re.compile(r"[^/]*\.tmp|old\.[^/]+|new\.[^/]+")


def is_run_file(name: str) -> bool:
    """A top-level name that training (or a writer of ours interrupted by a kill) may have made."""
    if name in (MARKER, LOCK) or name.startswith(f"{LOCK}.stale.") or name.startswith(f"{OURS_PREFIX}old."):
        return True
    return name in RUN_FILES or _twin_of(name, lambda known: known in RUN_FILES or known == MARKER)


def _twin_of(name: str, allowed) -> bool:
    """`name` is a temporary twin (an interrupted write) of a name `allowed` accepts."""
    if name.endswith(".tmp") and not name.startswith(".") and allowed(name[:-4]):
        return True
    if not name.startswith("."):
        return False
    dots = [i for i, c in enumerate(name) if c == "." and i > 0]
    return any(TWIN_ENDINGS.fullmatch(name[i + 1:]) and allowed(name[1:i]) for i in dots)


def _foreign_inside(path: Path, folder: str) -> list[str]:
    """Files under a run's subfolder that no run writes (a user's notes, a manual backup, a link)."""
    root, pattern = path / folder, RUN_SUBFOLDERS[folder]
    if root.is_symlink():
        return [folder]
    if not root.is_dir():
        return []
    foreign = []
    for entry in root.iterdir():
        rel, ours = f"{folder}/{entry.name}", bool(pattern.fullmatch(entry.name))
        if entry.is_symlink() or not (ours or _twin_of(entry.name, pattern.fullmatch)):
            foreign.append(rel)
        elif folder == "checkpoints" and ours and entry.is_dir():
            foreign += [f"{rel}/{f.name}" for f in entry.iterdir() if f.is_symlink() or not (
                CHECKPOINT_FILE.fullmatch(f.name) or _twin_of(f.name, CHECKPOINT_FILE.fullmatch))]
    return foreign


def _foreign_in_tree(path: Path, folder: str) -> list[str]:
    """Paths under a tracker's folder that the tracker does not write (a user's notes, a backup, a link)."""
    root, pattern = path / folder, TRACKER_TREES[folder]
    if root.is_symlink():
        return [folder]
    if not root.is_dir():
        return []
    foreign = []
    for entry in sorted(root.rglob("*")):
        rel = entry.relative_to(root).as_posix()
        ours = TRACKER_LINKS.fullmatch(rel) if entry.is_symlink() else pattern.fullmatch(rel)
        if not ours:
            foreign.append(f"{folder}/{rel}")
    return foreign


def foreign_files(path: Path, names: list[str]) -> list[str]:
    """What in a run folder training did not write; an old run moved aside by a killed commit is ours."""
    foreign = [name for name in names if not is_run_file(name)]
    for name in names:
        if name in RUN_SUBFOLDERS:
            foreign += _foreign_inside(path, name)
        elif name in TRACKER_TREES:
            foreign += _foreign_in_tree(path, name)
    return foreign


def _protected(real: Path) -> str | None:
    """Why the (resolved) folder must never hold a run, or None."""
    cwd = Path.cwd().resolve()
    if real == Path(real.anchor):
        return "the file system root"
    if real == Path.home().resolve():
        return "your home folder"
    if real == cwd or real in cwd.parents:
        return "the current folder or one of its parents"
    if (real / ".git").exists():
        return "a project checkout (it holds .git)"
    if real == PACKAGE_DIR or real in PACKAGE_DIR.parents:
        return "the dist_finetune source tree or a folder above it"
    return None


def check_location(path: Path) -> None:
    """Refuses a symlink, a file, and folders no run may use, whatever the flags."""
    if path.is_symlink():
        raise RunError(f"output_dir {path} is a symbolic link (to {os.readlink(path)}); pass the folder itself "
                       "or another output_dir")
    if path.exists() and not path.is_dir():
        raise RunError(f"output_dir {path} is a file, not a folder; choose another output_dir")
    reason = _protected(path.resolve())
    if reason is not None:
        raise RunError(f"output_dir {path} is {reason}; a run needs a folder of its own: choose another "
                       "output_dir, e.g. runs/NAME")


def check_replaceable(path: Path, names: list[str]) -> None:
    """Only a folder training created, holding only what a run writes, may be replaced."""
    marker = _read_json(path / MARKER)
    if not (isinstance(marker, dict) and "version" in marker):
        raise RunError(f"output_dir {path} was not created by dist_finetune (no readable {MARKER} in it), so "
                       "--overwrite will not delete it; remove it yourself or choose another output_dir")
    foreign = foreign_files(path, names)
    if foreign:
        listed = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise RunError(f"output_dir {path} holds files a run does not write ({listed}), so --overwrite will not "
                       "delete it; move them out or choose another output_dir")


def _damaged_checkpoints(path: Path) -> str | None:
    """resume=auto found no complete checkpoint: 'step_N (why), ...' when the run has damaged ones."""
    tags = _step_tags(path)
    if not tags:
        return None
    return ", ".join(f"{tag} ({verify(checkpoint_dir(path) / tag)})" for tag in tags)


def _check_writable(path: Path) -> None:
    probe = path / ".write_probe"
    try:
        probe.write_bytes(b"\0" * 65536)
        probe.unlink()
    except OSError as exc:
        raise RunError(f"output_dir {path} is not writable: {exc}; choose another output_dir") from None


def _bytes_under(paths: list[Path]) -> int:
    total = 0
    for p in paths:
        files = [p] if not p.is_dir() or p.is_symlink() else [f for f in p.rglob("*") if f.is_file()]
        total += sum(f.lstat().st_size for f in files)
    return total


# ---------------------------------------------------------------- one run per folder: the lock

HEARTBEAT_SECONDS = 30.0  # the holder touches its lock file this often
STALE_SECONDS = 300.0  # a lock from another host not touched for this long belongs to a dead run
EMPTY_LOCK_SECONDS = 30.0  # a lock file still empty this long after its creation: its writer died


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) from /proc, where there is one."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2:].split()
    return fields[0], int(fields[19])


def _launch_ids() -> dict[str, Any]:
    """Which launch this process belongs to: a restarted torchrun or requeued SLURM job keeps its id and
    counts up, so a lock from an earlier incarnation of the same launch is known to be abandoned."""
    env = os.environ
    master = f"{env['MASTER_ADDR']}:{env['MASTER_PORT']}" if env.get("MASTER_ADDR") and env.get("MASTER_PORT") else None
    return {"torchelastic_run_id": env.get("TORCHELASTIC_RUN_ID"),
            "torchelastic_restart": int(env.get("TORCHELASTIC_RESTART_COUNT") or 0),
            "slurm_job_id": env.get("SLURM_JOB_ID"), "slurm_restart": int(env.get("SLURM_RESTART_COUNT") or 0),
            "slurm_step_id": env.get("SLURM_STEP_ID"), "master": master}


def _lock_record(token: str) -> dict[str, Any]:
    stat = _proc_stat(os.getpid())
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": stat[1] if stat else None,
            "started": time.time(), "token": token, "launch": _launch_ids()}


@dataclass(frozen=True)
class Holder:
    """A lock file as found: its record ({} while half-written or unreadable) and seconds since its heartbeat."""

    record: dict[str, Any]
    age: float

    def describe(self) -> str:
        r = self.record
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["started"])) if "started" in r else "?"
        return f"host {r.get('host', '?')}, pid {r.get('pid', '?')}, started {since}"


def read_holder(lock: Path) -> Holder | None:
    """None when there is no lock file."""
    try:
        age = time.time() - lock.stat().st_mtime
        record = json.loads(lock.read_text(encoding="utf-8") or "{}")
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        record = {}
    return Holder(record if isinstance(record, dict) else {}, age)


def _alive(pid: Any, pid_start: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, another user's
    stat = _proc_stat(pid)
    if stat is None:
        return True
    return stat[0] not in ("Z", "X") and (pid_start is None or stat[1] == pid_start)  # not a reused pid


def _earlier_incarnation(launch: dict[str, Any]) -> bool:
    mine = _launch_ids()
    for job, count in (("torchelastic_run_id", "torchelastic_restart"), ("slurm_job_id", "slurm_restart")):
        if mine[job] not in (None, "", "none") and launch.get(job) == mine[job] and \
                int(launch.get(count) or 0) < mine[count]:
            return True
    return False


def abandoned(holder: Holder) -> bool:
    """The holding process is gone: same host and its pid is dead, an earlier incarnation of this launch,
    or (another host) its heartbeat stopped STALE_SECONDS ago."""
    r = holder.record
    if not r:
        return holder.age > EMPTY_LOCK_SECONDS  # its writer died between creating and filling it
    if r.get("host") == socket.gethostname():
        return not _alive(r.get("pid"), r.get("pid_start"))
    return _earlier_incarnation(r.get("launch") or {}) or holder.age > STALE_SECONDS


def _in_use(folder: Path, holder: Holder, what: str) -> RunError:
    return RunError(
        f"{what} {folder} is in use by another dist_finetune process ({holder.describe()}); wait for it to "
        f"end or stop it, or choose another folder (its lock {folder / LOCK} is ignored once that process is "
        "gone)")


def _same_launch(holder: Holder) -> bool:
    """The lock is held by the first rank of the launch this process belongs to (the same torchrun
    rendezvous, torchrun run id or SLURM job step, in the same restart)."""
    theirs, mine = holder.record.get("launch") or {}, _launch_ids()
    same = lambda *keys: all(mine[k] not in (None, "", "none") and theirs.get(k) == mine[k] for k in keys)
    restart = theirs.get("torchelastic_restart") == mine["torchelastic_restart"]
    return (same("master") and restart) or (same("torchelastic_run_id") and restart) or \
        same("slurm_job_id", "slurm_step_id", "slurm_restart")


def check_not_in_use(folder: Path, what: str = "run folder") -> None:
    """Refuse a run folder another process holds (a training run, an evaluate or export reading it)."""
    holder = read_holder(Path(folder) / LOCK)
    if holder is not None and not abandoned(holder) and not _same_launch(holder):
        raise _in_use(Path(folder), holder, what)


@contextlib.contextmanager
def reading_run(folder: Path, what: str = "--run") -> Iterator[None]:
    """evaluate / export: while they read a run folder, training may not replace it. The first rank of the
    launch holds the folder's lock; the others only check it (it is their own launch's)."""
    folder = Path(folder)
    first = os.environ.get("RANK", "0") == "0"
    if not (first and folder.is_dir() and (folder / MARKER).is_file()):
        check_not_in_use(folder, what)
        yield
        return
    try:
        held = RunLock.acquire(folder)
    except RunError:
        check_not_in_use(folder, what)  # the holder's own message, for a reader
        raise
    try:
        yield
    finally:
        held.release()


def _break(lock: Path, stale: Holder) -> None:
    """Removes an abandoned lock, unless another process replaced it meanwhile (then it is put back)."""
    aside = lock.with_name(f"{LOCK}.stale.{uuid.uuid4().hex}")
    try:
        os.rename(lock, aside)
    except FileNotFoundError:
        return
    taken = read_holder(aside)
    if taken is not None and taken.record != stale.record:
        try:
            os.link(aside, lock)
        except OSError:
            pass
    aside.unlink(missing_ok=True)
    log.warning("removed the lock of a run that is gone (%s): %s", stale.describe(), lock)


@dataclass
class RunLock:
    """`LOCK` created with O_CREAT|O_EXCL (atomic on local disks and NFSv3+/Lustre/GPFS), holding host, pid
    and start time; a daemon thread touches it every HEARTBEAT_SECONDS while the process lives."""

    path: Path
    token: str
    pid: int = field(default_factory=os.getpid)  # a forked child (a data worker) never releases it
    _stop: threading.Event = field(default_factory=threading.Event)

    @classmethod
    def acquire(cls, folder: Path) -> "RunLock":
        lock, token = folder / LOCK, uuid.uuid4().hex
        for _ in range(3):
            try:
                fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = read_holder(lock)
                if holder is not None and not abandoned(holder):
                    raise _in_use(folder, holder, "output_dir") from None
                if holder is not None:
                    _break(lock, holder)
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(json.dumps(_lock_record(token)))
                f.flush()
                os.fsync(f.fileno())
            held = cls(lock, token)
            threading.Thread(target=held._beat, name="run-folder-lock", daemon=True).start()
            _HELD.append(held)
            return held
        raise RunError(f"output_dir {folder}: its lock {lock} keeps changing hands; try again")

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        """Idempotent; removes the lock file only while it is still this holder's."""
        self._stop.set()
        if self in _HELD:
            _HELD.remove(self)
        if os.getpid() != self.pid:
            return
        holder = read_holder(self.path)
        if holder is not None and holder.record.get("token") == self.token:
            self.path.unlink(missing_ok=True)


_HELD: list[RunLock] = []
_CLAIMED: list["RunDir"] = []


def release_all() -> None:
    """Every run folder and lock this process holds (at exit, and by the train command on its way out)."""
    while _CLAIMED:
        _CLAIMED.pop().release()
    for held in list(_HELD):
        held.release()


atexit.register(release_all)


# ---------------------------------------------------------------- claiming a run folder


@dataclass(frozen=True)
class Plan:
    """Rank 0's decision: the checkpoint to resume (or None), and the names of an old run that
    `commit` moves aside and deletes (those alone)."""

    resume_tag: str | None
    old: tuple[str, ...] = ()


def _check_resumable(cfg: Config, path: Path, tag: str, world_size: int) -> None:
    saved = path / "config.yaml"
    # A decoder run that keeps its architecture and tokenizer reads no weights folder on a resume (the checkpoint
    # holds every weight): the folder may have moved.
    unread = ("model.weights", "model.download") if cfg.model.is_decoder and (path / RUN_ARCH_FILE).is_file() else ()
    diffs = result_changing_differences(read_yaml(saved), cfg, unread) if saved.exists() else []
    if diffs:
        raise RunError(f"resume: {path} was trained with a different config; these keys change the result: "
                       + "; ".join(diffs) + ". Use the original values, or a new output_dir.")
    saved_world = saved_world_size(path, tag)
    if saved_world is not None and saved_world != world_size:
        raise RunError(
            f"resume: checkpoint {path}/checkpoints/{tag} was written by {saved_world} ranks and this "
            f"launch has {world_size}; its optimizer state is sharded for {saved_world} ranks. Either "
            f"relaunch with {saved_world} ranks, or continue from its weights with a fresh optimizer: "
            f"python -m dist_finetune.export --run {path} --checkpoint latest --out WEIGHTS, then train "
            "in a new output_dir with model.weights=WEIGHTS")


# What a run writes that holds a result: a folder with one of them (or a checkpoint) needs --overwrite.
RESULTS = ("summary.json", "report.md", "export", HF_EXPORT_SUBDIR, "eval")


def _never_saved(path: Path, names: list[str]) -> bool:
    """A run of ours that stopped before its first checkpoint (a config or data error found after it
    started, a crash, a kill): nothing in it can be resumed or read as a result, so the next run takes
    the folder without --overwrite (its files are checked as --overwrite checks them)."""
    marker = _read_json(path / MARKER)
    return (isinstance(marker, dict) and "version" in marker and not _step_tags(path)
            and not any(name in RESULTS for name in names))


def decide(cfg: Config, path: Path, overwrite: bool, world_size: int) -> Plan:
    """Rank 0, holding the lock. Checks everything about the folder; changes nothing in it."""
    names = sorted(p.name for p in path.iterdir() if p.name not in (LOCK, MARKER))  # a bare marker: empty
    tag = find_resume_tag(cfg, path)
    if tag is not None:
        _check_resumable(cfg, path, tag, world_size)
        return Plan(tag)
    damaged = _damaged_checkpoints(path) if cfg.resume == "auto" and not overwrite else None
    if damaged:
        raise RunError(f"resume=auto: no checkpoint of {checkpoint_dir(path)} is complete: {damaged}; nothing "
                       "was deleted. Pass --overwrite to start the run again, or resume=PATH with a complete "
                       "checkpoint folder of this run")
    never_saved = bool(names) and _never_saved(path, names)
    if names and not (overwrite or never_saved):
        raise RunError(f"output_dir {path} already exists and is not empty; pass --overwrite to replace it, "
                       "resume=auto to continue it, or choose another output_dir")
    if names:
        check_replaceable(path, names)
    if never_saved and not overwrite:
        log.warning("output_dir %s holds a run that stopped before its first checkpoint; this run replaces its "
                    "files (%s) once it starts", path, ", ".join(names))
    _check_writable(path)
    check_free_space(cfg, path, reclaimable=_bytes_under([path / n for n in names]))
    return Plan(None, tuple(names))


def _as_outcome(path: Path, action: Callable[[], Any]) -> Any:
    """The action's result, or a RunError with the one-line message of the user or OS error it raised."""
    try:
        return action()
    except UserError as exc:
        return RunError(str(exc))
    except OSError as exc:
        return RunError(f"output_dir {path} cannot be used: {exc}; choose another output_dir")


def _remove_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


@dataclass
class RunDir:
    """A claimed run folder. `commit()` when everything before training passed; `release()` at the end."""

    path: Path
    resume_tag: str | None
    cfg: Config
    env: DistEnv
    old: tuple[str, ...] = ()
    created: bool = False  # rank 0 made the folder: release() removes it again while it is empty
    lock: RunLock | None = None
    committed: bool = False

    def commit(self, split: DataSplit | None = None) -> None:
        """Every rank calls it. A new run: rank 0 moves the old run's files aside, writes the marker,
        the data split (`split`, when data.train_file was split) and config.yaml, then deletes what it
        moved aside. A resume: nothing changes on disk."""
        outcome = None
        if self.env.is_main and self.resume_tag is None:
            outcome = _as_outcome(self.path, lambda: _start_run(self.path, self.old, self.cfg, split))
        outcome = broadcast_object(outcome, self.env)
        self.committed = True
        if isinstance(outcome, RunError):
            raise outcome

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        if self.created and not self.committed:
            (self.path / MARKER).unlink(missing_ok=True)
            _remove_if_empty(self.path)  # the run wrote nothing


def write_marker(path: Path) -> None:
    marker = {"version": MARKER_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "host": socket.gethostname()}
    atomic_write_text(path / MARKER, json.dumps(marker) + "\n")


def _start_run(path: Path, old: tuple[str, ...], cfg: Config, split: DataSplit | None = None) -> None:
    """The marker stays in place throughout: a kill at any moment leaves a folder --overwrite recognises."""
    old = tuple(name for name in old if name != MARKER)
    aside = Path(tempfile.mkdtemp(prefix=f"{OURS_PREFIX}old.", dir=path)) if old else None
    if not (path / MARKER).is_file():
        write_marker(path)
    for name in old:
        if os.path.lexists(path / name):
            os.rename(path / name, aside / name)
    write_marker(path)
    if split is not None:
        split.write(path)  # before config.yaml: a run folder with a config that splits has its record
    save_run_files(cfg.model, path)  # a decoder's architecture and tokenizer: the run needs model.weights no more
    atomic_write_text(path / "config.yaml", to_yaml(cfg))
    if aside is not None:
        shutil.rmtree(aside)  # made just above, holding only the old run's files


def _claim_on_main(cfg: Config, path: Path, overwrite: bool, world_size: int) -> tuple[Plan, RunLock, bool]:
    check_location(path)
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    lock = RunLock.acquire(path)  # a folder just made holds no lock
    if created:
        write_marker(path)  # ours from its first moment: a kill before the first files leaves a run folder
    try:
        return decide(cfg, path, overwrite, world_size), lock, created
    except BaseException:
        lock.release()
        if created:
            (path / MARKER).unlink(missing_ok=True)
            _remove_if_empty(path)
        raise


def claim_run_dir(cfg: Config, env: DistEnv, overwrite: bool) -> RunDir:
    """Every rank calls it. Rank 0 checks the folder, takes its lock and decides; nothing is deleted
    (that waits for `commit`). Every rank gets the same RunDir (the lock lives on rank 0) or RunError."""
    path = Path(cfg.output_dir)
    outcome: Any = None
    if env.is_main:
        outcome = _as_outcome(path, lambda: _claim_on_main(cfg, path, overwrite, env.world_size))
    shared = outcome if isinstance(outcome, RunError) or outcome is None else outcome[0]
    shared = broadcast_object(shared, env)
    if isinstance(shared, RunError):
        raise shared
    lock, created = (outcome[1], outcome[2]) if env.is_main else (None, False)
    claimed = RunDir(path, shared.resume_tag, cfg, env, shared.old, created, lock)
    _CLAIMED.append(claimed)
    return claimed
