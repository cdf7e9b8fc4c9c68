"""A checkpoint of a run into the export formats (library code: training and the export command use it).

native: a fp32 `model.safetensors`, `model_config.json` and `labels.json`, loadable with
`weights.load_export` without DeepSpeed; LoRA adapters are merged unless `lora.export: separate`.
hf: a transformers GPT2ForSequenceClassification folder, a Llama / Qwen3 ...ForSequenceClassification one
(hf_export.py), adapters always merged.
onnx: the native folder's JSON files with model.onnx in place of the weights (onnx_export.py), adapters merged.
"""
from __future__ import annotations

from pathlib import Path

from .config import Config, DataConfig, LoraConfig, to_dict
from .families import tokenizer_folder
from .regression import TargetScale
from .hf_export import HF_EXPORT_SUBDIR, save_hf
from .lora import has_lora, merge_lora
from .model import GPTClassifier
from .onnx_export import ONNX_EXPORT_SUBDIR
from .runs import load_checkpoint_model
from .weights import save_export


EXPORT_SUBDIRS = {"native": "export", "hf": HF_EXPORT_SUBDIR, "onnx": ONNX_EXPORT_SUBDIR}  # where training writes each format


def export_checkpoint(cfg: Config, run_dir: Path, tag: str, labels: list, max_length: int,
                      scale: TargetScale | None = None, thresholds: list[float] | None = None) -> list[Path]:
    """Reads the checkpoint's files alone (call it on one rank); writes RUN/export, RUN/export_hf as
    checkpoint.export_formats says and returns those folders."""
    model = load_checkpoint_model(cfg, len(labels), run_dir, tag, run_dir)
    folders = [run_dir / EXPORT_SUBDIRS[f] for f in cfg.checkpoint.export_formats]
    for fmt, folder in zip(cfg.checkpoint.export_formats, folders):
        save_format(fmt, model, folder, cfg, labels, max_length, scale, thresholds, run_dir)
    return folders


def save_format(fmt: str, model: GPTClassifier, out_dir: Path, cfg: Config, labels: list, max_length: int,
                scale: TargetScale | None = None, thresholds: list[float] | None = None,
                run_dir: Path | None = None) -> None:
    """`scale`: task=regression, the targets' mean and deviation (saved with, or folded into, the export);
    `thresholds`: task=multi_label, each label's decision threshold; `run_dir`: the run the model is from (a
    decoder's tokenizer files are its copy)."""
    tokenizer_dir = tokenizer_folder(cfg.model, run_dir) if cfg.model.is_decoder else None  # its tokenizer files
    if fmt == "hf":
        save_hf(model, out_dir, labels, max_length, scale, multi_label=thresholds is not None,
                tokenizer_dir=tokenizer_dir)
    else:
        save_model(model, out_dir, cfg.model.pooling, labels, max_length, cfg.data.padding, cfg.lora,
                   cfg.data, scale, thresholds, fmt, tokenizer_dir)


def save_model(model: GPTClassifier, out_dir: Path, pooling: str, labels: list, max_length: int | None,
               padding: str, lora: LoraConfig | None, data: DataConfig | None = None,
               scale: TargetScale | None = None, thresholds: list[float] | None = None, fmt: str = "native",
               tokenizer_dir: Path | None = None) -> None:
    """LoRA adapters are merged into plain weights unless lora.export=separate (native only); `tokenizer_dir`: a
    Llama / Qwen3 checkpoint folder, whose tokenizer files the export carries."""
    lora, data = lora or LoraConfig(), data or DataConfig()
    keep = has_lora(model) and lora.export == "separate" and fmt == "native"
    if has_lora(model) and not keep:
        model = merge_lora(model)
    save_export(model, out_dir, pooling, labels, max_length=max_length, padding=padding,
                lora=to_dict(lora) if keep else None, long_texts=data.long_texts, head_tokens=data.head_tokens,
                text_pair_column=data.text_pair_column, chunk_stride=data.chunk_stride,
                chunk_aggregate=data.chunk_aggregate, targets=scale.to_json() if scale is not None else None,
                thresholds=thresholds, text_column=data.text_column, fmt=fmt, tokenizer_dir=tokenizer_dir)
