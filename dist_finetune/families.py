"""Which architecture and tokenizer a `model` config section means: GPT-2 (model.py, the GPT-2 BPE shipped in
the package) or a Llama / Qwen3 decoder (decoder.py, the checkpoint's own tokenizer.json).

The one place that finds a decoder's checkpoint folder (model.weights: a folder, or a hub id in the local
Hugging Face cache) and reads its config.json (model.name=auto) and tokenizer files.

A decoder run is self-contained: when it starts, `save_run_files` writes the architecture (RUN/model_arch.json,
DecoderConfig.to_dict()) and copies the tokenizer files (RUN/tokenizer/). Whatever reads the run afterwards
(evaluate, export, resume) passes `run_dir` and gets those, never model.weights, which may have moved or changed.
"""
from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

from .config import DECODER_PRESETS, ModelConfig
from .decoder import DecoderConfig
from .decoder_weights import read_config
from .files import atomic_write_bytes, atomic_write_text
from .hf_tokenizer import CHAT_TEMPLATE_FILE, CONFIG_FILE, SPECIAL_TOKENS_FILE, TOKENIZER_FILE, HFTokenizer
from .model import GPTConfig
from .tokenizer import GPT2_BPE, GPT2BPE
from .weights import WeightsError, resolve_weights

log = logging.getLogger(__name__)

BackboneConfig = GPTConfig | DecoderConfig
Tokenizer = GPT2BPE | HFTokenizer
RUN_ARCH_FILE = "model_arch.json"  # a decoder run's architecture (DecoderConfig.to_dict())
RUN_TOKENIZER_DIR = "tokenizer"  # a decoder run's copy of its checkpoint's tokenizer files
TOKENIZER_FILES = (TOKENIZER_FILE, CONFIG_FILE, SPECIAL_TOKENS_FILE, CHAT_TEMPLATE_FILE)  # those it has


def weights_folder(mc: ModelConfig) -> Path:
    """A decoder's checkpoint folder (config.json, safetensors, tokenizer.json)."""
    folder = resolve_weights(mc.weights, mc.download, decoder=True)
    if not folder.is_dir():
        raise WeightsError(f"model.weights={mc.weights!r}: model.name={mc.name} needs the checkpoint's folder "
                           f"(config.json, *.safetensors, tokenizer.json), not the file {folder}")
    return folder


def _saved(run_dir: Path | None) -> bool:
    """A run folder that holds its own architecture (runs that predate it read model.weights instead)."""
    return run_dir is not None and (Path(run_dir) / RUN_ARCH_FILE).is_file()


def saved_arch(run_dir: Path) -> DecoderConfig:
    path = Path(run_dir) / RUN_ARCH_FILE
    try:
        return DecoderConfig.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError) as e:  # JSONDecodeError is a ValueError
        raise WeightsError(f"{path}: the run's saved architecture is unreadable ({e}); restore it from a copy "
                           "of the run, or train again") from None


def backbone_config(mc: ModelConfig, run_dir: Path | None = None) -> BackboneConfig:
    """`run_dir`: a run being read back (evaluate, export, resume): a decoder's architecture as the run saved it."""
    if not mc.is_decoder:
        return GPTConfig.from_model_config(mc)
    if _saved(run_dir):
        return saved_arch(run_dir)
    if mc.name in DECODER_PRESETS:
        return DecoderConfig.from_hf(DECODER_PRESETS[mc.name])
    return read_config(weights_folder(mc))


def tokenizer_folder(mc: ModelConfig, run_dir: Path | None = None) -> Path:
    """Where a decoder's tokenizer files are: the run's copy (RUN/tokenizer) when it has one, else model.weights."""
    if _saved(run_dir) and (Path(run_dir) / RUN_TOKENIZER_DIR / TOKENIZER_FILE).is_file():
        return Path(run_dir) / RUN_TOKENIZER_DIR
    return weights_folder(mc)


def load_tokenizer(mc: ModelConfig, run_dir: Path | None = None) -> Tokenizer:
    """GPT-2's BPE, or the decoder's tokenizer (whose ids must fit the model's embedding)."""
    if not mc.is_decoder:
        return GPT2_BPE
    folder = tokenizer_folder(mc, run_dir)
    path = folder / TOKENIZER_FILE  # missing: HFTokenizer.from_folder says so in one line
    return _checked_tokenizer(folder, path.stat().st_mtime_ns if path.is_file() else 0,
                              backbone_config(mc, run_dir).vocab_size, mc.name)


@functools.lru_cache(maxsize=4)  # data, collation and export of one run each ask for it
def _checked_tokenizer(folder: Path, mtime_ns: int, vocab: int, name: str) -> HFTokenizer:
    tokenizer = HFTokenizer.from_folder(folder)
    if tokenizer.vocab_size > vocab:
        raise WeightsError(f"{folder / TOKENIZER_FILE}: token ids up to {tokenizer.vocab_size - 1}, beyond the model's "
                           f"vocab_size={vocab}; the tokenizer is from another checkpoint than model.name={name}")
    return tokenizer


def save_run_files(mc: ModelConfig, run_dir: Path) -> None:
    """Rank 0, when a decoder run starts: its architecture and tokenizer files, so the run needs model.weights
    no more. Each file is written whole; the architecture last (readers take the run's files once it exists)."""
    if not mc.is_decoder:
        return
    source, target = weights_folder(mc), Path(run_dir) / RUN_TOKENIZER_DIR
    target.mkdir(exist_ok=True)
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            atomic_write_bytes(target / name, (source / name).read_bytes())
    atomic_write_text(Path(run_dir) / RUN_ARCH_FILE, json.dumps(backbone_config(mc).to_dict(), indent=1) + "\n")


def saved_arch_differs(mc: ModelConfig, run_dir: Path) -> str | None:
    """A resume: the line saying the weights folder's config.json no longer matches the run's saved architecture
    (the saved one is used), or None."""
    if not (mc.is_decoder and mc.name not in DECODER_PRESETS and _saved(run_dir)):
        return None
    try:
        now = read_config(weights_folder(mc))
    except WeightsError:
        return None  # moved or deleted: the run does not need it
    saved = saved_arch(run_dir)
    if now == saved:
        return None
    keys = [k for k, v in saved.to_dict().items() if now.to_dict()[k] != v]
    return (f"model.weights={mc.weights}: its config.json now differs from the run's saved architecture "
            f"({', '.join(keys)}); using {Path(run_dir) / RUN_ARCH_FILE}")


def block_parameters(arch: BackboneConfig) -> int:
    """Parameters of one transformer block (for the disk and memory estimates)."""
    c = arch.n_embd
    if isinstance(arch, GPTConfig):
        return 12 * c * c + 13 * c
    q, kv = arch.num_attention_heads * arch.head_dim, arch.num_key_value_heads * arch.head_dim
    attn = c * (q + 2 * kv) + q * c + (q + 2 * kv + c) * arch.attention_bias + 2 * arch.head_dim * bool(arch.qk_norm)
    mlp = 3 * c * arch.intermediate_size + (2 * arch.intermediate_size + c) * arch.mlp_bias
    return attn + mlp + 2 * c


def embedding_parameters(arch: BackboneConfig) -> int:
    """Token (and GPT-2's learned position) embeddings; a decoder's untied LM head is never built."""
    if isinstance(arch, GPTConfig):
        return (arch.vocab_size + arch.context_length) * arch.n_embd
    return arch.vocab_size * arch.n_embd + arch.n_embd
