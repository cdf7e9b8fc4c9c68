"""Which architecture and tokenizer a `model` config section means: GPT-2 (model.py, the GPT-2 BPE shipped in
the package) or a Llama / Qwen3 decoder (decoder.py, the checkpoint's own tokenizer.json).

The one place that finds a decoder's checkpoint folder (model.weights: a folder, or a hub id in the local
Hugging Face cache) and reads its config.json (model.name=auto) and tokenizer files.
"""
from __future__ import annotations

import functools
from pathlib import Path

from .config import DECODER_PRESETS, ModelConfig
from .decoder import DecoderConfig
from .decoder_weights import read_config
from .hf_tokenizer import HFTokenizer
from .model import GPTConfig
from .tokenizer import GPT2_BPE, GPT2BPE
from .weights import WeightsError, resolve_weights

BackboneConfig = GPTConfig | DecoderConfig
Tokenizer = GPT2BPE | HFTokenizer


def weights_folder(mc: ModelConfig) -> Path:
    """A decoder's checkpoint folder (config.json, safetensors, tokenizer.json)."""
    folder = resolve_weights(mc.weights, mc.download)
    if not folder.is_dir():
        raise WeightsError(f"model.weights={mc.weights!r}: model.name={mc.name} needs the checkpoint's folder "
                           f"(config.json, *.safetensors, tokenizer.json), not the file {folder}")
    return folder


def backbone_config(mc: ModelConfig) -> BackboneConfig:
    if not mc.is_decoder:
        return GPTConfig.from_model_config(mc)
    if mc.name in DECODER_PRESETS:
        return DecoderConfig.from_hf(DECODER_PRESETS[mc.name])
    return read_config(weights_folder(mc))


@functools.lru_cache(maxsize=4)  # data, collation and export of one run each ask for it
def load_tokenizer(mc: ModelConfig) -> Tokenizer:
    """GPT-2's BPE, or the decoder checkpoint's tokenizer (whose ids must fit the model's embedding)."""
    if not mc.is_decoder:
        return GPT2_BPE
    folder = weights_folder(mc)
    tokenizer = HFTokenizer.from_folder(folder)
    vocab = backbone_config(mc).vocab_size
    if tokenizer.vocab_size > vocab:
        raise WeightsError(f"{folder / 'tokenizer.json'}: {tokenizer.vocab_size} tokens, more than the model's "
                           f"vocab_size={vocab}; the tokenizer is from another checkpoint than model.name={mc.name}")
    return tokenizer


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
