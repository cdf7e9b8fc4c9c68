"""A run folder read back after training: its config, a checkpoint's weights, its label map and max_length.

Used by the evaluate and export commands. Reads files only: no process group, no DeepSpeed engine.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checkpoint import checkpoint_dir, consolidated_state_dict, read_pointer, verify
from .config import Config, load_config
from .data import DataBundle, LabelMap, load_data
from .model import GPTClassifier, GPTConfig, build_model
from .weights import EXPORT_CONFIG, EXPORT_LABELS, load_state_strict
from .errors import UserError

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
    except Exception as exc:  # noqa: BLE001 - DeepSpeed's reader raises many kinds; the user needs one line
        detail = " ".join(str(exc).split())[:200]
        raise RunError(
            f"checkpoint {folder} cannot be read ({type(exc).__name__}: {detail}); it may be incomplete: "
            "pass another --checkpoint"
        ) from None
    model = build_model(cfg.model, num_classes, cfg.lora)
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


def run_facts(run_dir: Path, cfg: Config, bundle: DataBundle | None = None) -> RunFacts:
    """From the run's records; a run that recorded nothing (stopped early) re-reads its training data
    (or takes `bundle`, the run's data already loaded)."""
    labels, max_length, precision = recorded_facts(run_dir)
    if labels is None or max_length is None:
        bundle = bundle or load_data(cfg.data, GPTConfig.from_model_config(cfg.model).context_length)
        labels = labels or bundle.label_map.to_json()
        max_length = max_length or bundle.max_length
    return RunFacts(LabelMap.from_json(labels), int(max_length), precision or cfg.precision)


def check_same_labels(run_dir: Path, recorded: LabelMap, rebuilt: LabelMap) -> None:
    if recorded != rebuilt:
        raise RunError(
            f"{run_dir}: the run was trained with labels {list(recorded.labels)!r} but its data files now give "
            f"{list(rebuilt.labels)!r}; restore the training data, or evaluate the files with --data"
        )
