"""How a text longer than `max_length` tokens is cut to fit (`data.long_texts`), the same in training,
evaluation and prediction.

- `truncate`: the first `max_length` tokens (the chapter's recipe).
- `head_tail`: the first `head` tokens and the last `max_length - head` tokens. The middle of a long message is
  the part least likely to decide its class: the opening names the subject, the end holds the request, the
  signature, the call to action. Sun et al. (2019, "How to Fine-Tune BERT for Text Classification?") found
  head + tail best for long reviews, with about a quarter of the budget at the head; that is the default here.
"""
from __future__ import annotations

from collections.abc import Sequence

LONG_TEXTS = ("truncate", "head_tail")


def default_head(max_length: int) -> int:
    return max(1, max_length // 4)


def describe(max_length: int, mode: str = "truncate", head: int | None = None) -> str:
    """How a longer text was cut, for warnings: `their first 64 tokens`."""
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
    if mode != "head_tail":
        raise ValueError(f"long_texts must be one of {LONG_TEXTS}, got {mode!r}")
    keep_head = min(default_head(max_length) if head is None else head, max_length)
    return list(ids[:keep_head]) + list(ids[len(ids) - (max_length - keep_head):])
