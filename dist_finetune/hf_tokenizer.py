"""A Hugging Face checkpoint's own tokenizer (tokenizer.json) through the `tokenizers` library, offline.

Ids are those of transformers' `AutoTokenizer.from_pretrained(folder)(text)["input_ids"]` for a
PreTrainedTokenizerFast checkpoint: the special tokens tokenizer.json's post-processor adds, no others
(Llama 3's prepends <|begin_of_text|>; SmolLM2's and Qwen3's add none). `add_bos_token` /
`add_eos_token` in tokenizer_config.json change nothing, as in transformers 5, which drops them when a
tokenizer.json exists. tokenizer.json is read whole (normalizer, pre-tokenizer, model, post-processor):
transformers 5's model-specific classes (GPT2Tokenizer, Qwen2Tokenizer) rebuild the pre-tokenizer
instead, a known divergence from how the checkpoints were trained (huggingface/transformers#45812).
The pad token: tokenizer_config.json, else special_tokens_map.json, else tokenizer.json's padding
section, else eos; the padding side likewise, else right (the framework pads right in any case: with
causal attention the padding after the real tokens changes nothing).
"""
from __future__ import annotations

import functools
import json
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dist_finetune.errors import UserError
from dist_finetune.formats import optional

if TYPE_CHECKING:
    from tokenizers import Tokenizer

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"


class TokenizerError(UserError, ValueError):
    """A checkpoint tokenizer that cannot be used; the message names the file and key."""


@dataclass
class HFTokenizer:
    tokenizer: Tokenizer
    pad_token: str
    pad_id: int
    padding_side: str
    bos_id: int | None
    eos_id: int | None
    chat_template: str | None
    special_tokens: dict[str, str] = field(default_factory=dict)  # bos_token, eos_token ...: what a template sees

    @classmethod
    def from_folder(cls, folder: str | Path) -> HFTokenizer:
        folder = Path(folder)
        path = folder / TOKENIZER_FILE
        if not path.is_file():
            raise TokenizerError(f"{path}: not found; this tokenizer is read from a checkpoint's tokenizer.json")
        tokenizers = optional("tokenizers", "decoders", f"the tokenizer {path}")
        try:
            tokenizer = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for a malformed file
            raise TokenizerError(f"{path}: not a readable tokenizers file ({e})") from None
        padding = tokenizer.padding or {}
        tokenizer.no_truncation()  # transformers encodes without them unless asked per call
        tokenizer.no_padding()
        settings = _settings(folder)
        tokenizer.encode_special_tokens = bool(settings.get("split_special_tokens", False))
        bos_id, eos_id = (_token_id(tokenizer, settings.get(key)) for key in ("bos_token", "eos_token"))
        specials = {k: _token_text(v) for k, v in settings.items() if k.endswith("_token") and _token_text(v)}
        return cls(tokenizer, *_pad(folder, tokenizer, settings, padding), bos_id, eos_id,
                   _chat_template(folder, settings), {k: v for k, v in specials.items() if isinstance(v, str)})

    @property
    def vocab_size(self) -> int:
        """Including the added (special) tokens: every id encode can return is below it (the largest id plus one:
        the count of tokens is less when the ids have gaps, as an added token given a far id)."""
        vocab = self.tokenizer.get_vocab(with_added_tokens=True)
        return max(len(vocab), max(vocab.values(), default=-1) + 1)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """`add_special_tokens=False`: without the post-processor's tokens (how transformers encodes a
        rendered chat template, which writes its own)."""
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def apply_chat_template(self, prompt: str, where: str = "--chat-template") -> str:
        """`prompt` as one user message in the checkpoint's chat template, with the assistant's header after
        it (transformers' `apply_chat_template(..., tokenize=False, add_generation_prompt=True)`)."""
        if self.chat_template is None:
            raise TokenizerError(f"{where}: this checkpoint has no chat template (no \"chat_template\" in "
                                 f"{CONFIG_FILE}, no {CHAT_TEMPLATE_FILE}); base checkpoints have none, leave it off")
        return render_chat(self.chat_template, prompt, self.special_tokens, where)

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """As transformers 5 decodes (it skips clean_up_tokenization_spaces for BPE tokenizers)."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise TokenizerError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object")
    return data


def _settings(folder: Path) -> dict[str, Any]:
    """tokenizer_config.json, its missing special tokens taken from special_tokens_map.json."""
    config = _read_json(folder / CONFIG_FILE)
    specials = _read_json(folder / SPECIAL_TOKENS_FILE)
    merged = {k: v for k, v in specials.items() if k.endswith("_token")}
    merged.update({k: v for k, v in config.items() if v is not None})
    return merged


def _token_text(token: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(token, dict):
        return token.get("content")
    return token


def _token_id(tokenizer: Tokenizer, token: Any) -> int | None:
    text = _token_text(token)
    return None if text is None else tokenizer.token_to_id(text)


def _pad(folder: Path, tokenizer: Tokenizer, settings: dict[str, Any],
         padding: dict[str, Any]) -> tuple[str, int, str]:
    """(pad token, its id, padding side); `padding`: tokenizer.json's padding section."""
    pad = _token_text(settings.get("pad_token")) or padding.get("pad_token") or _token_text(settings.get("eos_token"))
    if pad is None:
        raise TokenizerError(f"{folder / CONFIG_FILE}: names neither a pad_token nor an eos_token to pad with")
    pad_id = tokenizer.token_to_id(pad)
    if pad_id is None:
        raise TokenizerError(f"{folder / CONFIG_FILE}: the pad token {pad!r} is not in {folder / TOKENIZER_FILE}")
    side = settings.get("padding_side") or padding.get("direction") or "right"
    if side not in ("left", "right"):
        raise TokenizerError(f"{folder / CONFIG_FILE}: padding_side {side!r} is neither 'left' nor 'right'")
    return pad, pad_id, side


def _chat_template(folder: Path, settings: dict[str, Any]) -> str | None:
    template = settings.get("chat_template")
    if template is None and (folder / CHAT_TEMPLATE_FILE).is_file():
        template = (folder / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    return template if isinstance(template, str) else None  # a list of named templates: not handled yet


@functools.lru_cache(maxsize=8)  # zeroshot renders one template per text
def _compile(template: str, where: str) -> Any:
    """The Jinja2 environment transformers renders chat templates in (sandboxed, trim_blocks, lstrip_blocks)."""
    from dist_finetune.formats import optional  # formats imports pandas: only when a template is rendered

    ext = optional("jinja2.ext", "chat", f"{where}: rendering the checkpoint's chat template")
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TokenizerError(f"{where}: the checkpoint's chat template refuses the prompt: {message}")

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    try:
        return env.from_string(template)
    except TemplateError as e:
        raise TokenizerError(f"{where}: the checkpoint's chat template is not a template this tool renders ({e})") \
            from None


RENDER_SECONDS = 10.0  # a chat template that renders longer is refused (the checkpoint's code: it may loop)


@contextmanager
def _time_limit(seconds: float, where: str) -> Iterator[None]:
    """A TokenizerError after `seconds` of rendering (SIGALRM: the main thread only; elsewhere no limit)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expired(signum: int, frame: Any) -> None:
        raise TokenizerError(f"{where}: the checkpoint's chat template did not finish rendering in {seconds:g} s "
                             "(it loops too long); fix chat_template in tokenizer_config.json, or leave out "
                             "--chat-template")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def render_chat(template: str, prompt: str, special_tokens: dict[str, str], where: str = "--chat-template") -> str:
    """`template` rendered with `prompt` as the one user message and add_generation_prompt=True."""
    import jinja2

    compiled = _compile(template, where)
    try:
        with _time_limit(RENDER_SECONDS, where):
            return compiled.render(messages=[{"role": "user", "content": prompt}], tools=None, documents=None,
                                   add_generation_prompt=True, **special_tokens)
    except TokenizerError:
        raise  # raise_exception: the template's own message, or the time limit
    except Exception as e:  # the template is the checkpoint's, not ours: 1/0, "a" + 1 ... are its errors too
        kind = "" if isinstance(e, jinja2.TemplateError) else f"{type(e).__name__}: "
        raise TokenizerError(f"{where}: the checkpoint's chat template failed to render ({kind}{e})") from None
