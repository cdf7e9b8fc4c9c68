"""`python -m dist_finetune.export --run RUN_DIR [--checkpoint best|latest|PATH] [--format native|hf|onnx] --out DIR`

Consolidates a DeepSpeed checkpoint (ZeRO 0-3, any world size) into an export format. native: fp32
`model.safetensors`, `model_config.json` (architecture, pooling, tokenizer reference, max_length,
padding) and `labels.json`; loadable with `weights.load_export`, without DeepSpeed. hf: a transformers
GPT2ForSequenceClassification (Llama / Qwen3: Llama- / Qwen3ForSequenceClassification) folder with its tokenizer
(hf_export.py). onnx: model.onnx for onnxruntime beside
the native JSON files (onnx_export.py).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .cli import run_command
from .config import EXPORT_FORMATS
from .distributed import leave
from .checkpoint import checkpoint_dir
from .exporter import save_format
from .families import backbone_config, load_tokenizer
from .onnx_export import check_installed
from .hf_export import HfExportError, architecture, export_notes, hf_leftovers, unsupported
from .runs import (RunError, reading_run, load_checkpoint_model, load_run_config, load_run_data, resolve_checkpoint,
                   run_facts)
from .weights import export_leftovers


EPILOG = """examples:
  python -m dist_finetune.export --run runs/quickstart --out exported/
  python -m dist_finetune.export --run runs/quickstart --checkpoint latest --out exported_latest/
  python -m dist_finetune.export --run runs/quickstart --format hf --out hf_model/
  python -m dist_finetune.export --run runs/quickstart --format onnx --out onnx_model/

The native export folder holds model.safetensors, model_config.json and labels.json. It is what predict
and Classifier.load use, without DeepSpeed. Training already writes the best model to RUN_DIR/export.
--format hf writes a transformers GPT2ForSequenceClassification folder (config.json, model.safetensors,
tokenizer files) for AutoModelForSequenceClassification and pipeline; it needs model.pooling=last_token. A Llama /
Qwen3 run gives a LlamaForSequenceClassification / Qwen3ForSequenceClassification folder when its head has no
bias (transformers' score has none, and RMSNorm has no bias to fold it into); one with a bias is refused.
--format onnx writes model.onnx (dynamic batch and sequence axes, the pooling inside the graph) with the native
JSON files: predict and serve run it under onnxruntime (--backend onnx, chosen by itself for such a folder).
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m dist_finetune.export", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write a checkpoint of a run as a standalone model folder for predict and the Python API.")
    p.add_argument("--run", "--run-dir", dest="run", required=True, type=Path, metavar="RUN_DIR",
                   help="the run folder (the training's output_dir)")
    p.add_argument("--checkpoint", default="best", metavar="best|latest|PATH",
                   help="which weights: best (the best validation score), latest, or a RUN_DIR/checkpoints/step_* "
                        "folder (default: best)")
    p.add_argument("--format", default="native", choices=EXPORT_FORMATS,
                   help="native: our export (predict, Classifier); hf: a transformers "
                        "...ForSequenceClassification folder; onnx: model.onnx for onnxruntime (default: native)")
    p.add_argument("--out", required=True, type=Path, metavar="DIR",
                   help="the folder to write the export into (new or empty)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an export already in --out (a folder holding anything else is never replaced)")
    return p.parse_args(argv)


def check_out(out: Path, overwrite: bool, fmt: str = "native") -> None:
    """Before any work: --out is absent, an empty folder, or (with --overwrite) an export and nothing else."""
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} is a file; pass a folder to write the export into")
    foreign = hf_leftovers(out) if fmt == "hf" else export_leftovers(out)
    if foreign:
        raise RunError(f"--out {out} holds {', '.join(foreign[:8])}, which is not part of an export; refusing to "
                       "replace it: choose another --out (an empty or new folder)")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise RunError(f"--out {out} already holds an export; pass --overwrite to replace it, or choose another "
                       "--out")


def export_run(run_dir: Path, checkpoint: str, out_dir: Path, fmt: str = "native") -> Path:
    cfg = load_run_config(run_dir)
    if fmt == "hf":  # before reading the checkpoint
        reason = unsupported(cfg.model.pooling, cfg.model.causal_mask, cfg.data.text_pair_column)
        if reason:
            raise HfExportError(f"--format hf: {run_dir}: {reason}, or export --format native")
    ckpt_run, tag = resolve_checkpoint(run_dir, checkpoint)
    facts = run_facts(run_dir, cfg)
    model = load_checkpoint_model(cfg, len(facts.labels), ckpt_run, tag, run_dir)
    scale = load_run_data(cfg, run_dir).scale if cfg.task == "regression" else None  # the targets' scale
    save_format(fmt, model, out_dir, cfg, facts.labels.to_json(), facts.max_length, scale,
                run_thresholds(run_dir, cfg, len(facts.labels)), run_dir)
    return checkpoint_dir(ckpt_run) / tag


def run_thresholds(run_dir: Path, cfg, labels: int) -> list[float] | None:
    """task=multi_label: the thresholds the run's summary records (tuned ones), else eval.threshold for each."""
    if cfg.task != "multi_label":
        return None
    try:
        recorded = json.loads((run_dir / "summary.json").read_text(encoding="utf-8")).get("thresholds")
    except (OSError, ValueError, AttributeError):
        recorded = None
    if isinstance(recorded, list) and len(recorded) == labels and all(isinstance(t, float) for t in recorded):
        return recorded
    return [cfg.eval.threshold] * labels


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_command(lambda: export_and_report(args))


def export_and_report(args: argparse.Namespace) -> int:
    check_out(args.out, args.overwrite, args.format)
    if args.format == "onnx":
        check_installed()
    with reading_run(args.run):  # no training run may change the checkpoints while they are read
        source = export_run(args.run, args.checkpoint, args.out, args.format)
    cfg = load_run_config(args.run)
    arch = architecture(backbone_config(cfg.model, args.run)) if args.format == "hf" else ""
    kind = {"hf": f" (transformers {arch})", "onnx": " (ONNX, for onnxruntime)"}
    print(f"exported {source} -> {args.out}{kind.get(args.format, '')}")
    if args.format == "hf":
        print("\n".join(export_notes(cfg.data.long_texts, pad_of(cfg, args.run))))
    return 0


def pad_of(cfg, run_dir: Path) -> tuple[str, int] | None:
    """A Llama / Qwen3 run's (pad token, pad id), which transformers pools by value; None: GPT-2's."""
    if not cfg.model.is_decoder:
        return None
    tokenizer = load_tokenizer(cfg.model, run_dir)
    return tokenizer.pad_token, tokenizer.pad_id


if __name__ == "__main__":
    leave(main())
