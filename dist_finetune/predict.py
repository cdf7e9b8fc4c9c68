"""`python -m dist_finetune.predict --model RUN_DIR/export "some text" ...` or `--input FILE --output FILE`

Predicted label and class probabilities per text, from an exported model alone (no DeepSpeed, no run
config): texts are tokenized, truncated to the export's max_length and padded as in training.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from .cli import pick_device, run_command
from .distributed import leave
from . import files
from .data import FORMATS, DataError, make_collate, read_texts
from .tokenizer import encode_batch
from .weights import ExportInfo, load_export, read_export_info

PREDICTED = "predicted_label"


@dataclass(frozen=True)
class Predictions:
    labels: list  # the predicted label of each text
    probabilities: list[list[float]]  # per text, one probability per class in `classes` order
    classes: list
    truncated: int  # texts longer than max_length (cut to their first max_length tokens)


def predict(model: torch.nn.Module, info: ExportInfo, texts: list[str], batch_size: int = 32,
            device: torch.device = torch.device("cpu")) -> Predictions:
    tokens = encode_batch(texts)
    for row, ids in enumerate(tokens, 1):
        if not ids:
            raise DataError(f"text {row}: it is empty (zero tokens); give a non-empty text")
    truncated = sum(len(ids) > info.max_length for ids in tokens)
    collate = make_collate(info.padding, info.max_length, info.pad_id)
    if info.padding == "none":  # trained without padding: predict one text at a time
        batch_size = 1
    model = model.to(device).eval()
    probabilities: list[list[float]] = []
    with torch.no_grad():
        for start in range(0, len(tokens), batch_size):
            batch = collate([(ids[: info.max_length], 0) for ids in tokens[start:start + batch_size]])
            logits = model(batch["input_ids"].to(device), batch["lengths"].to(device)).float()
            probabilities += torch.softmax(logits, dim=-1).cpu().tolist()
    predicted = [info.labels[max(range(len(p)), key=p.__getitem__)] for p in probabilities]
    return Predictions(predicted, probabilities, list(info.labels), truncated)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dist_finetune.predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path, help="an export folder (RUN_DIR/export)")
    p.add_argument("texts", nargs="*", help="texts to classify (one line of output each)")
    p.add_argument("--input", type=Path, help="a CSV / TSV / JSONL file of texts")
    p.add_argument("--text-column", default="text", help="--input's text column (default: text)")
    p.add_argument("--output", type=Path, help="where to write --input with predicted_label and prob_<label> added")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    p.add_argument("--json", action="store_true", help="one JSON object per text instead of a text line")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto (default): CUDA when available, else CPU")
    args = p.parse_args(argv)
    if bool(args.texts) == bool(args.input):
        p.error("give texts as arguments or --input FILE (exactly one of the two)")
    if args.output is not None and args.input is None:
        p.error("--output needs --input")
    if args.batch_size < 1:
        p.error(f"--batch-size must be >= 1, got {args.batch_size}")
    return args


def _same_file(a: Path, b: Path) -> bool:
    """One file under two spellings, a symlink or a hard link."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


def _check_output(path: Path, source: Path, overwrite: bool) -> str:
    """Before anything is read: the format, the folder, and no file replaced without --overwrite."""
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"--output {path}: unknown format {path.suffix or '(no extension)'!r}; "
                        f"use one of {', '.join(FORMATS)}")
    if not path.parent.is_dir():
        raise DataError(f"--output {path}: the folder {path.parent} does not exist; create it first")
    if _same_file(path, source):
        raise DataError(f"--output {path} is the --input file; writing it would replace the texts it is read "
                        "from: choose another --output")
    if path.is_dir():
        raise DataError(f"--output {path} is a folder; give a file name ({', '.join(FORMATS)})")
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise DataError(f"--output {path} already exists; pass --overwrite to replace it, or choose another "
                        "--output")
    return fmt


def with_predictions(frame: pd.DataFrame, result: Predictions) -> pd.DataFrame:
    """The input columns, then predicted_label and prob_<label> (replacing columns of those names)."""
    out = frame.copy()
    out[PREDICTED] = result.labels
    for i, label in enumerate(result.classes):
        out[f"prob_{label}"] = [p[i] for p in result.probabilities]
    return out


def write_table(frame: pd.DataFrame, path: Path, fmt: str) -> None:
    """Whole or not at all: written under a temporary name, then renamed."""
    with files.writing(path) as tmp:
        if fmt == "jsonl":
            frame.to_json(tmp, orient="records", lines=True, force_ascii=False, double_precision=15)
        else:
            frame.to_csv(tmp, sep="," if fmt == "csv" else "\t", index=False)


def line(text: str, label, probabilities: list[float], classes: list, as_json: bool) -> str:
    probs = {str(c): p for c, p in zip(classes, probabilities)}
    if as_json:
        return json.dumps({"text": text, PREDICTED: label, "probabilities": probs}, ensure_ascii=False)
    shown = " ".join(text.split())
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return f"{label}\t" + "\t".join(f"{c}={p:.4f}" for c, p in probs.items()) + f"\t{shown}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_command(lambda: run(args))


def run(args: argparse.Namespace) -> int:
    fmt = _check_output(args.output, args.input, args.overwrite) if args.output is not None else None
    info = read_export_info(args.model)
    model, _ = load_export(args.model)
    frame, texts = read_texts(args.input, args.text_column) if args.input else (None, list(args.texts))
    result = predict(model, info, texts, args.batch_size, pick_device(args.device))
    if result.truncated:
        print(f"warning: {result.truncated} of {len(texts)} text(s) are longer than the model's max_length "
              f"({info.max_length} tokens) and were truncated to their first {info.max_length} tokens, as in "
              "training", file=sys.stderr)
    if args.output is not None:
        write_table(with_predictions(frame, result), args.output, fmt)
        print(f"wrote {len(texts)} prediction(s) to {args.output}")
        return 0
    for text, label, probs in zip(texts, result.labels, result.probabilities):
        print(line(text, label, probs, result.classes, args.json))
    return 0


if __name__ == "__main__":
    leave(main())
