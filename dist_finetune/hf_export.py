"""A classifier as a transformers `GPT2ForSequenceClassification` folder (`--format hf`).

The folder holds `config.json` (a GPT2Config), `model.safetensors` in transformers' names (Conv1D layers
store [in, out], our Linear layers [out, in]) and the GPT-2 tokenizer files, written from the BPE files
the package ships, so `AutoTokenizer` / `pipeline` load it offline and give our token ids.

Two differences from our classifier, and how the export keeps the logits equal:
- transformers' `score` has no bias. Ours is folded exactly into `ln_f`'s bias: `ln_f` feeds only the
  head, and W (beta + d) = W beta + b for d = pinv(W) b whenever W's rows are independent (always for
  fewer classes than n_embd, unless a row is a combination of others: then the export is refused).
- transformers pools the last token that is not the pad id (50256 = `<|endoftext|>`), ours the last real
  token by length: only `model.pooling=last_token` with the causal mask maps; a text that ends with a
  real `<|endoftext|>` is pooled one token earlier by transformers (the warning below).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from . import files
from .errors import UserError
from .lora import has_lora, merge_lora
from .model import GPTClassifier
from .tokenizer import ENCODER_JSON_FILE, ENDOFTEXT, EOT_ID, PAD_ID, VOCAB_BPE_FILE

HF_EXPORT_SUBDIR = "export_hf"  # where training writes the hf format (checkpoint.export_formats: [hf])
HF_WEIGHTS = "model.safetensors"
HF_CONFIG = "config.json"
HF_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
HF_FILES = (HF_CONFIG, HF_WEIGHTS) + HF_TOKENIZER_FILES
LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, which model.py uses
FOLD_TOLERANCE = 1e-5  # the largest logit change the head-bias fold may make (fp32 rounding)
EOT_WARNING = (f"note: transformers finds the last token by value: a text that ends with a real {ENDOFTEXT} "
               f"(token {EOT_ID}, also the pad id) is classified from the token before it, unlike predict")
LONG_TEXTS_NOTE = ("note: the run read long texts with data.long_texts={mode}; transformers' tokenizer truncates "
                   "at the end, so a text longer than max_length is classified from its first tokens there, unlike "
                   "predict")


def export_notes(long_texts: str) -> list[str]:
    """What a user of the transformers folder must know: printed by export --format hf and by training."""
    return [EOT_WARNING] + ([LONG_TEXTS_NOTE.format(mode=long_texts)] if long_texts != "truncate" else [])


class HfExportError(UserError, ValueError):
    """A model that has no exact transformers equivalent; the message says why and the fix."""


def unsupported(pooling: str, causal_mask: bool, text_pair_column: str | None = None) -> str | None:
    """Why a model with these settings cannot be a GPT2ForSequenceClassification (None: it can)."""
    if text_pair_column is not None:
        return ("a model of text pairs (data.text_pair_column) has no transformers equivalent: GPT-2's tokenizer "
                "joins a pair without the blank line our model reads between the texts, and truncates it "
                "otherwise; use the native export (predict, Classifier) for it")
    if pooling != "last_token":
        return (f"model.pooling={pooling} has no transformers equivalent (GPT2ForSequenceClassification "
                "classifies from the last non-pad token); train with model.pooling=last_token")
    if not causal_mask:
        return ("model.causal_mask=false (bidirectional attention) has no transformers equivalent (GPT-2 "
                "attends causally); train with model.causal_mask=true")
    return None


def hf_leftovers(folder: Path) -> list[str]:
    """What `folder` holds besides an hf export's own files (nothing when absent, empty or an hf export)."""
    folder = Path(folder)
    if not folder.is_dir():
        return [folder.name] if folder.exists() else []
    return sorted(p.name for p in folder.iterdir() if p.name not in HF_FILES)


def save_hf(model: GPTClassifier, folder: Path, labels: list, max_length: int, scale: Any = None,
            multi_label: bool = False) -> None:
    """Writes the hf folder as a whole (it replaces `folder`); LoRA adapters are merged into a copy. A regression
    model (`scale`: its targets' TargetScale) gets the scale folded into its head, so transformers' outputs are in
    the targets' units: W' = diag(std) W, b' = std * b + mean."""
    from safetensors.torch import save_file

    reason = unsupported(model.pooling, model.config.causal)
    if reason:
        raise HfExportError(f"--format hf: {reason}, or export --format native")
    folder = Path(folder)
    foreign = hf_leftovers(folder)
    if foreign:
        raise HfExportError(f"{folder}: holds {', '.join(foreign[:8])}, which is not part of an hf export; "
                            "refusing to replace it: choose another folder")
    if has_lora(model):
        model = merge_lora(copy.deepcopy(model))
    if scale is not None:
        model = copy.deepcopy(model)
        std = torch.tensor(scale.std, dtype=torch.float64)
        with torch.no_grad():
            weight, bias = model.head.weight.double(), model.head.bias.double()
            model.head.weight.copy_((weight * std[:, None]).float())
            model.head.bias.copy_((bias * std + torch.tensor(scale.mean, dtype=torch.float64)).float())
    state = hf_state_dict(model)
    problem = "regression" if scale is not None else "multi_label_classification" if multi_label else (
        "single_label_classification")
    config = hf_config(model, labels, problem)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with files.building_dir(folder) as new:
        with files.writing(new / HF_WEIGHTS) as tmp:
            save_file(state, str(tmp), metadata={"format": "pt"})
        files.atomic_write_text(new / HF_CONFIG, _json(config))
        write_tokenizer(new, max_length)


def hf_config(model: GPTClassifier, labels: list, problem_type: str = "single_label_classification") -> dict:
    names = [str(label) for label in labels]
    if len(set(names)) != len(names):
        raise HfExportError(f"--format hf: labels {labels} are not distinct as strings (transformers' "
                            "id2label keys); rename the classes in the data")
    c = model.config
    return {
        "architectures": ["GPT2ForSequenceClassification"], "model_type": "gpt2",
        "vocab_size": c.vocab_size, "n_positions": c.context_length, "n_embd": c.n_embd,
        "n_layer": c.n_layer, "n_head": c.n_head, "n_inner": None, "activation_function": "gelu_new",
        "resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": c.dropout,
        "layer_norm_epsilon": LAYER_NORM_EPS, "initializer_range": 0.02, "scale_attn_weights": True,
        "use_cache": True, "bos_token_id": EOT_ID, "eos_token_id": EOT_ID, "pad_token_id": PAD_ID,
        "num_labels": len(names), "id2label": {str(i): n for i, n in enumerate(names)},
        "label2id": {n: i for i, n in enumerate(names)}, "problem_type": problem_type,
        "dtype": "float32",
    }


def hf_state_dict(model: GPTClassifier) -> dict[str, torch.Tensor]:
    """transformers' names and layouts, fp32; the head's bias folded into ln_f's bias."""
    ours = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    out = {"transformer.wte.weight": ours["backbone.wte.weight"],
           "transformer.wpe.weight": ours["backbone.wpe.weight"],
           "transformer.ln_f.weight": ours["backbone.ln_f.weight"],
           "transformer.ln_f.bias": fold_head_bias(ours["head.weight"], ours["head.bias"],
                                                   ours["backbone.ln_f.bias"]),
           "score.weight": ours["head.weight"]}
    for i in range(model.config.n_layer):
        src, dst = f"backbone.blocks.{i}.", f"transformer.h.{i}."
        for ln in ("ln_1", "ln_2"):
            out[f"{dst}{ln}.weight"], out[f"{dst}{ln}.bias"] = ours[f"{src}{ln}.weight"], ours[f"{src}{ln}.bias"]
        for theirs, mine in (("attn.c_attn", "attn.qkv"), ("attn.c_proj", "attn.proj"),
                             ("mlp.c_fc", "mlp.fc"), ("mlp.c_proj", "mlp.proj")):
            weight = ours[f"{src}{mine}.weight"]
            out[f"{dst}{theirs}.weight"] = weight.t()  # Conv1D: [in, out]
            out[f"{dst}{theirs}.bias"] = ours.get(f"{src}{mine}.bias", torch.zeros(weight.shape[0]))  # qkv_bias=false
    return {k: v.contiguous() for k, v in out.items()}


def fold_head_bias(weight: torch.Tensor, bias: torch.Tensor, ln_bias: torch.Tensor) -> torch.Tensor:
    """ln_f's new bias beta' with W beta' = W beta + b (the head's bias b), checked in fp32."""
    if not bias.any():
        return ln_bias
    w = weight.double()
    folded = (ln_bias.double() + torch.linalg.pinv(w) @ bias.double()).float()
    error = (w @ folded.double() - (w @ ln_bias.double() + bias.double())).abs().max().item()
    if error > FOLD_TOLERANCE:
        raise HfExportError(
            f"--format hf: the head's bias cannot be folded into the model exactly (its weight rows are "
            f"linearly dependent; the logits would change by up to {error:.2g}); export --format native")
    return folded


def write_tokenizer(folder: Path, max_length: int) -> None:
    """vocab.json / merges.txt are the shipped encoder.json / vocab.bpe (the same files the Hub's gpt2 has)."""
    files.atomic_write_bytes(folder / "vocab.json", ENCODER_JSON_FILE.read_bytes())
    files.atomic_write_bytes(folder / "merges.txt", VOCAB_BPE_FILE.read_bytes())
    special = {"bos_token": ENDOFTEXT, "eos_token": ENDOFTEXT, "unk_token": ENDOFTEXT, "pad_token": ENDOFTEXT}
    files.atomic_write_text(folder / "special_tokens_map.json", _json(special))
    config = {
        "tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False, "add_bos_token": False,
        "model_max_length": max_length, "padding_side": "right", "truncation_side": "right",
        "clean_up_tokenization_spaces": False, **special,
        "added_tokens_decoder": {str(EOT_ID): {"content": ENDOFTEXT, "lstrip": False, "normalized": True,
                                               "rstrip": False, "single_word": False, "special": True}},
    }
    files.atomic_write_text(folder / "tokenizer_config.json", _json(config))


def _json(data: dict) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"
