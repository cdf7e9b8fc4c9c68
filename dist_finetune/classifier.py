"""Using a finetuned model from Python: `Classifier.load(folder).predict(texts)`.

    from dist_finetune import Classifier

    clf = Classifier.load("runs/quickstart")          # a run folder or its export folder
    for p in clf.predict(["WINNER! Claim your prize", "see you at 8"]):
        print(p.label, p.probabilities)              # spam {'ham': 0.01, 'spam': 0.99}

Needs only the export (no DeepSpeed, no run config). Texts are tokenized with the GPT-2 BPE, cut to the
export's max_length as training cut them (data.long_texts: their first tokens, or head and tail) and padded
as in training. A transformers
GPT2ForSequenceClassification folder loads too: its id2label labels, last_token pooling, the model's
context as max_length, padding to the longest text. An ONNX export (model.onnx) runs under onnxruntime:
`Classifier.load(folder, backend="onnx")`, chosen by itself for a folder that holds only the graph.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .cli import BACKENDS, pick_device
from .data import DataError, make_collate
from .encoding import encode_pairs, fit_example, full_length, windows
from .regression import TargetScale
from .hf_import import load_hf_classifier, transformers_info
from .onnx_export import ONNX_EXPORT_SUBDIR, ONNX_WEIGHTS, load_onnx
from .tokenizer import GPT2_BPE
from .weights import (EXPORT_CONFIG, EXPORT_FILES, EXPORT_WEIGHTS, ExportInfo, WeightsError,
                      export_tokenizer, load_export, read_export_info)

EXPORT_SUBDIR = "export"  # where training writes a run's export


@dataclass(frozen=True)
class Prediction:
    """One text's prediction."""

    label: Any  # the most probable class (as in labels.json)
    index: int  # its class id (position in `Classifier.labels`)
    probabilities: dict[Any, float]  # label -> probability, in class id order; they sum to 1
    truncated: bool  # the text was longer than max_length: only max_length of its tokens were used (long_texts)
    values: dict[str, float] | None = None  # task=regression: target -> predicted value (label None, no probabilities)
    labels: list | None = None  # task=multi_label: every label at or above its threshold (label None; probabilities
    #                              are each label's own sigmoid, not summing to 1)


def is_transformers_folder(path: Path) -> bool:
    """A folder saved by transformers (config.json), not one of our exports (model_config.json)."""
    return (path / "config.json").is_file() and not (path / EXPORT_CONFIG).exists()


def find_export(path: str | Path, backend: str = "auto") -> Path:
    """`path` itself when it is an export folder, else the run folder's export: `path/export`, or `path/export_onnx`
    for the onnx backend (and for auto when only that one exists)."""
    path = Path(path)
    onnx = path / ONNX_EXPORT_SUBDIR
    inner = onnx if backend == "onnx" or (backend == "auto" and onnx.is_dir() and not (path / EXPORT_SUBDIR).exists()) \
        else path / EXPORT_SUBDIR
    if not path.is_dir():
        what = "is not a folder" if path.exists() else "not found"
        raise WeightsError(f"model folder {path} {what}: give a run folder (its export/ is used) or an export "
                           "folder")
    if is_transformers_folder(path) or any((path / name).exists() for name in (*EXPORT_FILES, ONNX_WEIGHTS)):
        return path  # an export folder (checked file by file when it is read)
    if inner.is_dir():
        return inner
    fmt = " --format onnx" if inner == onnx else ""
    raise WeightsError(
        f"no exported model in {path} ({EXPORT_WEIGHTS} not found) nor in {inner} (not found): if {path} is a "
        "run folder, wait for its training to finish (the export is written at the end), or write the export "
        f"with python -m dist_finetune.export --run {path}{fmt} --out {inner}"
    )


def pick_backend(folder: Path, backend: str) -> str:
    """auto: onnx for a folder holding only model.onnx, else torch. A backend the folder cannot serve is refused."""
    has_onnx, has_torch = (folder / ONNX_WEIGHTS).is_file(), not (folder / ONNX_WEIGHTS).is_file() or \
        (folder / EXPORT_WEIGHTS).is_file() or is_transformers_folder(folder)
    if backend not in BACKENDS:
        raise WeightsError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "torch" if has_torch else "onnx"
    if backend == "onnx" and not has_onnx:
        raise WeightsError(f"--backend onnx: {folder} holds no {ONNX_WEIGHTS}; write an ONNX export with python -m "
                           "dist_finetune.export --run RUN_DIR --format onnx --out DIR, or use --backend torch")
    if backend == "torch" and not has_torch:
        raise WeightsError(f"--backend torch: {folder} is an ONNX export ({ONNX_WEIGHTS}, no {EXPORT_WEIGHTS}); use "
                           "--backend onnx (or auto)")
    return backend


class Classifier:
    """An exported classifier, ready to predict: `Classifier.load(folder)`, then `.predict(texts)`."""

    def __init__(self, model: torch.nn.Module, info: ExportInfo, device: torch.device, backend: str = "torch",
                 source: Path | None = None):
        self.model = model.to(device).eval()
        self.info = info
        self.device = device
        self.backend = backend  # torch, or onnx: the model is an onnx_export.OnnxModel
        self.source = source  # the folder it was loaded from
        # GPT-2's BPE, or the tokenizer.json an export of a Llama / Qwen3 model carries
        self.tokenizer = GPT2_BPE if source is None else export_tokenizer(source, info)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "auto", backend: str = "auto") -> Classifier:
        """From an export folder or a run folder (its `export/`); device `auto` (CUDA when available),
        `cpu`, `cuda` or a torch.device; backend `auto`, `torch` or `onnx` (onnxruntime on an ONNX export).
        A missing or damaged export raises a `WeightsError`."""
        folder = find_export(path, backend)
        backend = pick_backend(folder, backend)
        device = device if isinstance(device, torch.device) else pick_device(device)
        if is_transformers_folder(folder):
            model, labels = load_hf_classifier(str(folder))
            info = transformers_info(folder, model, labels)
        else:
            info = read_export_info(folder)  # checks the JSON files before any model is built
            model = load_onnx(folder / ONNX_WEIGHTS, device, len(info.labels), info.max_length, info.pad_id) \
                if backend == "onnx" else load_export(folder)[0]
        return cls(model, info, device, backend, folder)

    @property
    def labels(self) -> list:
        """The classes, in class id order."""
        return list(self.info.labels)

    @property
    def max_length(self) -> int:
        """Tokens of a text the model sees; a longer text is cut as training cut it (`info.long_texts`)."""
        return self.info.max_length

    @property
    def pairs(self) -> bool:
        """The model classifies text pairs: `predict(texts, pairs=...)`."""
        return self.info.text_pair_column is not None

    def predict(self, texts: Sequence[str], batch_size: int = 32, *,
                pairs: Sequence[str] | None = None) -> list[Prediction]:
        """One `Prediction` per text (per text and its pair, for a model of text pairs), in the order given."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if self.pairs != (pairs is not None):
            raise TypeError("this model classifies text pairs: call predict(texts, pairs=second_texts)" if self.pairs
                            else "this model classifies single texts: call predict(texts) without pairs")
        tokens = _encoded(texts, "text", self.tokenizer)
        pair_tokens = _encoded(pairs, "pair", self.tokenizer, second=True) if pairs is not None \
            else [None] * len(tokens)
        if len(pair_tokens) != len(tokens):
            raise ValueError(f"{len(tokens)} texts but {len(pair_tokens)} pairs: give one pair per text")
        examples = list(zip(tokens, pair_tokens))
        rows = self._probabilities(examples, batch_size)
        cut = self.info.long_texts != "chunk"  # chunk reads every token
        return [self._prediction(p, cut and full_length(*example, self.info.pair_separator) > self.max_length)
                for p, example in zip(rows, examples)]

    def _probabilities(self, examples: list[tuple[list[int], list[int] | None]],
                       batch_size: int) -> list[list[float]]:
        """Class probabilities of each example (task=regression: its values in the targets' units); a chunked
        model scores a text from all its windows."""
        info = self.info
        if info.long_texts != "chunk":
            inputs = [fit_example(ids, pair, info.max_length, info.long_texts, info.head_tokens, info.pair_separator)
                      for ids, pair in examples]
            outputs = self._logits(inputs, batch_size)
        else:
            parts = [windows(ids, info.max_length, info.chunk_stride) for ids, _ in examples]
            logits = self._logits([w for part in parts for w in part], batch_size)
            per_text = logits.split([len(part) for part in parts])
            outputs = torch.stack([p.max(0).values if info.chunk_aggregate == "max" else p.mean(0) for p in per_text])
        if info.targets is not None:
            return TargetScale.from_json(info.targets).to_units(outputs.double()).tolist()
        if info.thresholds is not None:
            return torch.sigmoid(outputs).tolist()
        return torch.softmax(outputs, dim=-1).tolist()

    def _logits(self, inputs: list[list[int]], batch_size: int) -> torch.Tensor:
        """fp32 logits (on the CPU) of model inputs already cut to max_length."""
        info = self.info
        collate = make_collate(info.padding, info.max_length, info.pad_id)
        if info.padding == "none":  # trained without padding: one text at a time
            batch_size = 1
        rows = []
        with torch.no_grad():
            for start in range(0, len(inputs), batch_size):
                batch = collate([(ids, 0) for ids in inputs[start:start + batch_size]])
                rows.append(self.model(batch["input_ids"].to(self.device),
                                       batch["lengths"].to(self.device)).float().cpu())
        return torch.cat(rows)

    def _prediction(self, probabilities: list[float], truncated: bool) -> Prediction:
        labels = self.info.labels
        if self.info.targets is not None:  # task=regression: the values
            return Prediction(None, -1, {}, truncated, dict(zip(labels, probabilities)))
        if self.info.thresholds is not None:  # task=multi_label: every label at its threshold
            chosen = [label for label, p, t in zip(labels, probabilities, self.info.thresholds) if p >= t]
            return Prediction(None, -1, dict(zip(labels, probabilities)), truncated, labels=chosen)
        index = max(range(len(probabilities)), key=probabilities.__getitem__)
        return Prediction(labels[index], index, dict(zip(labels, probabilities)), truncated)


def _encoded(texts: Sequence[str], what: str, tokenizer: Any, second: bool = False) -> list[list[int]]:
    """Token ids of a list of strings (`second`: the second texts of pairs, encoded as `encode_pairs` does);
    anything else, or an empty text, is refused naming its position."""
    if isinstance(texts, str):
        raise TypeError(f"predict takes a list of {what}s; for one {what}, write predict([{what}])")
    texts = list(texts)
    for row, text in enumerate(texts, 1):
        if not isinstance(text, str):
            raise TypeError(f"{what} {row} is a {type(text).__name__}, not a str: predict takes a list of strings")
    tokens = encode_pairs(tokenizer, texts) if second else tokenizer.encode_batch(texts)
    for row, ids in enumerate(tokens, 1):
        if not ids:
            raise DataError(f"{what} {row}: it is empty (zero tokens); give a non-empty {what}")
    return tokens
