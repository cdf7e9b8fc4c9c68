"""Export a checkpoint as one fp32 `model.safetensors` + model config + label map (no DeepSpeed needed to load)."""
from __future__ import annotations

from pathlib import Path

from .checkpoint import consolidated_state_dict
from .config import ModelConfig
from .model import build_model
from .weights import save_export


def export_checkpoint(run_dir: Path, tag: str, out_dir: Path, model_cfg: ModelConfig, labels: list) -> None:
    """Reads the checkpoint's files alone (call it on one rank); writes `out_dir`."""
    state_dict = consolidated_state_dict(run_dir, tag)
    model = build_model(model_cfg, len(labels))
    model.load_state_dict(state_dict, strict=True)
    save_export(model, out_dir, model_cfg.pooling, labels)
