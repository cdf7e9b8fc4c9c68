"""A classifier as a transformers `GPT2ForSequenceClassification` folder (`--format hf`); a Llama / Qwen3 one as
`LlamaForSequenceClassification` / `Qwen3ForSequenceClassification` (see "Llama / Qwen3" below).

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

Llama / Qwen3: config.json is `DecoderConfig.to_hf()` with the classifier's keys, the tensors take the checkpoints'
own names (`decoder_weights.hf_name`) and `score.weight`, and the tokenizer is the checkpoint's tokenizer.json with
the pad token, right padding and truncation and `PreTrainedTokenizerFast` written into tokenizer_config.json (so
`AutoTokenizer` gives predict's ids). Their final norm is an RMSNorm, which has no bias: the head's bias has nowhere
to go exactly, so a head whose bias is not ~0 (every trained head today, and a regression head whose targets' mean
is not 0) is refused rather than exported with shifted logits.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from . import files
from .decoder import DecoderConfig
from .decoder_weights import hf_name
from .errors import UserError
from .hf_tokenizer import CHAT_TEMPLATE_FILE, CONFIG_FILE, SPECIAL_TOKENS_FILE, TOKENIZER_FILE, HFTokenizer
from .lora import has_lora, merge_lora
from .model import GPTClassifier
from .tokenizer import ENCODER_JSON_FILE, ENDOFTEXT, EOT_ID, PAD_ID, VOCAB_BPE_FILE

HF_EXPORT_SUBDIR = "export_hf"  # where training writes the hf format (checkpoint.export_formats: [hf])
HF_WEIGHTS = "model.safetensors"
HF_CONFIG = "config.json"
HF_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
HF_FILES = (HF_CONFIG, HF_WEIGHTS) + HF_TOKENIZER_FILES
DECODER_TOKENIZER_FILES = (TOKENIZER_FILE, CONFIG_FILE, SPECIAL_TOKENS_FILE, CHAT_TEMPLATE_FILE)  # those it has
HF_EXPORT_FILES = tuple(dict.fromkeys(HF_FILES + DECODER_TOKENIZER_FILES))  # what an hf export folder may hold
DECODER_CLASSES = {"llama": "LlamaForSequenceClassification", "qwen3": "Qwen3ForSequenceClassification"}
LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, which model.py uses
FOLD_TOLERANCE = 1e-5  # the largest logit change the head-bias fold may make (fp32 rounding)


def pad_warning(pad_token: str, pad_id: int) -> str:
    return (f"note: transformers finds the last token by value: a text that ends with a real {pad_token} "
            f"(token {pad_id}, also the pad id) is classified from the token before it, unlike predict")


EOT_WARNING = pad_warning(ENDOFTEXT, EOT_ID)
LONG_TEXTS_NOTE = ("note: the run read long texts with data.long_texts={mode}; transformers' tokenizer truncates "
                   "at the end, so a text longer than max_length is classified from its first tokens there, unlike "
                   "predict")


def export_notes(long_texts: str, pad: tuple[str, int] | None = None) -> list[str]:
    """What a user of the transformers folder must know: printed by export --format hf and by training. `pad`:
    a Llama / Qwen3 tokenizer's (pad token, pad id); GPT-2's <|endoftext|> otherwise."""
    warning = EOT_WARNING if pad is None else pad_warning(*pad)
    return [warning] + ([LONG_TEXTS_NOTE.format(mode=long_texts)] if long_texts != "truncate" else [])


def architecture(config: Any) -> str:
    """The transformers class a model of this backbone config is exported as."""
    return DECODER_CLASSES[config.family] if isinstance(config, DecoderConfig) else "GPT2ForSequenceClassification"


class HfExportError(UserError, ValueError):
    """A model that has no exact transformers equivalent; the message says why and the fix."""


def unsupported(pooling: str, causal_mask: bool, text_pair_column: str | None = None) -> str | None:
    """Why a model with these settings cannot be a GPT2ForSequenceClassification (None: it can)."""
    if text_pair_column is not None:
        return ("a model of text pairs (data.text_pair_column) has no transformers equivalent: the checkpoint's "
                "tokenizer joins a pair without the blank line our model reads between the texts, and truncates it "
                "otherwise; use the native export (predict, Classifier) for it")
    if pooling != "last_token":
        return (f"model.pooling={pooling} has no transformers equivalent (its ...ForSequenceClassification "
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
    return sorted(p.name for p in folder.iterdir() if p.name not in HF_EXPORT_FILES)


def save_hf(model: GPTClassifier, folder: Path, labels: list, max_length: int, scale: Any = None,
            multi_label: bool = False, tokenizer_dir: Path | None = None) -> None:
    """Writes the hf folder as a whole (it replaces `folder`); LoRA adapters are merged into a copy. A regression
    model (`scale`: its targets' TargetScale) gets the scale folded into its head (scaled_head). `tokenizer_dir`: a
    Llama / Qwen3 model's checkpoint folder, whose tokenizer files the folder carries."""
    from safetensors.torch import save_file

    reason = unsupported(model.pooling, model.config.causal)
    if reason:
        raise HfExportError(f"--format hf: {reason}, or export --format native")
    decoder = isinstance(model.config, DecoderConfig)
    if decoder and tokenizer_dir is None:
        raise ValueError("a Llama / Qwen3 hf export needs tokenizer_dir, the checkpoint folder with its tokenizer.json")
    folder = Path(folder)
    foreign = hf_leftovers(folder)
    if foreign:
        raise HfExportError(f"{folder}: holds {', '.join(foreign[:8])}, which is not part of an hf export; "
                            "refusing to replace it: choose another folder")
    if has_lora(model):
        model = merge_lora(copy.deepcopy(model))
    if scale is not None:
        model = scaled_head(model, scale)
    problem = "regression" if scale is not None else "multi_label_classification" if multi_label else (
        "single_label_classification")
    if decoder:
        tokenizer = HFTokenizer.from_folder(tokenizer_dir)
        state, config = decoder_state_dict(model), decoder_config(model, labels, problem, tokenizer.pad_id)
    else:
        state, config = hf_state_dict(model), hf_config(model, labels, problem)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with files.building_dir(folder) as new:
        with files.writing(new / HF_WEIGHTS) as tmp:
            save_file(state, str(tmp), metadata={"format": "pt"})
        files.atomic_write_text(new / HF_CONFIG, _json(config))
        if decoder:
            write_decoder_tokenizer(new, Path(tokenizer_dir), tokenizer.pad_token, max_length)
        else:
            write_tokenizer(new, max_length)


def scaled_head(model: GPTClassifier, scale: Any) -> GPTClassifier:
    """A copy whose head gives the targets' units (a regression model): W' = diag(std) W, b' = std * b + mean."""
    model = copy.deepcopy(model)
    std = torch.tensor(scale.std, dtype=torch.float64)
    if model.head.bias is None:  # model.head_bias=false: the mean still needs a bias (folded on, or refused)
        model.head.bias = torch.nn.Parameter(torch.zeros(model.head.out_features))
    with torch.no_grad():
        weight, bias = model.head.weight.double(), model.head.bias.double()
        model.head.weight.copy_((weight * std[:, None]).float())
        model.head.bias.copy_((bias * std + torch.tensor(scale.mean, dtype=torch.float64)).float())
    return model


def label_keys(labels: list, problem_type: str) -> dict:
    """config.json's num_labels, id2label, label2id and problem_type."""
    names = [str(label) for label in labels]
    if len(set(names)) != len(names):
        raise HfExportError(f"--format hf: labels {labels} are not distinct as strings (transformers' "
                            "id2label keys); rename the classes in the data")
    return {"num_labels": len(names), "id2label": {str(i): n for i, n in enumerate(names)},
            "label2id": {n: i for i, n in enumerate(names)}, "problem_type": problem_type}


def hf_config(model: GPTClassifier, labels: list, problem_type: str = "single_label_classification") -> dict:
    labelled = label_keys(labels, problem_type)
    c = model.config
    return {
        "architectures": ["GPT2ForSequenceClassification"], "model_type": "gpt2",
        "vocab_size": c.vocab_size, "n_positions": c.context_length, "n_embd": c.n_embd,
        "n_layer": c.n_layer, "n_head": c.n_head, "n_inner": None, "activation_function": "gelu_new",
        "resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": c.dropout,
        "layer_norm_epsilon": LAYER_NORM_EPS, "initializer_range": 0.02, "scale_attn_weights": True,
        "use_cache": True, "bos_token_id": EOT_ID, "eos_token_id": EOT_ID, "pad_token_id": PAD_ID,
        **labelled, "dtype": "float32",
    }


def decoder_config(model: GPTClassifier, labels: list, problem_type: str, pad_id: int) -> dict:
    """The checkpoint's own config (DecoderConfig.to_hf) as a ...ForSequenceClassification."""
    c: DecoderConfig = model.config
    return {**c.to_hf(), "architectures": [DECODER_CLASSES[c.family]], "pad_token_id": pad_id,
            **label_keys(labels, problem_type), "dtype": "float32"}


def decoder_state_dict(model: GPTClassifier) -> dict[str, torch.Tensor]:
    """The checkpoints' names (model.layers.0.self_attn.q_proj.weight ...) and score.weight, fp32; a head bias that
    is not ~0 is refused (transformers' score has none, and an RMSNorm no bias to fold it into)."""
    ours = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    bias = ours.pop("head.bias", None)
    gap = 0.0 if bias is None else bias.abs().max().item()
    if not gap <= FOLD_TOLERANCE:
        raise HfExportError(
            f"--format hf: the head's bias (up to {gap:.2g}) has no place in {DECODER_CLASSES[model.config.family]}: "
            "its score layer has no bias and the final RMSNorm none to fold it into, so the logits would move by "
            "that much; export --format native or onnx")
    out = {"score.weight": ours.pop("head.weight")}
    out.update({hf_name(k.removeprefix("backbone.")): v for k, v in ours.items()})
    return {k: v.contiguous() for k, v in out.items()}


def hf_state_dict(model: GPTClassifier) -> dict[str, torch.Tensor]:
    """transformers' names and layouts, fp32; the head's bias folded into ln_f's bias."""
    ours = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    out = {"transformer.wte.weight": ours["backbone.wte.weight"],
           "transformer.wpe.weight": ours["backbone.wpe.weight"],
           "transformer.ln_f.weight": ours["backbone.ln_f.weight"],
           "transformer.ln_f.bias": fold_head_bias(ours["head.weight"], ours.get("head.bias"),
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


def fold_head_bias(weight: torch.Tensor, bias: torch.Tensor | None, ln_bias: torch.Tensor) -> torch.Tensor:
    """ln_f's new bias beta' with W beta' = W beta + b (the head's bias b), checked in fp32."""
    if bias is None or not bias.any():
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


def write_decoder_tokenizer(folder: Path, source: Path, pad_token: str, max_length: int) -> None:
    """The checkpoint's tokenizer files; tokenizer_config.json is told predict's pad token, right padding and
    truncation, and to read tokenizer.json whole (PreTrainedTokenizerFast: transformers 5's model-specific classes
    rebuild the pre-tokenizer, huggingface/transformers#45812)."""
    for name in (TOKENIZER_FILE, CHAT_TEMPLATE_FILE):
        if (source / name).is_file():
            files.atomic_write_bytes(folder / name, (source / name).read_bytes())
    config = {k: v for k, v in _read_json(source / CONFIG_FILE).items() if k != "auto_map"}
    config.update(tokenizer_class="PreTrainedTokenizerFast", pad_token=pad_token, padding_side="right",
                  truncation_side="right", model_max_length=max_length)
    files.atomic_write_text(folder / CONFIG_FILE, _json(config))
    if (source / SPECIAL_TOKENS_FILE).is_file():
        special = {**_read_json(source / SPECIAL_TOKENS_FILE), "pad_token": pad_token}
        files.atomic_write_text(folder / SPECIAL_TOKENS_FILE, _json(special))


def _read_json(path: Path) -> dict:
    """A tokenizer's JSON object (HFTokenizer.from_folder read and checked it already); {} when absent."""
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _json(data: dict) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"
