"""Tiny random Llama / Qwen3 checkpoints and a tiny trained tokenizer, created with transformers and tokenizers
(offline) for the decoder tests: test_decoder_parity.py and test_decoder_training.py."""
from __future__ import annotations

import json
import random
from pathlib import Path

import tokenizers
import torch
import transformers

VOCAB = 128
LLAMA3_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=64)
# family, tied, extra HF config, sharded
CASES = {
    "llama-untied-llama3rope-bias-sharded": ("llama", False, dict(rope_scaling=LLAMA3_ROPE, attention_bias=True), True),
    "llama-tied": ("llama", True, dict(rope_theta=500000.0), False),
    "qwen3-untied": ("qwen3", False, dict(head_dim=32, rope_theta=1000000.0), False),
    "qwen3-tied-sharded": ("qwen3", True, dict(head_dim=16), True),
}


def hf_config(family: str, tied: bool, vocab_size: int = VOCAB, **extra):
    cls = transformers.LlamaConfig if family == "llama" else transformers.Qwen3Config
    extra = {k: dict(v) if isinstance(v, dict) else v for k, v in extra.items()}  # transformers edits them in place
    return cls(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=tied, initializer_range=0.1,
               bos_token_id=1, eos_token_id=2, **extra)


def make_checkpoint(folder: Path, case: str, seed: int = 0):
    family, tied, extra, sharded = CASES[case]
    torch.manual_seed(seed)
    cls = transformers.LlamaForCausalLM if family == "llama" else transformers.Qwen3ForCausalLM
    model = cls(hf_config(family, tied, **extra)).eval()
    with torch.no_grad():  # norms start at one: make them matter
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(folder, **(dict(max_shard_size="20KB") if sharded else {}))
    return model



WORDS = ["the", "model", "classifies", "spam", "Hello", "world", "quick", "brown", "fox", "don't", "it's"]
ACCENTED = ["naïve", "café", "déjà", "über", "São", "Ελληνικά", "Привет", "façade", "Ünïcödé", "mañana"]
CJK = ["東京", "中文测试", "日本語のテキスト", "한국어", "北京大学", "ひらがな", "漢字"]
EMOJI = ["😀", "🎉", "👩‍💻", "🇫🇷", "❤️", "🤖🤖", "✨"]
SPACES = [" ", "  ", "\t", "\n", "\n\n", "   \t ", " \n "]
PUNCT = [".", ",", "!", "?", "...", "--", "(", ")", "'", '"', ":)"]


def mixed_text(rng: random.Random) -> str:
    pools = [WORDS, WORDS, ACCENTED, CJK, EMOJI, PUNCT]
    parts = []
    for _ in range(rng.randint(0, 14)):
        kind = rng.random()
        if kind < 0.15:
            parts.append(str(rng.randint(0, 10 ** rng.randint(1, 9))) + rng.choice(["", ".5", "%", "-2024"]))
        elif kind < 0.3:
            parts.append(rng.choice(SPACES))
        elif kind < 0.32:
            parts.append("<|end_of_text|>")  # a special token written in the text
        else:
            parts.append(rng.choice(rng.choice(pools)) + rng.choice(["", " ", " ", ""]))
    return "".join(parts)



def train_tokenizer(vocab_size: int = 600):
    """A byte-level BPE with digit splitting (every text encodes) and the Llama 3 style special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rng = random.Random(1)
    corpus = [mixed_text(rng) for _ in range(400)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|begin_of_text|>", "<|end_of_text|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    return tok


def save_tokenizer(tok, folder: Path, bos_template: bool, **kwargs) -> Path:
    from tokenizers import processors

    tok = tokenizers.Tokenizer.from_str(tok.to_str())
    if bos_template:  # Llama 3: <|begin_of_text|> through a template post-processor
        tok.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
            special_tokens=[("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    wrapped = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                                                   eos_token="<|end_of_text|>", **kwargs)
    wrapped.save_pretrained(folder)
    return folder


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        data.pop(key)
    path.write_text(json.dumps(data))


def tokenizer_checkpoint(folder: Path, family: str, tied: bool, tok, seed: int = 0) -> Path:
    """A tiny random decoder whose vocabulary is `tok`'s, saved with it: a folder to train a classifier from.
    Llama: grouped-query attention, Llama 3 RoPE scaling; Qwen3: q/k norms, its own head_dim."""
    torch.manual_seed(seed)
    extra = dict(rope_scaling=LLAMA3_ROPE) if family == "llama" else dict(head_dim=16)
    cls = transformers.LlamaForCausalLM if family == "llama" else transformers.Qwen3ForCausalLM
    cls(hf_config(family, tied, vocab_size=tok.get_vocab_size(), **extra)).save_pretrained(folder)
    if family == "llama":  # Llama 3: <|begin_of_text|> first, no pad token (eos pads)
        return save_tokenizer(tok, folder, bos_template=True)
    return save_tokenizer(tok, folder, bos_template=False, pad_token="<pad>")
