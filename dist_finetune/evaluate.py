"""Exact evaluation across ranks, and `python -m dist_finetune.evaluate --run RUN_DIR ...`.

Every rank evaluates its shard; the loss sum and the confusion matrix travel in one all-reduce, and
every metric is computed from those counts (metrics.py), so 1 and N ranks report the same numbers.

    python -m dist_finetune.evaluate --run RUN_DIR [--split train|val|test | --data FILE]
                                     [--checkpoint best|latest|PATH] [--out FILE.json]
    python -m dist_finetune.evaluate --weights HF_DIR --data FILE [--max-length N] [--out FILE.json]
    torchrun --nproc_per_node=N -m dist_finetune.evaluate -- --run RUN_DIR ...

Under torchrun, put `--` before the arguments (or spell `--run` as `--run-dir`): torchrun reads
`--run` as an abbreviation of its own `--run-path` option.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from .cli import run_command
from .config import AUTO_MODEL, Config, replace
from .decoder import DecoderConfig
from .data import SPLITS, ClassificationDataset, LabelMap, load_eval_file, make_collate, sorted_labels
from .hf_import import POOLING, eval_labels, load_hf_classifier
from .weights import resolve_weights
from .distributed import leave, DistEnv, init_distributed
from .metrics import format_table
from .step import evaluate
from .export import run_thresholds
from .families import load_tokenizer
from .multilabel import format_table as multi_label_table
from .regression import TargetScale, format_table as regression_table
from .report import plot_confusion, plot_scatter, write_json
from .runs import (RunError, reading_run, check_same_labels, load_checkpoint_model, load_run_config,
                   load_run_data, resolve_checkpoint, run_facts)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ---------------------------------------------------------------- the command


EPILOG = """examples:
  python -m dist_finetune.evaluate --run runs/quickstart
  python -m dist_finetune.evaluate --run runs/quickstart --split val --checkpoint latest
  python -m dist_finetune.evaluate --run runs/quickstart --data more.csv --text-column message
  torchrun --nproc_per_node=2 -m dist_finetune.evaluate -- --run runs/quickstart
  python -m dist_finetune.evaluate --weights hub_classifier/ --data test.csv

Prints the metrics and writes them as JSON to RUN_DIR/eval/<split or file stem>.json, with the confusion
matrix as confusion_<name>.png beside it (with --weights: eval/<file stem>.json in the current folder). Under torchrun, put -- before the arguments (or write
--run-dir): torchrun takes --run for its own --run-path.
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m dist_finetune.evaluate", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Measure a trained run on a labelled split or file: accuracy, per-class F1, confusion matrix.")
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--run", "--run-dir", dest="run", type=Path, metavar="RUN_DIR",
                       help="the run folder to evaluate (the training's output_dir)")
    model.add_argument("--weights", metavar="HF_DIR",
                       help="instead of a run: a transformers GPT2ForSequenceClassification folder (or hub id in "
                            "the local cache); needs --data, whose labels must be its id2label labels")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--split", choices=SPLITS,
                       help="a split of the run's own data, as training split it (default: test)")
    which.add_argument("--data", type=Path, metavar="FILE",
                       help="a labelled CSV / TSV / JSONL / Parquet file instead of a split; its labels must be "
                            "the run's")
    p.add_argument("--text-column", metavar="NAME",
                   help="the column of --data that holds the texts (default: the run's data.text_column)")
    p.add_argument("--label-column", metavar="NAME",
                   help="the column of --data that holds the labels (default: the run's data.label_column)")
    p.add_argument("--text-pair-column", metavar="NAME",
                   help="a run trained on text pairs: the column of --data that holds each row's second text "
                        "(default: the run's data.text_pair_column)")
    p.add_argument("--checkpoint", default="best", metavar="best|latest|PATH",
                   help="which weights: best (the best validation score), latest, or a RUN_DIR/checkpoints/step_* "
                        "folder (default: best)")
    p.add_argument("--batch-size", type=int, metavar="N",
                   help="texts per forward pass in each process (default: the run's evaluation batch size)")
    p.add_argument("--max-length", type=int, metavar="N",
                   help="with --weights: tokens per text; longer texts keep their first N (default: the model's "
                        "context length)")
    p.add_argument("--out", type=Path, metavar="FILE",
                   help="the JSON report to write (default: RUN_DIR/eval/<split or file stem>.json)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a report (and its confusion PNG) that an earlier evaluate wrote")
    p.add_argument("--debug", action="store_true",
                   help="run on the CPU even where a GPU is available (default: a GPU when there is one)")
    args = p.parse_args(argv)
    if args.batch_size is not None and args.batch_size < 1:
        p.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.data is None and (args.text_column or args.label_column or args.text_pair_column):
        p.error("--text-column, --label-column and --text-pair-column apply to --data only")
    if args.weights is not None and args.text_pair_column:
        p.error("--text-pair-column: a transformers GPT-2 classifier reads single texts")
    if args.weights is not None and (args.data is None or args.checkpoint != "best"):
        p.error("--weights evaluates a transformers classifier on a labelled file: give --data FILE "
                "(no --split, no --checkpoint)")
    if args.max_length is not None and (args.weights is None or args.max_length < 1):
        p.error("--max-length applies to --weights only and must be >= 1")
    return args


@dataclass
class EvalJob:
    cfg: Config
    model: torch.nn.Module
    dataset: ClassificationDataset
    truncated: int
    name: str  # the split, or the file's stem
    labels: list
    max_length: int
    precision: str
    checkpoint: Path
    scale: TargetScale | None = None  # task=regression: the run's targets' mean and deviation
    thresholds: list[float] | None = None  # task=multi_label: each label's threshold (the run's, tuned or not)


def prepare(args: argparse.Namespace) -> EvalJob:
    """Everything that reads files and can fail on the user's input; runs before any process group."""
    if args.weights is not None:
        return prepare_weights(args)
    run_dir = args.run
    cfg = load_run_config(run_dir)
    if args.batch_size is not None:
        cfg = replace(cfg, [f"eval.batch_size={args.batch_size}"])
    ckpt_run, tag = resolve_checkpoint(run_dir, args.checkpoint)
    scale = None  # task=regression: the targets' scale, from the run's training split
    separator = cfg.data.label_separator if cfg.task == "multi_label" else None
    if args.data is not None:
        facts = run_facts(run_dir, cfg)
        scale = load_run_data(cfg, run_dir).scale if cfg.task == "regression" else None
        text_column = args.text_column or cfg.data.text_column
        label_column = args.label_column or cfg.data.label_column
        pair_column = args.text_pair_column or cfg.data.text_pair_column
        if args.text_pair_column and cfg.data.text_pair_column is None:
            raise RunError(f"--text-pair-column: {run_dir} was trained on single texts, not pairs; drop the flag")
        dataset, truncated = load_eval_file(args.data, text_column, label_column, facts.labels, facts.max_length,
                                            long_texts=cfg.data.long_texts, head_tokens=cfg.data.head_tokens,
                                            pair_column=pair_column, chunk_stride=cfg.data.chunk_stride,
                                            scale=scale, separator=separator,
                                            tokenizer=load_tokenizer(cfg.model, run_dir))
        name, max_length, labels = args.data.stem, facts.max_length, facts.labels
    else:
        split = args.split or "test"
        bundle = load_run_data(cfg, run_dir)  # a split data.train_file: the rows RUN/data_split.json records
        if getattr(bundle, split) is None:
            raise RunError(f"{run_dir} has no {split} split (its config has no data.test_file and splits no test "
                           "rows off data.train_file); evaluate --split val, or a labelled file with --data FILE")
        facts = run_facts(run_dir, cfg, bundle)
        check_same_labels(run_dir, facts.labels, bundle.label_map)
        dataset, truncated, scale = getattr(bundle, split), bundle.truncated[split], bundle.scale
        name, max_length, labels = split, bundle.max_length, bundle.label_map
    model = load_checkpoint_model(cfg, len(labels), ckpt_run, tag, run_dir)
    return EvalJob(cfg, model, dataset, truncated, name, labels.to_json(), max_length, facts.precision,
                   ckpt_run / "checkpoints" / tag, scale, run_thresholds(run_dir, cfg, len(labels)))


def prepare_weights(args: argparse.Namespace) -> EvalJob:
    """A transformers classifier: last_token pooling, padding to the longest text, fp32, no run config (a Llama /
    Qwen3 one: its folder's tokenizer.json, through a model section naming the folder)."""
    folder = resolve_weights(args.weights, decoder=True)
    model, names = load_hf_classifier(str(folder))
    labels = eval_labels(names)
    label_map = LabelMap(tuple(sorted_labels(labels)))
    rows = [labels.index(label) for label in label_map.labels]  # our class ids are the sorted labels
    with torch.no_grad():
        model.head.weight.copy_(model.head.weight[rows].clone())
    max_length = args.max_length or model.config.context_length
    if max_length > model.config.context_length:
        raise RunError(f"--max-length {max_length} is more than the model's context length "
                       f"({model.config.context_length}); give at most that")
    overrides = ["data.padding=longest", f"model.pooling={POOLING}"]
    cfg = replace(Config(), overrides + ([f"eval.batch_size={args.batch_size}"] if args.batch_size else []))
    if isinstance(model.config, DecoderConfig):
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name=AUTO_MODEL, weights=str(folder),
                                                                 head_bias=False))
    dataset, truncated = load_eval_file(args.data, args.text_column or cfg.data.text_column,
                                        args.label_column or cfg.data.label_column, label_map, max_length,
                                        tokenizer=load_tokenizer(cfg.model))
    return EvalJob(cfg, model, dataset, truncated, args.data.stem, label_map.to_json(), max_length, "fp32",
                   Path(args.weights))


def eval_precision(trained: str, device: torch.device) -> str:
    """The run's precision, as DeepSpeed evaluated it, so summary.json's numbers reproduce; but no fp16
    on a CPU, and fp16 on a GPU without bf16 (as training falls back)."""
    if trained == "fp16" and device.type != "cuda":
        return "fp32"
    if trained in ("bf16", "bf16_autocast") and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return "fp16" if trained == "bf16" else "fp32"
    return trained


def run(args: argparse.Namespace, job: EvalJob, env: DistEnv) -> dict[str, Any]:
    precision = eval_precision(job.precision, env.device)
    autocast = precision == "bf16_autocast"  # fp32 weights, bf16 matmuls: as the engine trained it
    model = job.model.to(env.device, torch.float32 if autocast else DTYPES[precision])
    collate = make_collate(job.cfg.data.padding, job.max_length, load_tokenizer(job.cfg.model, args.run).pad_id)
    with torch.autocast(env.device.type, torch.bfloat16, enabled=autocast):
        result = evaluate(model, job.dataset, job.cfg, env, collate, num_classes=len(job.labels), scale=job.scale,
                          thresholds=job.thresholds, label_names=job.labels)
    if job.cfg.task == "single_label":
        result["per_class"] = [{"label": label, **s} for label, s in zip(job.labels, result["per_class"])]
    return {
        "run": None if args.run is None else str(args.run), "checkpoint": str(job.checkpoint),
        "split": None if args.data is not None else job.name, "data": None if args.data is None else str(args.data),
        "labels": job.labels, **result,
        "truncated": job.truncated, "max_length": job.max_length, "precision": precision,
        "world_size": env.world_size,
    }


REPORT_KEYS = ("run", "checkpoint", "labels", "examples")  # and confusion_matrix + accuracy, or per_target + rmse
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_LARGEST_REPORT = 64 * 2**20  # a bigger file is no report of ours: not read


def output_paths(args: argparse.Namespace) -> tuple[Path, Path]:
    """The report JSON and its confusion-matrix PNG (beside it)."""
    name = args.data.stem if args.data is not None else (args.split or "test")
    out = args.out or (Path("eval") if args.run is None else args.run / "eval") / f"{name}.json"
    return out, out.parent / f"confusion_{name}.png"


def _is_our_report(path: Path) -> bool:
    try:
        if not path.is_file() or path.stat().st_size > _LARGEST_REPORT:
            return False
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and all(key in data for key in REPORT_KEYS) and any(
        all(key in data for key in task_keys) for task_keys in (("confusion_matrix", "accuracy"), ("per_target", "rmse"),
                                                                ("per_label", "micro_f1")))


def _is_png(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return path.is_file() and f.read(len(PNG_MAGIC)) == PNG_MAGIC
    except OSError:
        return False


def check_outputs(args: argparse.Namespace) -> None:
    """Before any work: an existing report is replaced only with --overwrite, anything else never."""
    out, png = output_paths(args)
    fix = "choose another --out" if args.out else "pass --out another file"
    if out.is_dir():
        raise RunError(f"--out {out} is a folder; give a file name ending in .json")
    if out.exists() and not _is_our_report(out):
        raise RunError(f"{out} exists and is not an evaluation report written by this command; refusing to "
                       f"replace it: {fix}")
    if png.exists() and not _is_png(png):
        raise RunError(f"{png} (the confusion matrix beside the report) exists and is not a PNG image; refusing "
                       f"to replace it: {fix}")
    if not args.overwrite:
        for path in (out, png):
            if path.exists():
                raise RunError(f"{path} already exists (from an earlier evaluation); pass --overwrite to replace "
                               f"it, or {fix}")


def write_outputs(args: argparse.Namespace, report: dict[str, Any], name: str) -> tuple[Path, Path | None]:
    """Each file whole or not at all (written under a temporary name, then renamed)."""
    out, png = output_paths(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    points = report.pop("points", None)
    write_json(out, report)
    if "per_label" in report:  # task=multi_label: the report's tables say it all
        return out, None
    if points is not None:  # task=regression: predicted against true, where the confusion matrix would be
        plot_scatter(points, report["labels"], png)
    else:
        plot_confusion(report["confusion_matrix"], report["labels"], png,
                       title=f"{name} ({report['examples']} examples)")
    return out, png


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_command(lambda: evaluate_and_report(args))


def evaluate_and_report(args: argparse.Namespace) -> int:
    if args.run is None:  # --weights: no run folder to hold
        return evaluate_held(args)
    with reading_run(args.run):  # no training run may change the folder while it is read
        return evaluate_held(args)


def evaluate_held(args: argparse.Namespace) -> int:
    check_outputs(args)
    job = prepare(args)  # the same on every rank: they read the same files
    env = init_distributed(job.cfg.distributed.timeout_seconds, debug=args.debug or job.cfg.distributed.debug)
    report = run(args, job, env)
    if env.is_main:
        out, png = write_outputs(args, report, job.name)
        what = f"split {job.name}" if args.data is None else f"file {args.data}"
        source = f"{args.run}: checkpoint {job.checkpoint.name}" if args.run else f"weights {args.weights}"
        print(f"{source}, {what}, {env.world_size} rank(s)")
        table = {"regression": regression_table, "multi_label": multi_label_table}.get(job.cfg.task)
        print(table(report) if table else format_table(report, report["labels"]))
        if job.truncated:
            print(f"note: {job.truncated} text(s) longer than max_length={job.max_length} tokens were "
                  "truncated, as in training", file=sys.stderr)
        print(f"wrote {out}" + (f" and {png}" if png is not None else ""))
    return 0


if __name__ == "__main__":
    leave(main())
