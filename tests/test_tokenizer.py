"""The offline GPT-2 tokenizer against an independent implementation of the same BPE."""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import socket
import tempfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dist_finetune import tokenizer
from dist_finetune.tokenizer import EOT_ID, PAD_ID, decode, encode, encode_batch, get_tokenizer

CORPUS = [
    "Hello world",
    "",
    " ",
    "a",
    "   leading and trailing   ",
    "tabs\tand\t\ttabs",
    "line one\nline two\r\nline three\n\n\nend\n",
    "\n\n\n",
    "multiple     spaces   between words",
    "I'm sure you'll say they've done it, don't you? We'd, she's, THEY'RE, I'M",
    "numbers 0 7 42 123 1234 12345 3.14159 -17 1,000,000 2024-06-01",
    "naïve café résumé coöperate Zürich",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "Привет, мир! Γειά σου Κόσμε! مرحبا بالعالم שלום עולם",
    "emoji 👋🏽 🇺🇸 👨‍👩‍👧‍👦 ❤️ 🤖🤖🤖",
    "combining e\u0301 and a\u0308, zero\u200bwidth, nbsp\u00a0here, ideographic\u3000space",
    "symbols !@#$%^&*()_+-=[]{}|;':\",./<>?`~ \\ ££ €€ ¥",
    "URGENT! You have won a 1 week FREE membership in our £100,000 Prize Jackpot! Txt CLAIM to 81010",
    "<|endoftext|>",
    "before<|endoftext|>after",
    "two <|endoftext|> specials <|endoftext|>",
    "ends with special <|endoftext|>",
    "partial <|endoftext| and <endoftext|> are plain text",
    "code: def f(x):\n    return x ** 2  # square\n",
    "http://example.com/path?query=1&b=2 user@example.com",
    "x" * 500,
    "😀" * 50,
]

_TIKTOKEN_GPT2_URLS = (
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
)


def _hf_reference():
    """transformers' GPT2TokenizerFast built from the same shipped files (Rust `tokenizers` BPE)."""
    transformers = pytest.importorskip("transformers")
    cls = transformers.GPT2TokenizerFast
    vocab, merges = str(tokenizer.ENCODER_JSON_FILE), str(tokenizer.VOCAB_BPE_FILE)
    if "vocab_file" in inspect.signature(cls.__init__).parameters:  # transformers 4.x
        ref = cls(vocab_file=vocab, merges_file=merges)
    else:  # transformers 5.x takes the vocabulary and merges themselves
        with open(vocab, encoding="utf-8") as f:
            vocab_dict = json.load(f)
        with open(merges, encoding="utf-8") as f:
            merge_pairs = [tuple(line.split(" ")) for line in f.read().split("\n")[1:] if line]
        ref = cls(vocab=vocab_dict, merges=merge_pairs)
    assert ref.encode("Hello world") == [15496, 995], "reference tokenizer did not load the vocabulary"
    return ref


@pytest.fixture(scope="module")
def hf_reference():
    return _hf_reference()


def test_known_ids():
    assert encode("Hello world") == [15496, 995]
    assert encode("<|endoftext|>") == [50256]
    assert EOT_ID == PAD_ID == 50256
    assert get_tokenizer().n_vocab == 50257
    assert get_tokenizer().eot_token == 50256


@pytest.mark.parametrize("text", CORPUS, ids=range(len(CORPUS)))
def test_matches_independent_reference(text, hf_reference):
    assert encode(text) == hf_reference.encode(text)


@pytest.mark.parametrize("text", CORPUS, ids=range(len(CORPUS)))
def test_decode_round_trips(text):
    assert decode(encode(text)) == text


def test_batch_matches_single():
    assert encode_batch(CORPUS) == [encode(t) for t in CORPUS]


def test_special_token_inside_text():
    ids = encode("spam<|endoftext|>")
    assert ids[-1] == EOT_ID
    assert ids[:-1] == encode("spam")


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.text(max_size=60))
def test_random_text_matches_reference(text):
    ref = _cached_reference()
    assert encode(text) == ref.encode(text)
    assert decode(encode(text)) == text


_REF = []


def _cached_reference():
    if not _REF:
        _REF.append(_hf_reference())
    return _REF[0]


def test_matches_tiktoken_gpt2_when_available_offline():
    import tiktoken

    cache = (
        os.environ.get("TIKTOKEN_CACHE_DIR")
        or os.environ.get("DATA_GYM_CACHE_DIR")
        or os.path.join(tempfile.gettempdir(), "data-gym-cache")
    )
    keys = [hashlib.sha1(url.encode()).hexdigest() for url in _TIKTOKEN_GPT2_URLS]
    if not all(os.path.exists(os.path.join(cache, k)) for k in keys):
        pytest.skip("tiktoken's own gpt2 files are not cached here and there is no network")
    reference = tiktoken.get_encoding("gpt2")
    for text in CORPUS:
        assert encode(text) == reference.encode(text, allowed_special="all")


def test_building_opens_no_socket(monkeypatch, tmp_path):
    def refuse(*args, **kwargs):
        raise AssertionError("the tokenizer tried to use the network")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # empty cache: must read the shipped files
    get_tokenizer.cache_clear()
    try:
        assert encode("Hello world") == [15496, 995]
    finally:
        get_tokenizer.cache_clear()


def test_tokenizer_is_cached():
    assert get_tokenizer() is get_tokenizer()
