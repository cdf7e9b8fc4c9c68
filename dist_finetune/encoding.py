"""How a text longer than `max_length` tokens is cut to fit (`data.long_texts`), the same in training,
evaluation and prediction.

- `truncate`: the first `max_length` tokens (the chapter's recipe).
- `head_tail`: the first `head` tokens and the last `max_length - head` tokens. The middle of a long message is
  the part least likely to decide its class: the opening names the subject, the end holds the request, the
  signature, the call to action. Sun et al. (2019, "How to Fine-Tune BERT for Text Classification?") found
  head + tail best for long reviews, with about a quarter of the budget at the head; that is the default here.
- `chunk`: the whole text, as overlapping windows of `max_length` tokens whose starts are `stride` apart (the last
  window ends at the text's end). Training learns from every window with the text's label; evaluation and
  prediction classify the text from its windows' logits, averaged (or their maximum, a switch).

A text pair (`data.text_pair_column`: premise / hypothesis, question / passage) is `text + "\n\n" + pair`, each
tokenized alone, joined by the tokenizer's own encoding of the blank line (`pair_separator`): GPT-2's
paragraph-break token (628); for a Llama / Qwen3 decoder, its tokenizer.json's ids of "\n\n" (without special
tokens). These models have no separator token; a blank line is the boundary they saw between passages in
pretraining, whereas an end-of-text token (GPT-2's is also the pad id) means "a new document": the model would
read the pair as two unrelated texts. The first text is encoded as a single text is (a Llama 3 tokenizer puts
<|begin_of_text|> first), the second without special tokens (`encode_pairs`), so that the example reads as the
one text `text + "\n\n" + pair`. An export records its separator (model_config.json's pair_separator) and
prediction joins with the recorded one. When the pair is too long, tokens go from the longer text first
(transformers' `longest_first`): the shorter keeps all it has while it fits in half.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .errors import UserError

LONG_TEXTS = ("truncate", "head_tail", "chunk")
AGGREGATES = ("mean", "max")
PAIR_TEXT = "\n\n"  # what joins the two texts of a pair
WORD_START = "\u2581"  # SentencePiece's word-start mark
PAIR_SEPARATOR = (628,)  # PAIR_TEXT in the GPT-2 BPE
MIN_PAIR_LENGTH = len(PAIR_SEPARATOR) + 2  # a token of each text at least (GPT-2; see min_pair_length)


class PairSeparatorError(UserError, ValueError):
    """A tokenizer that cannot join a text pair."""


def _is_gpt2(tokenizer: Any) -> bool:
    from .tokenizer import GPT2BPE  # tiktoken: only when a tokenizer is at hand (config.py imports this module)

    return tokenizer is None or isinstance(tokenizer, GPT2BPE)


def pair_separator(tokenizer: Any = None) -> tuple[int, ...]:
    """The ids joining the two texts of a pair: `tokenizer`'s encoding of a blank line, without special tokens
    (GPT-2's, PAIR_SEPARATOR, for None or the GPT-2 BPE)."""
    if _is_gpt2(tokenizer):
        return PAIR_SEPARATOR
    ids = tuple(tokenizer.encode(PAIR_TEXT, add_special_tokens=False))
    if not ids:
        raise PairSeparatorError('data.text_pair_column: the model\'s tokenizer encodes a blank line ("\\n\\n") to '
                                 "zero tokens, so nothing would separate the two texts of a pair; use a tokenizer "
                                 "that encodes it, or train on single texts (remove data.text_pair_column)")
    if any(WORD_START in (tokenizer.tokenizer.id_to_token(i) or "") for i in ids):
        raise PairSeparatorError("data.text_pair_column: the model's tokenizer marks word starts SentencePiece-style "
                                 f"({WORD_START!r}: Llama 2, Mistral), so two texts encoded alone and joined would not "
                                 "read as one text; text pairs take a byte-level BPE tokenizer (Llama 3, SmolLM2, "
                                 "Qwen3), or train on single texts")
    return ids


def special_count(tokenizer: Any = None) -> int:
    """Tokens the tokenizer adds to a text of its own (a Llama 3 <|begin_of_text|>); GPT-2's: none."""
    if _is_gpt2(tokenizer):
        return 0
    return len(tokenizer.encode("a")) - len(tokenizer.encode("a", add_special_tokens=False))


def min_pair_length(separator: Sequence[int] = PAIR_SEPARATOR, specials: int = 0) -> int:
    """The shortest max_length that holds a pair: a token of each text, the separator, and the tokens the
    tokenizer adds to the first text (`special_count`)."""
    return len(separator) + 2 + specials


def encode_pairs(tokenizer: Any, pairs: list[str]) -> list[list[int]]:
    """The ids of the second texts of pairs: as `tokenizer` encodes a text, but without the special tokens its
    post-processor adds (a Llama 3 <|begin_of_text|>), which the first text already has."""
    if _is_gpt2(tokenizer):
        return tokenizer.encode_batch(list(pairs))
    return tokenizer.encode_batch(list(pairs), add_special_tokens=False)


def default_head(max_length: int) -> int:
    return max(1, max_length // 4)


def describe(max_length: int, mode: str = "truncate", head: int | None = None, pairs: bool = False) -> str:
    """How a longer text was cut, for warnings: `their first 64 tokens`."""
    if pairs:
        how = "its head and tail" if mode == "head_tail" else "its first tokens"
        return f"{max_length} tokens in all, longest text first, each text keeping {how}"
    if mode == "head_tail":
        keep_head = min(default_head(max_length) if head is None else head, max_length)
        return f"their first {keep_head} and last {max_length - keep_head} tokens"
    return f"their first {max_length} tokens"


def fit(ids: Sequence[int], max_length: int, mode: str = "truncate", head: int | None = None) -> list[int]:
    """The tokens of one text the model sees: all of them when they fit, else as `mode` cuts them."""
    if len(ids) <= max_length:
        return list(ids)
    if mode == "truncate":
        return list(ids[:max_length])
    if mode != "head_tail":  # chunk cuts nothing: `windows` covers the whole text
        raise ValueError(f"long_texts must be one of {LONG_TEXTS}, got {mode!r}")
    keep_head = min(default_head(max_length) if head is None else head, max_length)
    return list(ids[:keep_head]) + list(ids[len(ids) - (max_length - keep_head):])


def pair_budgets(first: int, second: int, room: int) -> tuple[int, int]:
    """Tokens each text of a pair keeps in `room`: longest first, the first text keeping the odd one."""
    if first + second <= room:
        return first, second
    keep_second = min(second, max(room - first, room // 2))
    return min(first, room - keep_second), keep_second


def full_length(ids: Sequence[int], pair: Sequence[int] | None = None,
                separator: Sequence[int] = PAIR_SEPARATOR) -> int:
    """Tokens of the example before any cut; `separator`: `pair_separator`'s, for a pair."""
    return len(ids) if pair is None else len(ids) + len(separator) + len(pair)


def fit_example(ids: Sequence[int], pair: Sequence[int] | None, max_length: int, mode: str = "truncate",
                head: int | None = None, separator: Sequence[int] = PAIR_SEPARATOR) -> list[int]:
    """One example's model input: a text cut by `fit`, or a pair, each text cut to its share by `fit` and joined
    by `separator` (`pair_separator` of the model's tokenizer)."""
    if pair is None:
        return fit(ids, max_length, mode, head)
    first, second = pair_budgets(len(ids), len(pair), max_length - len(separator))
    return fit(ids, first, mode) + list(separator) + fit(pair, second, mode)


def default_stride(max_length: int) -> int:
    """A quarter of each window overlaps the next: a sentence cut by one window is whole in the next."""
    return max(1, max_length * 3 // 4)


def windows(ids: Sequence[int], max_length: int, stride: int | None = None) -> list[list[int]]:
    """Overlapping windows covering every token; a text that fits is one window."""
    if len(ids) <= max_length:
        return [list(ids)]
    step = stride or default_stride(max_length)
    starts = list(range(0, len(ids) - max_length + 1, step))
    if starts[-1] + max_length < len(ids):
        starts.append(len(ids) - max_length)
    return [list(ids[start:start + max_length]) for start in starts]
