"""The GPT-2 byte-pair encoding through tiktoken, built from the files shipped in the package.

Nothing here touches the network: tiktoken is given local paths and the same sha256 hashes it
checks for its own `gpt2` encoding (see assets/gpt2/SOURCE.md), so the result is that encoding.
"""
from __future__ import annotations

import functools
from pathlib import Path

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

ASSETS_DIR = Path(__file__).resolve().parent / "assets" / "gpt2"
VOCAB_BPE_FILE = ASSETS_DIR / "vocab.bpe"
ENCODER_JSON_FILE = ASSETS_DIR / "encoder.json"
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"

ENDOFTEXT = "<|endoftext|>"
EOT_ID = 50256
PAD_ID = EOT_ID
VOCAB_SIZE = 50257
ALLOWED_SPECIAL = frozenset({ENDOFTEXT})

try:  # tiktoken's own constant, so the split pattern is exactly that of its `gpt2` encoding
    from tiktoken_ext.openai_public import r50k_pat_str as _PAT_STR
except ImportError:  # older tiktoken releases inline the (equivalent) pattern in gpt2()
    _PAT_STR = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> tiktoken.Encoding:
    """The `gpt2` encoding (50,257 tokens, `<|endoftext|>` = 50256), built offline."""
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(VOCAB_BPE_FILE),
        encoder_json_file=str(ENCODER_JSON_FILE),
        vocab_bpe_hash=VOCAB_BPE_SHA256,
        encoder_json_hash=ENCODER_JSON_SHA256,
    )
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=_PAT_STR,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: EOT_ID},
        explicit_n_vocab=VOCAB_SIZE,
    )


def encode(text: str) -> list[int]:
    """Token ids of `text`; a literal `<|endoftext|>` in it becomes token 50256."""
    return get_tokenizer().encode(text, allowed_special=ALLOWED_SPECIAL)


def encode_batch(texts: list[str]) -> list[list[int]]:
    """`encode` on many texts at once (tiktoken's thread pool); same ids as `encode`."""
    return get_tokenizer().encode_batch(list(texts), allowed_special=ALLOWED_SPECIAL)


def decode(ids: list[int]) -> str:
    return get_tokenizer().decode(list(ids))


class GPT2BPE:
    """The GPT-2 BPE as a tokenizer object, beside hf_tokenizer.HFTokenizer (the same methods and ids as the
    module functions above): callers take the one families.load_tokenizer chose for the model."""

    pad_id = PAD_ID
    eos_id = EOT_ID
    bos_id = None
    padding_side = "right"
    vocab_size = VOCAB_SIZE

    def encode(self, text: str) -> list[int]:
        return encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return encode_batch(texts)

    def decode(self, ids: list[int]) -> str:
        return decode(ids)


GPT2_BPE = GPT2BPE()
