"""Pretrained GPT-2 weights: find them, read them, convert them to our names, load them with checks.

Sources: a local file or folder, the local Hugging Face hub cache, or (only when asked) a download.
Formats: Hugging Face GPT-2 (Conv1D weights stored [in, out]), the chapter's GPTModel
(LLMs-from-scratch: tok_emb, trf_blocks.N.att.W_query ...), and ours (backbone.* / head.*).
Every user error is a WeightsError naming the file or tensor and the fix.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dist_finetune.config import MODEL_PRESETS
from dist_finetune.decoder import DecoderConfig
from dist_finetune.hf_tokenizer import CHAT_TEMPLATE_FILE, CONFIG_FILE, SPECIAL_TOKENS_FILE, TOKENIZER_FILE, HFTokenizer
from dist_finetune.model import GPT, POOLINGS, GPTClassifier, GPTConfig
from dist_finetune.tokenizer import GPT2_BPE, PAD_ID, GPT2BPE
from .encoding import AGGREGATES, LONG_TEXTS, PAIR_SEPARATOR, pair_separator
from . import files
from . import safe_load
from .errors import UserError


class WeightsError(UserError, ValueError):
    """A user error about pretrained weights; the message names the file or tensor and the fix."""


WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
EXPORT_WEIGHTS = "model.safetensors"
EXPORT_CONFIG = "model_config.json"
EXPORT_LABELS = "labels.json"
EXPORT_FILES = (EXPORT_WEIGHTS, EXPORT_CONFIG, EXPORT_LABELS)
ONNX_FILES = ("model.onnx", "model.onnx.data")  # an ONNX export's graph in place of EXPORT_WEIGHTS (onnx_export.py)
EXPORT_TOKENIZER = "gpt2"
# A Llama / Qwen3 export: the checkpoint's tokenizer files, copied beside the weights (those it has).
EXPORT_HF_TOKENIZER = TOKENIZER_FILE
EXPORT_TOKENIZER_FILES = (TOKENIZER_FILE, CONFIG_FILE, SPECIAL_TOKENS_FILE, CHAT_TEMPLATE_FILE)
ALLOW_DOWNLOAD_ENV = "DIST_FINETUNE_ALLOW_DOWNLOAD"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_WRAPPER_KEYS = ("model_state_dict", "state_dict", "module")
_SHOWN = 8  # how many tensor names an error message lists


# ---------------------------------------------------------------- where the weights are


def hub_cache_dir() -> Path:
    """The hub cache as huggingface_hub finds it: HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/..."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    cache = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(cache).expanduser() / "huggingface" / "hub"


def _has_weights(folder: Path) -> bool:
    """GPT-2's single file, or a (Llama / Qwen3) sharded safetensors index."""
    names = (*WEIGHT_FILES, "model.safetensors.index.json")
    return folder.is_dir() and any((folder / name).is_file() for name in names)


def cached_snapshot(repo_id: str, cache: Path | None = None) -> Path | None:
    """The cached snapshot folder of `repo_id` holding weights: refs/main's revision first."""
    repo = (cache or hub_cache_dir()) / f"models--{repo_id.replace('/', '--')}"
    ref = repo / "refs" / "main"
    if ref.is_file():
        snapshot = repo / "snapshots" / ref.read_text().strip()
        if _has_weights(snapshot):
            return snapshot
    snapshots = repo / "snapshots"
    found = [d for d in snapshots.iterdir() if _has_weights(d)] if snapshots.is_dir() else []
    return max(found, key=lambda d: d.stat().st_mtime) if found else None


# A Llama / Qwen3 repository: safetensors (single or sharded), config.json and the tokenizer files, never a .bin.
DECODER_DOWNLOAD = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
                    "model-*.safetensors", TOKENIZER_FILE, CONFIG_FILE, SPECIAL_TOKENS_FILE, CHAT_TEMPLATE_FILE)


def _download(repo_id: str, decoder: bool = False) -> Path:
    """Safetensors when the repo has them, else pytorch_model.bin: never both (gpt2-xl is 6 GB each).
    `decoder`: a Llama / Qwen3 checkpoint (DECODER_DOWNLOAD)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise WeightsError(
            f"model.weights={repo_id!r}: downloading needs huggingface_hub (pip install huggingface_hub)"
        ) from None
    try:
        if decoder:
            return Path(snapshot_download(repo_id=repo_id, allow_patterns=list(DECODER_DOWNLOAD)))
        for weights_file in WEIGHT_FILES:
            folder = Path(snapshot_download(repo_id=repo_id, allow_patterns=[weights_file, "config.json"]))
            if (folder / weights_file).is_file():
                return folder
    except Exception as exc:  # network, auth, unknown repo: all user-fixable
        raise WeightsError(
            f"model.weights={repo_id!r}: download from the Hugging Face hub failed "
            f"({type(exc).__name__}: {exc}). Check the model id and the network, or pass a local folder."
        ) from exc
    raise WeightsError(
        f"model.weights={repo_id!r}: the hub repository has neither model.safetensors nor pytorch_model.bin"
    )


def resolve_weights(spec: str, download: bool = False, decoder: bool = False) -> Path:
    path = Path(spec).expanduser()
    if path.exists():
        return path
    if not _HUB_ID.match(spec):
        raise WeightsError(f"model.weights={spec!r}: no such file or folder")
    cache = hub_cache_dir()
    snapshot = cached_snapshot(spec, cache)
    if snapshot is not None:
        return snapshot
    if download or os.environ.get(ALLOW_DOWNLOAD_ENV) == "1":
        return _download(spec, decoder)
    raise WeightsError(
        f"model.weights={spec!r}: not a local file or folder, and the Hugging Face hub cache ({cache}) "
        f"holds no snapshot of {spec!r} with model.safetensors or pytorch_model.bin. Fix one of: "
        f"(1) pass a local folder holding model.safetensors or pytorch_model.bin "
        f"(model.weights=/path/to/folder); "
        f"(2) pre-populate the cache with `huggingface-cli download {spec}` on a machine with internet "
        f"and copy it here (or point HF_HUB_CACHE at it); "
        f"(3) set model.download=true to download it now."
    )


# ---------------------------------------------------------------- reading


def _weights_file(folder: Path) -> Path:
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    pickles = sorted(p for p in folder.iterdir() if p.suffix in (".pth", ".pt") and p.is_file())
    if len(pickles) == 1:
        return pickles[0]
    if pickles:
        names = ", ".join(p.name for p in pickles)
        raise WeightsError(f"{folder}: several weight files ({names}); set model.weights to one of them")
    held = ", ".join(sorted(p.name for p in folder.iterdir())[:_SHOWN]) or "nothing"
    raise WeightsError(
        f"{folder}: no weights found (looked for model.safetensors, pytorch_model.bin, a single *.pth "
        f"or *.pt); the folder holds {held}"
    )


def _strip_common_prefix(sd: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    if sd and all(k.startswith(prefix) for k in sd):
        return {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _unwrap(obj: Any, file: Path) -> dict[str, Tensor]:
    """A training checkpoint {'model_state_dict': ..., 'optimizer_state_dict': ...} -> the state dict."""
    while isinstance(obj, dict):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict) or not obj:
        raise WeightsError(f"{file}: expected a state dict (name -> tensor), found {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(v, Tensor)]
    if bad:
        raise WeightsError(
            f"{file}: entries {bad[:_SHOWN]} are not tensors; save the weights with "
            "torch.save(model.state_dict(), path)"
        )
    for prefix in ("module.", "_orig_mod."):  # DDP / torch.compile wrappers
        obj = _strip_common_prefix(obj, prefix)
    return obj


def _read_safetensors(file: Path, fix: str) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(file))
    except Exception as exc:  # noqa: BLE001 - one line whatever safetensors raises
        detail = " ".join(str(exc).split())[:200]
        raise WeightsError(f"{file}: cannot read it as a safetensors file ({type(exc).__name__}: {detail}); {fix}") \
            from None


def read_state_dict(path: Path) -> dict[str, Tensor]:
    path = Path(path)
    file = _weights_file(path) if path.is_dir() else path
    if not file.is_file():
        raise WeightsError(f"{file}: no such file")
    fix = "expected a state dict saved with safetensors or torch.save(model.state_dict(), path)"
    if file.suffix == ".safetensors":
        obj: Any = _read_safetensors(file, fix)
    else:
        try:  # tensors and plain data only: a pickle that names a callable is refused, never run
            obj = safe_load.torch_load(file, fix=f"{fix}, not a pickled model object")
        except safe_load.UnsafeFileError as exc:
            raise WeightsError(str(exc)) from None
    return _unwrap(obj, file)


# ---------------------------------------------------------------- converting


_HF_BLOCK_KEY = re.compile(r"^(transformer\.)?h\.\d+\.attn\.c_attn\.weight$")


def detect_format(sd: dict[str, Tensor]) -> str:
    keys = list(sd)
    if any(k.startswith(("backbone.", "head.")) for k in keys):
        return "ours"
    if any(_HF_BLOCK_KEY.match(k) for k in keys):
        return "hf"
    if any(k.startswith("trf_blocks.") for k in keys) or "tok_emb.weight" in sd:
        return "chapter"
    raise WeightsError(
        f"unrecognised state dict (first keys: {keys[:5]}); expected a Hugging Face GPT-2 checkpoint "
        "(h.0.attn.c_attn.weight), a chapter GPTModel state dict (trf_blocks.0.att.W_query.weight) "
        "or one of ours (backbone.wte.weight)"
    )


_HF_BACKBONE = re.compile(r"^(wte|wpe|ln_f|h\.\d+)\.")
_HF_DROPPED = re.compile(r"^lm_head\.weight$|\.attn\.(bias|masked_bias)$")  # tied head; causal-mask buffers
_HF_CONV1D = re.compile(r"\.(c_attn|c_proj|c_fc)\.weight$")


def _from_hf(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for key, t in sd.items():
        k = key.removeprefix("transformer.")
        if _HF_DROPPED.search(k):
            continue
        if not _HF_BACKBONE.match(k):
            out[key] = t  # not ours to map: reported as unexpected
            continue
        if _HF_CONV1D.search(k):
            t = t.t().contiguous()  # Conv1D [in, out] -> Linear [out, in]
        k = re.sub(r"^h\.(\d+)\.", r"blocks.\1.", k)
        k = k.replace(".c_attn.", ".qkv.").replace(".c_proj.", ".proj.").replace(".c_fc.", ".fc.")
        out[f"backbone.{k}"] = t
    return out


_CH_TOP = {
    "tok_emb.weight": "backbone.wte.weight",
    "pos_emb.weight": "backbone.wpe.weight",
    "final_norm.scale": "backbone.ln_f.weight",
    "final_norm.shift": "backbone.ln_f.bias",
}
_CH_BLOCK = {
    "att.out_proj.weight": "attn.proj.weight",
    "att.out_proj.bias": "attn.proj.bias",
    "ff.layers.0.weight": "mlp.fc.weight",
    "ff.layers.0.bias": "mlp.fc.bias",
    "ff.layers.2.weight": "mlp.proj.weight",
    "ff.layers.2.bias": "mlp.proj.bias",
    "norm1.scale": "ln_1.weight",
    "norm1.shift": "ln_1.bias",
    "norm2.scale": "ln_2.weight",
    "norm2.shift": "ln_2.bias",
}
_CH_BLOCK_KEY = re.compile(r"^trf_blocks\.(\d+)\.(.+)$")
_CH_QKV = re.compile(r"^att\.W_(query|key|value)\.(weight|bias)$")


def _from_chapter(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, tuple[str, Tensor]]] = {}
    for key, t in sd.items():
        m = _CH_BLOCK_KEY.match(key)
        if key in _CH_TOP:
            out[_CH_TOP[key]] = t
        elif m and m[2] == "att.mask":
            continue  # the causal-mask buffer
        elif m and _CH_QKV.match(m[2]):
            q = _CH_QKV.match(m[2])
            qkv.setdefault((m[1], q[2]), {})[q[1]] = (key, t)
        elif m and m[2] in _CH_BLOCK:
            out[f"backbone.blocks.{m[1]}.{_CH_BLOCK[m[2]]}"] = t
        elif not key.startswith("out_head."):
            out[key] = t  # not ours to map: reported as unexpected
    for (block, kind), parts in qkv.items():
        if len(parts) == 3:
            fused = torch.cat([parts[n][1] for n in ("query", "key", "value")], dim=0)
            out[f"backbone.blocks.{block}.attn.qkv.{kind}"] = fused
        else:  # incomplete: keep the pieces under their own names; qkv is then reported missing
            out.update(dict(parts.values()))
    out.update(_chapter_head(sd))
    return out


def _chapter_head(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """out_head with vocab rows is the LM head (GPT-2 ties it to wte: dropped); else a classifier head."""
    weight = sd.get("out_head.weight")
    if weight is None:
        return {}
    vocab = sd["tok_emb.weight"].shape[0] if "tok_emb.weight" in sd else 50257
    if weight.shape[0] == vocab:
        return {}
    head = {"head.weight": weight}
    if "out_head.bias" in sd:
        head["head.bias"] = sd["out_head.bias"]
    return head


def to_canonical(sd: dict[str, Tensor], fmt: str | None = None) -> dict[str, Tensor]:
    fmt = fmt or detect_format(sd)
    if fmt == "ours":
        return dict(sd)
    if fmt == "hf":
        return _from_hf(sd)
    if fmt == "chapter":
        return _from_chapter(sd)
    raise ValueError(f"unknown weights format {fmt!r}: hf | chapter | ours")


# ---------------------------------------------------------------- architecture from a checkpoint


def _arch_from_shapes(sd: dict[str, Tensor]) -> dict[str, Any]:
    if "backbone.wte.weight" not in sd or "backbone.wpe.weight" not in sd:
        raise WeightsError("the checkpoint has no token/position embeddings (backbone.wte / backbone.wpe)")
    blocks = {int(m[1]) for k in sd if (m := re.match(r"^backbone\.blocks\.(\d+)\.", k))}
    vocab_size, n_embd = sd["backbone.wte.weight"].shape
    return dict(
        vocab_size=int(vocab_size),
        context_length=int(sd["backbone.wpe.weight"].shape[0]),
        n_embd=int(n_embd),
        n_layer=max(blocks) + 1 if blocks else 0,
        qkv_bias="backbone.blocks.0.attn.qkv.bias" in sd or not blocks,
    )


def _preset_of(arch: dict[str, Any]) -> str | None:
    keys = ("n_layer", "n_embd", "context_length")
    return next((n for n, p in MODEL_PRESETS.items() if all(p[k] == arch[k] for k in keys)), None)


def config_beside(source: Path) -> dict[str, int]:
    """Architecture keys (our names) from a model_config.json (ours) or config.json (HF) beside `source`."""
    folder = source if source.is_dir() else source.parent
    ours, hf = folder / EXPORT_CONFIG, folder / "config.json"
    try:
        if ours.is_file():
            gpt = json.loads(ours.read_text(encoding="utf-8")).get("gpt", {})
            return {k: int(gpt[k]) for k in ("n_head", "n_layer", "n_embd", "context_length") if k in gpt}
        if hf.is_file():
            raw = json.loads(hf.read_text(encoding="utf-8"))
            names = dict(n_head="n_head", n_layer="n_layer", n_embd="n_embd",
                         n_positions="context_length", vocab_size="vocab_size")
            return {ours_k: int(raw[k]) for k, ours_k in names.items() if isinstance(raw.get(k), int)}
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError) as exc:
        raise WeightsError(f"{folder}: cannot read the model config beside the weights ({exc})") from exc
    return {}


def infer_gpt_config(
    sd_canonical: dict[str, Tensor], n_head: int | None = None, source: Path | None = None
) -> GPTConfig:
    """Shapes give everything but n_head: from a config beside `source`, else `n_head`, else the preset."""
    arch = _arch_from_shapes(sd_canonical)
    heads = config_beside(Path(source)).get("n_head") if source is not None else None
    preset = _preset_of(arch)
    heads = heads or n_head or (MODEL_PRESETS[preset]["n_head"] if preset else None)
    if heads is None:
        raise WeightsError(
            f"cannot infer n_head from tensor shapes (n_embd={arch['n_embd']}); put the config.json "
            "beside the weights or pass n_head"
        )
    return GPTConfig(n_head=heads, **arch)


# ---------------------------------------------------------------- loading


@dataclass
class LoadReport:
    source: Path
    format: str
    loaded: list[str]
    missing: list[str]
    unexpected: list[str]
    head_loaded: bool


def _listing(names: list[str]) -> str:
    more = f" ... ({len(names)} in all)" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more


def _describe(arch: dict[str, Any]) -> str:
    return ", ".join(f"{k}={arch[k]}" for k in ("n_layer", "n_embd", "context_length", "vocab_size"))


def _mismatch_error(source: Path, sd: dict[str, Tensor], model: GPTClassifier,
                    shapes: list[str], extra: list[str]) -> WeightsError:
    problems = shapes + ([f"tensors the model has no place for: {_listing(extra)}"] if extra else [])
    try:
        arch = _arch_from_shapes(sd)
        preset = _preset_of(arch)
        holds = f" The checkpoint holds {_describe(arch)}" + (f" (the {preset!r} preset)." if preset else ".")
    except WeightsError:
        holds = ""
    built = _describe(model.config.to_dict())
    return WeightsError(
        f"weights {source} do not fit the model: {'; '.join(problems)}.{holds} The model was built with "
        f"{built}. Set model.name to the checkpoint's preset ({' | '.join(MODEL_PRESETS)}), or use "
        "model.name=custom with model.n_layer / model.n_head / model.n_embd / model.context_length / "
        "model.vocab_size matching the checkpoint."
    )


def _missing_error(source: Path, fmt: str, missing: list[str]) -> WeightsError:
    hint = "the file is incomplete or not a GPT-2 checkpoint"
    if all(k.endswith("attn.qkv.bias") for k in missing):
        hint = "the checkpoint has no attention (qkv) biases: set model.qkv_bias=false"
    return WeightsError(f"weights {source} ({fmt} format) lack backbone tensors: {_listing(missing)}; {hint}")


def _check_n_head(source: Path, model: GPTClassifier) -> None:
    n_head = config_beside(source).get("n_head")
    if n_head is not None and n_head != model.config.n_head:
        raise WeightsError(
            f"weights {source}: the config beside them says n_head={n_head} but the model was built with "
            f"n_head={model.config.n_head}; set model.n_head={n_head} or model.name to the matching preset"
        )


def _read_weights(spec: str, download: bool) -> tuple[Path, dict[str, Tensor], str]:
    """(where the weights are, their raw tensors, their format)."""
    source = resolve_weights(spec, download)
    raw = read_state_dict(source)
    try:
        return source, raw, detect_format(raw)
    except WeightsError as exc:
        raise WeightsError(f"weights {source}: {exc}") from None


def load_pretrained(model: GPTClassifier, spec: str, download: bool = False, head_policy: str = "auto",
                    labels: list | tuple | None = None) -> LoadReport:
    """Backbone strictly (every tensor present, every shape equal); the head only when one fits.

    A transformers GPT2ForSequenceClassification's `score` becomes the head, its rows put in the order
    of `labels` (the data's label map), which must be the checkpoint's id2label labels (hf_import.py).
    A Llama / Qwen3 backbone loads from its checkpoint folder shard by shard (decoder_weights.py); its head is new.
    """
    if not isinstance(model.config, GPTConfig):
        return _load_decoder(model, spec, download, head_policy, labels)
    source, raw, fmt = _read_weights(spec, download)
    sd = to_canonical(raw, fmt)
    if fmt == "hf":
        from .hf_import import SCORE, check_classifier_config, imported_head

        if SCORE in sd:
            check_classifier_config(source)
            score = sd.pop(SCORE)
            if head_policy == "auto":
                sd.update(imported_head(source, score, labels, model.pooling))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}

    shapes = [
        f"tensor {k} has shape {tuple(sd[k].shape)} in the checkpoint but {shape} in the model"
        for k, shape in expected.items()
        if k.startswith("backbone.") and k in sd and tuple(sd[k].shape) != shape
    ]
    extra = [k for k in sd if k.startswith("backbone.") and k not in expected]
    if shapes or extra:
        raise _mismatch_error(source, sd, model, shapes, extra)
    missing_backbone = [k for k in expected if k.startswith("backbone.") and k not in sd]
    if missing_backbone:
        raise _missing_error(source, fmt, missing_backbone)
    _check_n_head(source, model)

    to_load = {k: t for k, t in sd.items() if k.startswith("backbone.")}
    head = {k: sd[k] for k in ("head.weight", "head.bias") if k in sd} if head_policy == "auto" else {}
    if "head.bias" in head and "head.bias" not in expected:
        raise WeightsError(f"{source}: its classifier head has a bias, which model.head_bias=false leaves out; set "
                           "model.head_bias: true to keep it, or model.head=new to train a fresh head")
    head_loaded = "head.weight" in head and all(tuple(t.shape) == expected[k] for k, t in head.items())
    if "head.weight" in head and not head_loaded:
        raise WeightsError(
            f"{source}: its classifier head has {head['head.weight'].shape[0]} classes but the data has "
            f"{expected['head.weight'][0]}; set model.head=new to train a fresh head on this backbone"
        )
    if head_loaded:
        to_load.update(head)
    with torch.no_grad():
        model.load_state_dict(to_load, strict=False)
        if head_loaded and "head.bias" not in head and model.head_linear.bias is not None:
            model.head_linear.bias.zero_()  # a bias-free head: zeros reproduce it
    return LoadReport(
        source=source,
        format=fmt,
        loaded=sorted(to_load),
        missing=[k for k in expected if k not in to_load],
        unexpected=[k for k in sd if k not in to_load],
        head_loaded=head_loaded,
    )


def _load_decoder(model: GPTClassifier, spec: str, download: bool, head_policy: str,
                  labels: list | tuple | None) -> LoadReport:
    """A Llama / Qwen3 backbone, shard by shard; from a transformers Llama/Qwen3ForSequenceClassification (an
    `export --format hf`, say), its score layer too (model.head=auto), rows in the data's label order."""
    from .decoder_weights import load_into  # it imports this module (WeightsError)
    from .hf_export import DECODER_CLASSES
    from .hf_import import SCORE, imported_head

    source = resolve_weights(spec, download, decoder=True)
    score = load_into(model.backbone, source, also=(SCORE,)).get(SCORE)
    loaded = sorted(f"backbone.{name}" for name, _ in model.backbone.named_parameters())
    head_loaded = score is not None and head_policy == "auto"
    if head_loaded:
        kind = DECODER_CLASSES[model.config.family]
        head = imported_head(source, score, labels, model.pooling, kind)["head.weight"]
        linear = model.head_linear
        if tuple(head.shape) != tuple(linear.weight.shape):
            raise WeightsError(f"{source}: its classifier head ({SCORE}) has shape {tuple(head.shape)}, the model's "
                               f"{tuple(linear.weight.shape)}; set model.head=new to train a fresh head")
        with torch.no_grad():
            linear.weight.copy_(head)
            if linear.bias is not None:
                linear.bias.zero_()  # transformers' score has no bias: zeros reproduce it
        loaded += ["head.weight"] + (["head.bias"] if linear.bias is not None else [])
    missing = [] if head_loaded else ["head.bias", "head.weight"]
    return LoadReport(source=source, format="hf", loaded=loaded, missing=missing,
                      unexpected=[SCORE] if score is not None and not head_loaded else [], head_loaded=head_loaded)


def _untied_lm_head(raw: dict[str, Tensor]) -> str | None:
    """The name of an LM head that differs from the token embedding: our LM head is tied, as in GPT-2."""
    for head, emb in (("lm_head.weight", "transformer.wte.weight"), ("lm_head.weight", "wte.weight"),
                      ("out_head.weight", "tok_emb.weight")):
        if head in raw and emb in raw and raw[head].shape == raw[emb].shape and not torch.equal(raw[head], raw[emb]):
            return head
    return None


def load_language_model(spec: str, download: bool = False, n_head: int | None = None) -> GPT:
    """The GPT-2 backbone (eval mode) with its LM head tied to the token embedding (`GPT.lm_logits`).

    The architecture comes from the tensor shapes; n_head from a config beside the weights
    (config.json or our model_config.json), else `n_head`, else the matching GPT-2 preset.
    A classifier head in the file is ignored.
    """
    source, raw, fmt = _read_weights(spec, download)
    untied = _untied_lm_head(raw)
    if untied is not None:
        raise WeightsError(f"weights {source}: {untied} differs from the token embedding; GPT-2 ties the two and "
                           "so does this tool's language-model head, so this model cannot be reproduced here")
    sd = to_canonical(raw, fmt)
    model = GPT(infer_gpt_config(sd, n_head=n_head, source=source))
    backbone = {k.removeprefix("backbone."): t for k, t in sd.items() if k.startswith("backbone.")}
    missing = [f"backbone.{k}" for k in model.state_dict() if k not in backbone]
    if missing:
        raise _missing_error(source, fmt, missing)
    load_state_strict(model, backbone, f"weights {source}", "the file is incomplete or not a GPT-2 checkpoint")
    return model.eval()


# ---------------------------------------------------------------- export folder


def export_leftovers(folder: Path) -> list[str]:
    """What `folder` holds besides an export's own files (nothing when it is absent, empty or an export)."""
    folder = Path(folder)
    if not folder.is_dir():
        return [folder.name] if folder.exists() else []
    return sorted(p.name for p in folder.iterdir() if p.name not in EXPORT_FILES + ONNX_FILES + EXPORT_TOKENIZER_FILES)


def save_export(model: GPTClassifier, folder: Path, pooling: str, labels: list | dict,
                max_length: int | None = None, padding: str = "fixed", lora: dict | None = None,
                long_texts: str = "truncate", head_tokens: int | None = None,
                text_pair_column: str | None = None, chunk_stride: int | None = None,
                chunk_aggregate: str = "mean", targets: dict | None = None,
                thresholds: list[float] | None = None, text_column: str = "text", fmt: str = "native",
                tokenizer_dir: Path | None = None) -> None:
    """model.safetensors (fp32, canonical names) + model_config.json + labels.json (as given); fmt=onnx writes
    model.onnx (onnx_export.py) in place of model.safetensors. A Llama / Qwen3 model also gets the tokenizer
    files of `tokenizer_dir` (its checkpoint folder), so that the export alone predicts.

    model_config.json also references the tokenizer and how training truncated and padded the texts
    (`max_length`, `padding`), so that predictions see the inputs the way training did. `lora` (the
    `lora` config section) is given for a model that keeps its adapters: `load_export` rebuilds them.
    The three files are written into a fresh folder that then replaces `folder` as a whole: a reader or
    a crash never pairs new weights with old labels. A `folder` holding anything else is refused.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder = folder.resolve() if folder.is_symlink() else folder
    foreign = export_leftovers(folder)
    if foreign:
        raise WeightsError(
            f"{folder}: holds {_listing(foreign)}, which is not part of an export; refusing to replace it: "
            "choose another folder for the export, or move those out"
        )
    folder.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    config = {**_architecture_keys(model.config, tokenizer_dir), "num_classes": model.head.out_features,
              "pooling": pooling, "max_length": max_length, "padding": padding,
              "long_texts": long_texts, "head_tokens": head_tokens, "text_column": text_column,
              "text_pair_column": text_pair_column,
              "pair_separator": None if text_pair_column is None else  # the tokenizer's "\n\n" (GPT-2's: 628)
              list(pair_separator(None if tokenizer_dir is None else HFTokenizer.from_folder(tokenizer_dir)))}
    if long_texts == "chunk":
        config.update(chunk_stride=chunk_stride, chunk_aggregate=chunk_aggregate)
    if model.head_linear.bias is None:  # model.head_bias=false
        config["head_bias"] = False
    if targets is not None:  # task=regression: outputs are standardized targets; this turns them back
        config.update(task="regression", targets=targets)
    if thresholds is not None:  # task=multi_label: a sigmoid per label, predicted at its threshold
        config.update(task="multi_label", thresholds=list(thresholds))
    if lora is not None:
        config["lora"] = lora
    if fmt == "onnx":
        config["format"] = "onnx"
    with files.building_dir(folder) as new:
        if fmt == "onnx":
            from .onnx_export import write_onnx

            write_onnx(model, new / ONNX_FILES[0], max_length or model.config.context_length)
        else:
            with files.writing(new / EXPORT_WEIGHTS) as tmp:
                save_file(state, str(tmp), metadata={"format": "pt"})
        files.atomic_write_text(new / EXPORT_CONFIG, json.dumps(config, indent=2) + "\n")
        files.atomic_write_text(new / EXPORT_LABELS, json.dumps(labels, indent=2) + "\n")
        for name in EXPORT_TOKENIZER_FILES if config["tokenizer"] == EXPORT_HF_TOKENIZER else ():
            if (Path(tokenizer_dir) / name).is_file():
                files.atomic_write_text(new / name, (Path(tokenizer_dir) / name).read_text(encoding="utf-8"))


def _architecture_keys(arch: GPTConfig | DecoderConfig, tokenizer_dir: Path | None) -> dict[str, Any]:
    """gpt: GPT-2 and its BPE; decoder: a Llama / Qwen3 (its `family` says which) and its tokenizer.json."""
    if isinstance(arch, GPTConfig):
        return {"gpt": arch.to_dict(), "tokenizer": EXPORT_TOKENIZER, "pad_id": PAD_ID}
    if tokenizer_dir is None:
        raise ValueError("a Llama / Qwen3 export needs tokenizer_dir, the checkpoint folder with its tokenizer.json")
    return {"decoder": arch.to_dict(), "tokenizer": EXPORT_HF_TOKENIZER,
            "pad_id": HFTokenizer.from_folder(tokenizer_dir).pad_id}


def _check_export_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise WeightsError(f"export folder {folder} not found; point to a run's export folder (RUN_DIR/export) "
                           "or write one with python -m dist_finetune.export")
    weights = EXPORT_WEIGHTS if (folder / EXPORT_WEIGHTS).is_file() or not (folder / ONNX_FILES[0]).is_file() \
        else ONNX_FILES[0]
    for name in (weights, EXPORT_CONFIG, EXPORT_LABELS):
        if not (folder / name).is_file():
            raise WeightsError(
                f"{folder}: not an exported model ({name} is missing); an export folder holds "
                f"{EXPORT_WEIGHTS} (or {ONNX_FILES[0]}), {EXPORT_CONFIG} and {EXPORT_LABELS}"
            )


_REEXPORT = "re-export the model (python -m dist_finetune.export --run RUN_DIR --out FOLDER)"
_MAX_EXPORT_BYTES = 100 * 2**30  # an architecture bigger than this is a damaged file, not a model to build
_GPT_INTS = {"vocab_size": 2**24, "context_length": 2**20, "n_embd": 2**16, "n_layer": 1024, "n_head": 1024}
_PADDINGS = ("fixed", "longest", "none")


@dataclass(frozen=True)
class ExportSpec:
    """An export's model_config.json and labels.json, checked: safe to build a model from."""

    gpt: GPTConfig | DecoderConfig  # model_config.json's `gpt` or `decoder` (Llama / Qwen3)
    num_classes: int
    pooling: str
    config: dict[str, Any]  # the whole model_config.json
    labels: list  # class id order
    raw_labels: Any  # labels.json as written


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightsError(f"{path}: not readable JSON ({type(exc).__name__}: {exc}); {_REEXPORT}") from None


def _int_at(path: Path, key: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise WeightsError(f"{path}: {key}={value!r} must be an integer from {low} to {high}; the file is "
                           f"damaged or not an export: {_REEXPORT}")
    return value


def _gpt_config(path: Path, gpt: Any) -> GPTConfig:
    if not isinstance(gpt, dict):
        raise WeightsError(f"{path}: key 'gpt' must be an object of architecture keys; {_REEXPORT}")
    known = {f.name for f in dataclasses.fields(GPTConfig)}
    unknown = sorted(set(gpt) - known)
    if unknown:
        raise WeightsError(f"{path}: gpt has unknown keys {unknown} (known: {sorted(known)}); {_REEXPORT}")
    for key, high in _GPT_INTS.items():
        if key in gpt:
            _int_at(path, f"gpt.{key}", gpt[key], 1, high)
    for key in ("qkv_bias", "causal"):
        if key in gpt and not isinstance(gpt[key], bool):
            raise WeightsError(f"{path}: gpt.{key}={gpt[key]!r} must be true or false; {_REEXPORT}")
    dropout = gpt.get("dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise WeightsError(f"{path}: gpt.dropout={dropout!r} must be a number in [0, 1); {_REEXPORT}")
    config = GPTConfig(**gpt)
    if config.n_embd % config.n_head:
        raise WeightsError(f"{path}: gpt.n_embd={config.n_embd} is not divisible by gpt.n_head={config.n_head}; "
                           f"{_REEXPORT}")
    return config


def _decoder_config(path: Path, decoder: Any) -> DecoderConfig:
    if not isinstance(decoder, dict):
        raise WeightsError(f"{path}: key 'decoder' must be an object of architecture keys; {_REEXPORT}")
    try:
        return DecoderConfig.from_dict(decoder)
    except (TypeError, ValueError) as exc:
        raise WeightsError(f"{path}: decoder: {exc}; {_REEXPORT}") from None


def _fp32_bytes(gpt: GPTConfig | DecoderConfig, num_classes: int) -> int:
    if isinstance(gpt, DecoderConfig):  # counted on the meta device: no memory
        with torch.device("meta"):
            return 4 * sum(p.numel() for p in GPTClassifier(gpt, num_classes).parameters())
    d = gpt.n_embd
    per_block = 12 * d * d + 13 * d
    return 4 * ((gpt.vocab_size + gpt.context_length) * d + gpt.n_layer * per_block + 2 * d + (d + 1) * num_classes)


def _check_model_keys(path: Path, config: dict[str, Any], gpt: GPTConfig | DecoderConfig) -> tuple[int, str]:
    num_classes = _int_at(path, "num_classes", config.get("num_classes"), 1, 2**20)
    pooling = config.get("pooling", "last")
    if pooling not in POOLINGS:
        raise WeightsError(f"{path}: pooling={pooling!r} is not one of {', '.join(POOLINGS)}; {_REEXPORT}")
    if config.get("max_length") is not None:
        _int_at(path, "max_length", config["max_length"], 1, gpt.context_length)
    _int_at(path, "pad_id", config.get("pad_id", PAD_ID), 0, gpt.vocab_size - 1)
    if config.get("padding", "fixed") not in _PADDINGS:
        raise WeightsError(f"{path}: padding={config['padding']!r} is not one of {', '.join(_PADDINGS)}; {_REEXPORT}")
    if config.get("lora") is not None and not isinstance(config["lora"], dict):
        raise WeightsError(f"{path}: lora must be an object (the lora config section); {_REEXPORT}")
    size = _fp32_bytes(gpt, num_classes)
    if size > _MAX_EXPORT_BYTES:
        raise WeightsError(
            f"{path}: gpt (n_layer={gpt.n_layer}, n_embd={gpt.n_embd}, vocab_size={gpt.vocab_size}) describes a "
            f"model of {size / 2**30:.0f} GiB, more than the {_MAX_EXPORT_BYTES // 2**30} GiB this tool loads; "
            f"the file is damaged: {_REEXPORT}"
        )
    return num_classes, pooling


def _label_list(path: Path, raw: Any, num_classes: int, config_path: Path) -> list:
    if isinstance(raw, dict):
        ids = sorted(raw.values(), key=str)
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in raw.values()) or \
                sorted(raw.values()) != list(range(len(raw))):
            raise WeightsError(f"{path}: a {{label: id}} object needs the ids 0..{len(raw) - 1}, each once; "
                               f"got {ids[:_SHOWN]}; {_REEXPORT}")
        labels = [k for k, _ in sorted(raw.items(), key=lambda kv: kv[1])]
    elif isinstance(raw, list):
        labels = raw
        bad = [x for x in raw if isinstance(x, (dict, list)) or x is None]
        if bad:
            raise WeightsError(f"{path}: labels must be strings or numbers, found {bad[0]!r}; {_REEXPORT}")
    else:
        raise WeightsError(f"{path}: expected a list of labels (class id order) or a {{label: id}} object, found "
                           f"{type(raw).__name__}; {_REEXPORT}")
    seen: set = set()
    duplicates = [x for x in labels if x in seen or seen.add(x)]
    if duplicates:
        raise WeightsError(f"{path}: label {duplicates[0]!r} appears twice; each class needs its own label; "
                           f"{_REEXPORT}")
    if len(labels) != num_classes:
        raise WeightsError(f"{path}: {len(labels)} labels, but {config_path} says num_classes={num_classes} (the "
                           f"classifier head's outputs); the two files are from different models: {_REEXPORT}")
    return list(labels)


def read_export_spec(folder: Path) -> ExportSpec:
    """The export's two JSON files, every key checked (types, ranges, the model's size), before any model
    is built; each problem is one WeightsError naming the file, the key and the fix."""
    folder = Path(folder)
    _check_export_folder(folder)
    config_path, labels_path = folder / EXPORT_CONFIG, folder / EXPORT_LABELS
    config = _read_json(config_path)
    if not isinstance(config, dict):
        raise WeightsError(f"{config_path}: expected a JSON object, found {type(config).__name__}; {_REEXPORT}")
    if "decoder" in config:
        gpt = _decoder_config(config_path, config["decoder"])
    elif "gpt" in config:
        gpt = _gpt_config(config_path, config["gpt"])
    else:
        raise WeightsError(f"{config_path}: key 'gpt' (the architecture) is missing; {_REEXPORT}")
    num_classes, pooling = _check_model_keys(config_path, config, gpt)
    raw = _read_json(labels_path)
    labels = _label_list(labels_path, raw, num_classes, config_path)
    return ExportSpec(gpt, num_classes, pooling, config, labels, raw)


def _tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for a damaged header
        raise WeightsError(f"{path}: cannot read it as a safetensors file ({type(exc).__name__}: {exc}); "
                           f"{_REEXPORT}") from None


_CONFIG_KEY_OF = (("backbone.wte.", "gpt.vocab_size / gpt.n_embd"), ("backbone.wpe.", "gpt.context_length"),
                  ("backbone.blocks.", "gpt.n_layer / gpt.n_embd / gpt.qkv_bias"), ("head.", "num_classes"))


def _check_weights_fit(folder: Path, model: GPTClassifier) -> None:
    """Compares the safetensors header with the model (built on the meta device: no memory)."""
    path = folder / EXPORT_WEIGHTS
    shapes = _tensor_shapes(path)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    wrong = [k for k in expected if k in shapes and shapes[k] != expected[k]]
    missing = [k for k in expected if k not in shapes]
    extra = [k for k in shapes if k not in expected]
    for names, what in ((wrong, "has shape {got} but {config} needs {want}"), (missing, "is missing"),
                        (extra, "has no place in the model")):
        if names:
            k = names[0]
            key = next((key for prefix, key in _CONFIG_KEY_OF if k.startswith(prefix)), "gpt")
            told = what.format(got=shapes.get(k), want=expected.get(k), config=EXPORT_CONFIG)
            raise WeightsError(f"{path}: tensor {k} {told} ({len(names)} such tensor(s)); the weights and "
                               f"{EXPORT_CONFIG} ({key}) are from different models: {_REEXPORT}")


def _build_exported(spec: ExportSpec) -> GPTClassifier:
    model = GPTClassifier(spec.gpt, spec.num_classes, spec.pooling, head_bias=spec.config.get("head_bias", True))
    if spec.config.get("lora"):  # exported with lora.export=separate
        from dist_finetune.config import from_dict
        from dist_finetune.lora import apply_lora

        apply_lora(model, from_dict({"lora": spec.config["lora"]}).lora)
    return model


def load_export(folder: Path) -> tuple[GPTClassifier, Any]:
    """The exported classifier (eval mode) and the parsed labels.json."""
    folder = Path(folder)
    spec = read_export_spec(folder)
    if not (folder / EXPORT_WEIGHTS).is_file():
        raise WeightsError(f"{folder} is an ONNX export ({ONNX_FILES[0]}, no {EXPORT_WEIGHTS}): run it with "
                           "--backend onnx (or Classifier.load(..., backend='onnx'))")
    try:
        with torch.device("meta"):
            _check_weights_fit(folder, _build_exported(spec))
        model = _build_exported(spec)
    except (KeyError, TypeError, ValueError) as exc:  # the lora section (ConfigError is a ValueError)
        if isinstance(exc, WeightsError):
            raise
        raise WeightsError(f"{folder / EXPORT_CONFIG}: {exc}; {_REEXPORT}") from None
    state = read_state_dict(folder / EXPORT_WEIGHTS)
    bad = [name for name, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise WeightsError(f"{folder / EXPORT_WEIGHTS} holds non-finite weights ({', '.join(bad[:3])}); it is not "
                           "a usable model: export a good checkpoint again")
    model.load_state_dict(state, strict=True)
    return model.eval(), spec.raw_labels


@dataclass(frozen=True)
class ExportInfo:
    """An export's label list (class id order) and its input recipe."""

    labels: list
    tokenizer: str
    pad_id: int
    max_length: int
    padding: str
    long_texts: str = "truncate"  # how a longer text is cut to max_length (encoding.py)
    head_tokens: int | None = None
    text_pair_column: str | None = None  # a model of text pairs: the column its second texts came from
    chunk_stride: int | None = None  # long_texts=chunk: window starts apart (None: the default of encoding.py)
    chunk_aggregate: str = "mean"
    targets: dict | None = None  # task=regression: {"targets": names, "mean": [...], "std": [...]}
    thresholds: list[float] | None = None  # task=multi_label: each label's decision threshold
    text_column: str = "text"  # the column the texts came from: predict --input's default
    pair_separator: tuple[int, ...] = PAIR_SEPARATOR  # a model of text pairs: the ids training joined them with


def read_export_info(folder: Path) -> ExportInfo:
    """Exports written before the tokenizer keys existed: GPT-2 BPE, fixed padding, the model's context."""
    folder = Path(folder)
    spec = read_export_spec(folder)
    config = spec.config
    info = ExportInfo(spec.labels, config.get("tokenizer", EXPORT_TOKENIZER), config.get("pad_id", PAD_ID),
                      config.get("max_length") or spec.gpt.context_length, config.get("padding", "fixed"),
                      config.get("long_texts", "truncate"), config.get("head_tokens"),
                      config.get("text_pair_column"), config.get("chunk_stride"),
                      config.get("chunk_aggregate", "mean"), config.get("targets"), config.get("thresholds"),
                      config.get("text_column") or "text")
    separator = config.get("pair_separator")
    if info.text_pair_column is not None:  # the export's tokenizer's "\n\n", which training joined the pairs with
        hf = info.tokenizer == EXPORT_HF_TOKENIZER and (folder / TOKENIZER_FILE).is_file()  # else refused below
        expected = list(pair_separator(HFTokenizer.from_folder(folder))) if hf else list(PAIR_SEPARATOR)
        if separator != expected and (hf or info.tokenizer == EXPORT_TOKENIZER):
            raise WeightsError(f"{folder / EXPORT_CONFIG}: pair_separator {separator!r} is not this version's "
                               f"{expected} (the tokenizer's blank line); export the run again with this version")
        if isinstance(separator, list):  # checked above, or the tokenizer is refused below
            info = dataclasses.replace(info, pair_separator=tuple(separator))
    if info.long_texts not in LONG_TEXTS or info.chunk_aggregate not in AGGREGATES:
        raise WeightsError(f"{folder / EXPORT_CONFIG}: long_texts {info.long_texts!r} / chunk_aggregate "
                           f"{info.chunk_aggregate!r} is not one of {' | '.join(LONG_TEXTS)} / "
                           f"{' | '.join(AGGREGATES)}; export the run again with this version")
    if info.tokenizer not in (EXPORT_TOKENIZER, EXPORT_HF_TOKENIZER):
        raise WeightsError(f"{folder / EXPORT_CONFIG}: tokenizer {info.tokenizer!r} is not supported; only "
                           f"{EXPORT_TOKENIZER!r} (the GPT-2 BPE) or {EXPORT_HF_TOKENIZER!r} (the file beside it)")
    if info.tokenizer == EXPORT_HF_TOKENIZER and not (folder / TOKENIZER_FILE).is_file():
        raise WeightsError(f"{folder / TOKENIZER_FILE}: not found, and {folder / EXPORT_CONFIG} names it as the "
                           f"tokenizer; copy the model's tokenizer files there or {_REEXPORT}")
    return info


def export_tokenizer(folder: Path, info: ExportInfo) -> GPT2BPE | HFTokenizer:
    """The tokenizer an export's texts are encoded with (read_export_info checked it is there)."""
    return GPT2_BPE if info.tokenizer == EXPORT_TOKENIZER else HFTokenizer.from_folder(folder)


def load_state_strict(model: GPTClassifier, sd: dict[str, Tensor], source: str, fix: str) -> None:
    """Every tensor present with the model's shape, else one WeightsError naming the first difference."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    shapes = [k for k, shape in expected.items() if k in sd and tuple(sd[k].shape) != shape]
    missing = [k for k in expected if k not in sd]
    extra = [k for k in sd if k not in expected]
    if not (shapes or missing or extra):
        model.load_state_dict(sd, strict=True)
        return
    problems = []
    if shapes:
        more = f" ({len(shapes)} tensors differ)" if len(shapes) > 1 else ""
        problems.append(f"{shapes[0]} has shape {tuple(sd[shapes[0]].shape)} in the checkpoint but "
                        f"{expected[shapes[0]]} in the model{more}")
    if missing:
        problems.append(f"tensors missing from the checkpoint: {_listing(missing)}")
    if extra:
        problems.append(f"tensors the model has no place for: {_listing(extra)}")
    try:
        holds = f" The checkpoint holds {_describe(_arch_from_shapes(sd))}, the model {_describe(model.config.to_dict())}."
    except WeightsError:
        holds = ""
    raise WeightsError(f"{source} does not fit the model: {'; '.join(problems)}.{holds} Fix: {fix}")
