"""A transformers `GPT2ForSequenceClassification` folder as our classifier (and a Llama / Qwen3 one: its backbone
through decoder_weights.py, its tokenizer.json beside it).

Its backbone loads as any Hugging Face GPT-2 checkpoint; `score.weight` [num_labels, n_embd] becomes
our head (with a zero bias: transformers' score has none), and config.json's `id2label` names the rows.
transformers pools the last non-padding token, which is our `last_token` pooling: a head imported into
any other pooling would read a position it was never trained on, so that is refused.
"""
from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .decoder import FAMILIES, DecoderConfig
from .decoder_weights import read_config, read_headers, shard_files, unloaded_decoder
from .hf_export import DECODER_CLASSES
from .model import GPTClassifier
from .hf_tokenizer import HFTokenizer
from .tokenizer import PAD_ID
from .weights import (EXPORT_HF_TOKENIZER, EXPORT_TOKENIZER, ExportInfo, WeightsError, _read_weights,
                      infer_gpt_config, load_pretrained, load_state_strict, resolve_weights, to_canonical)

HF_CLASSIFIER = "GPT2ForSequenceClassification"
SCORE = "score.weight"
POOLING = "last_token"
_GENERIC = re.compile(r"^LABEL_(\d+)$")
# config.json keys whose non-default values change the computation in ways our GPT cannot reproduce.
_ARCH_DEFAULTS = {"activation_function": ("gelu_new", "gelu_pytorch_tanh"), "layer_norm_epsilon": (1e-5,),
                  "scale_attn_weights": (True,), "scale_attn_by_inverse_layer_idx": (False,)}


def _config(source: Path) -> dict[str, Any]:
    path = (source if source.is_dir() else source.parent) / "config.json"
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightsError(f"{path}: not readable JSON ({type(exc).__name__}: {exc})") from None
    return raw if isinstance(raw, dict) else {}


def _check_arch(source: Path, config: dict[str, Any]) -> None:
    for key, allowed in _ARCH_DEFAULTS.items():
        if key in config and config[key] not in allowed:
            raise WeightsError(f"{source}/config.json: {key}={config[key]!r} is not GPT-2's ({allowed[0]!r}); "
                               "this tool's GPT computes only GPT-2's architecture, so the model cannot be loaded")
    n_inner = config.get("n_inner")
    if n_inner is not None and n_inner != 4 * config.get("n_embd", 0):
        raise WeightsError(f"{source}/config.json: n_inner={n_inner} is not 4 x n_embd; this tool's GPT has "
                           "GPT-2's MLP width only, so the model cannot be loaded")


def is_hf_classifier(source: Path, sd: dict[str, Tensor]) -> bool:
    """The weights hold `score.weight`, or config.json names the architecture."""
    return SCORE in sd or HF_CLASSIFIER in (_config(source).get("architectures") or [])


def read_hf_labels(source: Path, num_labels: int) -> list[str]:
    """id2label in class id order; transformers' defaults LABEL_0.. when config.json has none."""
    config = _config(source)
    raw = config.get("id2label")
    where = f"{source}/config.json"
    if raw is None:
        return [f"LABEL_{i}" for i in range(num_labels)]
    if not isinstance(raw, dict) or sorted(map(str, raw)) != sorted(str(i) for i in range(len(raw))):
        raise WeightsError(f"{where}: id2label must map the ids 0..{num_labels - 1} to label names, got {raw!r}")
    names = [str(raw.get(str(i), raw.get(i))) for i in range(len(raw))]  # type: ignore[call-overload]
    if len(names) != num_labels:
        raise WeightsError(f"{where}: id2label has {len(names)} labels but score.weight has {num_labels} rows; "
                           "the config and the weights are from different models")
    if len(set(names)) != len(names):
        raise WeightsError(f"{where}: id2label names a label twice ({names}); each class needs its own name")
    return names


def is_generic(names: Sequence[str]) -> bool:
    """transformers' placeholder names LABEL_0, LABEL_1, ... (the model was saved without label names)."""
    return all(name == f"LABEL_{i}" for i, name in enumerate(names))


def label_rows(source: Path, names: Sequence[str], data_labels: Sequence, kind: str = HF_CLASSIFIER) -> list[int]:
    """For each of our class ids (the data's sorted labels), the checkpoint's score row.

    Labels compare as text (the integer label 1 is the name "1"); placeholder names LABEL_k also match
    the integer labels 0..N-1 (LABEL_k is k). Any other difference is one WeightsError.
    """
    ours = [str(label) for label in data_labels]
    row_of = {name: i for i, name in enumerate(names)}
    if is_generic(names) and sorted(ours) != sorted(names):
        row_of = {str(i): i for i in range(len(names))}
    if len(ours) == len(names) and set(ours) == set(row_of):
        return [row_of[label] for label in ours]
    generic = " (transformers' placeholder names: they match the labels 0..N-1 or the same names)" \
        if is_generic(names) else ""
    raise WeightsError(
        f"weights {source}: its classifier ({kind}) has {len(names)} labels {list(names)} "
        f"(config.json id2label){generic}, but the data has {len(ours)} labels {ours}; use data with the "
        "checkpoint's labels, or set model.head=new to train a fresh head on its backbone")


def imported_head(source: Path, score: Tensor, data_labels: Sequence | None, pooling: str,
                  kind: str = HF_CLASSIFIER) -> dict[str, Tensor]:
    """head.weight (the score rows in our label order) and a zero head.bias. `kind`: the transformers class
    (GPT2ForSequenceClassification, or a Llama / Qwen3 one), for the messages."""
    if pooling != POOLING:
        raise WeightsError(
            f"weights {source}: a {kind} head was trained on the last non-padding token, but "
            f"model.pooling={pooling}; set model.pooling={POOLING}, or model.head=new to train a fresh head")
    names = read_hf_labels(source, score.shape[0])
    rows = label_rows(source, names, data_labels, kind) if data_labels is not None else list(range(len(names)))
    weight = score[rows].clone()
    return {"head.weight": weight, "head.bias": torch.zeros(weight.shape[0], dtype=weight.dtype)}


def check_classifier_config(source: Path) -> None:
    _check_arch(source, _config(source))


def is_decoder_folder(source: Path) -> bool:
    """A Llama / Qwen3 checkpoint folder (config.json's model_type), read by decoder_weights.py."""
    return source.is_dir() and _config(source).get("model_type") in FAMILIES


def load_hf_classifier(spec: str, download: bool = False) -> tuple[GPTClassifier, list[str]]:
    """The classifier (eval mode, `last_token` pooling) and its labels (id2label, class id order); a
    Llama/Qwen3ForSequenceClassification folder too."""
    folder = resolve_weights(spec, download, decoder=True)
    if is_decoder_folder(folder):
        return _load_decoder_classifier(folder)
    source, raw, fmt = _read_weights(spec, download)
    sd = to_canonical(raw, fmt)
    if fmt != "hf" or SCORE not in sd:
        raise WeightsError(f"weights {source}: not a transformers {HF_CLASSIFIER} (no {SCORE}); it holds no "
                           "classifier head: give a folder saved by GPT2ForSequenceClassification.save_pretrained")
    check_classifier_config(source)
    score = sd.pop(SCORE)
    names = read_hf_labels(source, score.shape[0])
    model = GPTClassifier(infer_gpt_config(sd, source=source), len(names), pooling=POOLING)
    state = {**sd, **imported_head(source, score, None, POOLING)}
    load_state_strict(model, state, f"weights {source}", "the folder is incomplete or not a GPT-2 classifier")
    return model.eval(), names


def eval_labels(names: Sequence[str]) -> list:
    """The labels a data file must use: the names, or 0..N-1 for transformers' placeholder names."""
    return list(range(len(names))) if is_generic(names) else list(names)


def _load_decoder_classifier(source: Path) -> tuple[GPTClassifier, list[str]]:
    """Its backbone shard by shard and score.weight as a bias-free head (weights.load_pretrained, rows in id order)."""
    arch = read_config(source)
    score = read_headers(shard_files(source)).get(SCORE)
    if score is None:
        raise WeightsError(f"weights {source}: not a transformers {DECODER_CLASSES[arch.family]} (no {SCORE}); it "
                           "holds no classifier head: give a folder saved by ...ForSequenceClassification."
                           "save_pretrained, or train from it with model.weights (a new head)")
    names = read_hf_labels(source, score[1][0])
    model = GPTClassifier(arch, len(names), pooling=POOLING, head_bias=False,
                          backbone=unloaded_decoder(arch, lm_head=False))
    load_pretrained(model, str(source))
    return model.eval(), names


def transformers_info(folder: Path, model: GPTClassifier, labels: list[str]) -> ExportInfo:
    """How a transformers classifier's texts are encoded: GPT-2's BPE, or the folder's tokenizer.json (its pad
    token); padded to the longest text, cut at the model's context."""
    if isinstance(model.config, DecoderConfig):
        pad_id = HFTokenizer.from_folder(folder).pad_id
        return ExportInfo(labels, EXPORT_HF_TOKENIZER, pad_id, model.config.context_length, "longest")
    return ExportInfo(labels, EXPORT_TOKENIZER, PAD_ID, model.config.context_length, "longest")
