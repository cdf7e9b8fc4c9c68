"""A checkpoint of a run into the export format (library code: training and the export command use it).

The export is a fp32 `model.safetensors`, `model_config.json` and `labels.json`, loadable with
`weights.load_export` without DeepSpeed; LoRA adapters are merged unless `lora.export: separate`.
"""
from __future__ import annotations

from pathlib import Path

from .config import Config, LoraConfig, to_dict
from .lora import has_lora, merge_lora
from .model import GPTClassifier
from .runs import load_checkpoint_model
from .weights import save_export


def export_checkpoint(cfg: Config, run_dir: Path, tag: str, out_dir: Path, labels: list,
                      max_length: int | None) -> None:
    """Reads the checkpoint's files alone (call it on one rank); writes `out_dir`."""
    model = load_checkpoint_model(cfg, len(labels), run_dir, tag, run_dir)
    save_model(model, out_dir, cfg.model.pooling, labels, max_length, cfg.data.padding, cfg.lora)


def save_model(model: GPTClassifier, out_dir: Path, pooling: str, labels: list, max_length: int | None,
               padding: str, lora: LoraConfig | None) -> None:
    """LoRA adapters are merged into plain weights unless lora.export=separate."""
    lora = lora or LoraConfig()
    keep = has_lora(model) and lora.export == "separate"
    if has_lora(model) and not keep:
        model = merge_lora(model)
    save_export(model, out_dir, pooling, labels, max_length=max_length, padding=padding,
                lora=to_dict(lora) if keep else None)
