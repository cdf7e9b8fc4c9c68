"""`python -m dist_finetune.predict --model RUN_DIR "some text" ...`, `--input FILE --output FILE`, or
texts on standard input, one per line.

The command line of `classifier.Classifier`: predicted label and class probabilities per text, from an
exported model alone (no DeepSpeed, no run config).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TextIO

import pandas as pd

from .encoding import describe
from .classifier import Classifier, Prediction
from .cli import add_backend_arg, add_device_arg, run_command
from . import bulk_predict
from .distributed import leave
from . import files
from .data import FORMATS, DataError, read_pairs, read_texts
from .formats import optional, write_parquet

PREDICTED = "predicted_label"
STDIN = "-"

DESCRIPTION = "Predict the label of each text with a finetuned model, with the probability of every class."
EPILOG = """examples:
  python -m dist_finetune.predict --model runs/quickstart "WINNER! Claim your prize" "see you at 8"
  python -m dist_finetune.predict --model runs/quickstart --input texts.csv --output predictions.csv
  python -m dist_finetune.predict --model runs/quickstart --input big.parquet --output predictions.parquet --nproc 2
  cat texts.txt | python -m dist_finetune.predict --model runs/quickstart --json

Each text prints one line: the predicted label, then label=probability for every class.
Texts longer than the model's max_length keep their first max_length tokens, as in training.
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dist_finetune.predict", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path, metavar="DIR",
                   help="a run folder (its export/ folder is used) or an export folder")
    p.add_argument("texts", nargs="*", metavar="TEXT",
                   help="texts to classify; none, or -, reads them from standard input, one per line "
                        "(empty lines skipped)")
    p.add_argument("--input", type=Path, metavar="FILE",
                   help="a CSV / TSV / JSONL / Parquet file of texts, instead of TEXT arguments")
    p.add_argument("--text-column", metavar="NAME",
                   help="the column of --input that holds the texts (default: the column the model was trained on, "
                        "else text)")
    p.add_argument("--text-pair-column", metavar="NAME",
                   help="a model of text pairs: the column of --input that holds each row's second text "
                        "(default: the column the model was trained on)")
    p.add_argument("--output", type=Path, metavar="FILE",
                   help="write --input with predicted_label and prob_<label> columns added (CSV / TSV / JSONL / "
                        "Parquet, by extension) instead of printing (default: print to the terminal)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --output file (and OUTPUT.parts, the unfinished shards of an earlier "
                        "run of other settings)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object per text (text, predicted_label, probabilities)")
    p.add_argument("--batch-size", type=int, default=32, metavar="N",
                   help="texts per forward pass; larger is faster and uses more memory (default: 32)")
    add_device_arg(p)
    add_backend_arg(p)
    bulk_predict.add_args(p)
    args = p.parse_args(argv)
    if args.texts and args.input:
        p.error("give texts as arguments or --input FILE, not both")
    if STDIN in args.texts and len(args.texts) > 1:
        p.error("- reads the texts from standard input: give it alone, without other texts")
    if args.output is not None and args.input is None:
        p.error("--output needs --input")
    if args.batch_size < 1:
        p.error(f"--batch-size must be >= 1, got {args.batch_size}")
    bulk_predict.check_args(p, args)
    return args


def read_stdin(stream: TextIO) -> list[str]:
    """One text per line, in order; empty (or blank) lines are skipped and counted on stderr."""
    if stream.isatty():
        print("reading texts from standard input, one per line (end with Ctrl-D)", file=sys.stderr, flush=True)
    lines = [line.rstrip("\r") for line in stream.read().split("\n")]
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last line
    texts = [line for line in lines if line.strip()]
    if not texts:
        raise DataError("standard input held no text: give one text per line, or texts as arguments, or "
                        "--input FILE")
    if len(texts) < len(lines):
        print(f"note: skipped {len(lines) - len(texts)} empty or blank line(s) of standard input", file=sys.stderr)
    return texts


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
    if fmt == "parquet":
        optional("pyarrow", "parquet", f"--output {path}: writing a .parquet file")
    if not path.parent.is_dir():
        raise DataError(f"--output {path}: the folder {path.parent} does not exist; create it first")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise DataError(f"--output {path}: the folder {path.parent} is not writable (predict writes the output and "
                        f"{path.name}.parts there); choose another --output, or make the folder writable")
    longest = os.pathconf(path.parent, "PC_NAME_MAX") - len(".XXXXXXXX.tmp.")  # files.writing's temporary name
    if len(os.fsencode(path.name)) > longest:
        raise DataError(f"--output {path}: the file name is too long ({len(os.fsencode(path.name))} bytes; predict "
                        f"writes beside it under longer names, at most {longest} bytes here): choose a shorter name")
    if _same_file(path, source):
        raise DataError(f"--output {path} is the --input file; writing it would replace the texts it is read "
                        "from: choose another --output")
    if path.is_dir():
        raise DataError(f"--output {path} is a folder; give a file name ({', '.join(FORMATS)})")
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise DataError(f"--output {path} already exists; pass --overwrite to replace it, or choose another "
                        "--output")
    return fmt


def with_predictions(frame: pd.DataFrame, predictions: list[Prediction], labels: list) -> pd.DataFrame:
    """The input columns, then predicted_label and prob_<label> (replacing columns of those names); for a
    regression model, predicted_<target> per target."""
    out = frame.copy()
    if predictions and predictions[0].values is not None:
        for target in labels:
            out[f"predicted_{target}"] = [p.values[target] for p in predictions]
        return out
    if predictions and predictions[0].labels is not None:  # task=multi_label: the labels, joined by |
        out["predicted_labels"] = ["|".join(map(str, p.labels)) for p in predictions]
    else:
        out[PREDICTED] = [p.label for p in predictions]
    for label in labels:
        out[f"prob_{label}"] = [p.probabilities[label] for p in predictions]
    return out


def write_table(frame: pd.DataFrame, path: Path, fmt: str) -> None:
    """Whole or not at all: written under a temporary name, then renamed."""
    with files.writing(path) as tmp:
        if fmt == "parquet":
            write_parquet(frame, tmp)
        elif fmt == "jsonl":
            frame.to_json(tmp, orient="records", lines=True, force_ascii=False, double_precision=15)
        else:
            frame.to_csv(tmp, sep="," if fmt == "csv" else "\t", index=False)


def line(text: str, prediction: Prediction, as_json: bool) -> str:
    if prediction.values is not None:  # task=regression
        if as_json:
            return json.dumps({"text": text, "predicted": prediction.values}, ensure_ascii=False)
        shown = " ".join(text.split())
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        return "\t".join(f"{t}={v:.4f}" for t, v in prediction.values.items()) + f"\t{shown}"
    probs = {str(c): p for c, p in prediction.probabilities.items()}
    label = prediction.label if prediction.labels is None else "|".join(map(str, prediction.labels))
    if as_json:
        chosen = {PREDICTED: label} if prediction.labels is None else {"predicted_labels": prediction.labels}
        return json.dumps({"text": text, **chosen, "probabilities": probs}, ensure_ascii=False)
    shown = " ".join(text.split())
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return f"{label}\t" + "\t".join(f"{c}={p:.4f}" for c, p in probs.items()) + f"\t{shown}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    args.argv = argv  # --nproc N runs this command line again under torchrun
    return run_command(lambda: run(args))


def run(args: argparse.Namespace) -> int:
    fmt = _check_output(args.output, args.input, args.overwrite) if args.output is not None else None
    if fmt is not None and args.nproc > 1:
        return bulk_predict.spawn(getattr(args, "argv", None), args.nproc, args.device)
    ranks = bulk_predict.join_ranks(args.device) if fmt is not None else None  # before the model picks its GPU
    classifier = Classifier.load(args.model, args.device, args.backend)
    text_column = args.text_column or classifier.info.text_column
    pair_column = _pair_column(args, classifier)
    if fmt is not None:  # a file: in shards, on every rank (bulk_predict)
        return bulk_predict.predict_file(bulk_predict.job(args, fmt, text_column, pair_column), classifier, ranks)
    frame, texts = read_texts(args.input, text_column) if args.input else (None, _texts(args.texts))
    pairs = read_pairs(frame, args.input, pair_column) if pair_column is not None else None
    predictions = classifier.predict(texts, args.batch_size, pairs=pairs)
    warn_truncated(sum(p.truncated for p in predictions), len(texts), classifier)
    for text, prediction in zip(texts, predictions):
        print(line(text, prediction, args.json))
    return 0


def _pair_column(args: argparse.Namespace, classifier: Classifier) -> str | None:
    """The column of second texts, for a model of text pairs (which needs --input); else None."""
    if classifier.pairs:
        if args.input is None:
            raise DataError(f"{args.model} classifies text pairs: give --input FILE with a column "
                            f"{classifier.info.text_pair_column!r} of second texts (or --text-pair-column NAME)")
        return args.text_pair_column or classifier.info.text_pair_column
    if args.text_pair_column:
        raise DataError(f"--text-pair-column: {args.model} classifies single texts; drop the flag")
    return None


def warn_truncated(truncated: int, total: int, classifier: Classifier) -> None:
    if truncated:
        n = classifier.max_length
        print(f"warning: {truncated} of {total} text(s) are longer than the model's max_length ({n} tokens) "
              f"and were cut to {describe(n, classifier.info.long_texts, classifier.info.head_tokens, classifier.pairs)}"
              ", as in "
              "training", file=sys.stderr)


def _texts(given: list[str]) -> list[str]:
    return read_stdin(sys.stdin) if given in ([], [STDIN]) else list(given)


if __name__ == "__main__":
    leave(main())
