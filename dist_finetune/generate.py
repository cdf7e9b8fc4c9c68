"""`python -m dist_finetune.generate --weights WEIGHTS "Every effort moves"`: continue a prompt with the
language-model head of pretrained weights, to check that they loaded correctly before finetuning: GPT-2
weights, or a Llama / Qwen3 checkpoint folder (config.json's model_type says which; its tokenizer.json
encodes, and it stops at any of its eos ids: config.json's and generation_config.json's).
`--chat-template` wraps the prompt in the checkpoint's chat template as one user message.

Greedy by default (deterministic); `--temperature T` (> 0) samples, optionally from the `--top-k K`
most likely tokens, seeded by `--seed S`. Generation stops after `--max-new-tokens` tokens, at
<|endoftext|>, or when prompt + continuation fill the model's context (no sliding window: the
model never sees a cropped prompt). Prints the continuation alone on stdout; details go to stderr.
"""
from __future__ import annotations

import argparse
import json
import secrets
import sys
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .cli import add_device_arg, add_weights_args, pick_device, run_command
from .decoder import FAMILIES, Decoder, DecoderConfig
from .decoder_weights import load_decoder
from .distributed import leave
from .hf_tokenizer import HFTokenizer
from .model import GPT
from .tokenizer import EOT_ID, GPT2_BPE, GPT2BPE
from .weights import WeightsError, load_language_model, resolve_weights
from .errors import UserError

DEFAULT_MAX_NEW_TOKENS = 25


class GenerateError(UserError, ValueError):
    """A user error on the command line; the message names the flag and the fix."""


def _next_token(logits: torch.Tensor, temperature: float, top_k: int | None,
                generator: torch.Generator | None) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits.float().cpu() / temperature  # sampled on the CPU: the same seed gives the same draw anywhere
    if top_k is not None and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator))


@torch.no_grad()
def generate(model: GPT | Decoder, token_ids: Sequence[int], max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, generator: torch.Generator | None = None,
             eos_id: int | Collection[int] | None = EOT_ID) -> list[int]:
    """The new token ids (the prompt not included, the eos token it stops at not included).

    Stops after `max_new_tokens`, at `eos_id` (one id or several), or when prompt + new tokens reach the
    context length.
    """
    stops = set() if eos_id is None else {eos_id} if isinstance(eos_id, int) else set(eos_id)
    if not token_ids:
        raise ValueError("the prompt has no tokens")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    device = next(model.parameters()).device
    ids = torch.tensor([list(token_ids)], dtype=torch.long, device=device)
    new: list[int] = []
    while len(new) < max_new_tokens and ids.size(1) < model.config.context_length:
        logits = model.lm_logits(model(ids)[0, -1])
        token = _next_token(logits, temperature, top_k, generator)
        if token in stops:
            break
        new.append(token)
        ids = torch.cat([ids, torch.tensor([[token]], device=device)], dim=1)
    return new


# ---------------------------------------------------------------- the model and its tokenizer


@dataclass(frozen=True)
class Codec:
    """Text <-> ids with a model's tokenizer: GPT-2's BPE or a checkpoint's tokenizer.json (and its chat template)."""
    tokenizer: GPT2BPE | HFTokenizer

    def chat(self, prompt: str) -> str:
        """`prompt` in the checkpoint's chat template (one user message, then the assistant's header)."""
        if isinstance(self.tokenizer, GPT2BPE):
            raise GenerateError("--chat-template: GPT-2 weights have no chat template; leave the switch off")
        return self.tokenizer.apply_chat_template(prompt)

    def encode(self, text: str, special_tokens: bool = True) -> list[int]:
        """`special_tokens=False`: without the tokenizer's own (e.g. Llama 3's <|begin_of_text|>), for a
        piece of a prompt or a text a chat template has already wrapped. GPT-2's BPE adds none."""
        return self.encode_batch([text], special_tokens)[0]

    def encode_batch(self, texts: list[str], special_tokens: bool = True) -> list[list[int]]:
        if isinstance(self.tokenizer, GPT2BPE):
            return self.tokenizer.encode_batch(list(texts))
        return self.tokenizer.encode_batch(list(texts), add_special_tokens=special_tokens)

    def encode_prompts(self, prompts: list[str], chat_template: bool = False) -> list[list[int]]:
        """As transformers encodes them: `tokenizer(prompt)`, or `apply_chat_template(..., tokenize=True)`
        (the rendered chat encoded without special tokens: the template writes its own)."""
        if chat_template:
            return self.encode_batch([self.chat(p) for p in prompts], False)
        return self.encode_batch(prompts)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_id

    @property
    def name(self) -> str:
        return "GPT-2" if isinstance(self.tokenizer, GPT2BPE) else "tokenizer.json"


GPT2_CODEC = Codec(GPT2_BPE)


@dataclass(frozen=True)
class LanguageModel:
    """Pretrained weights with their language-model head, their tokenizer and the ids they stop at."""
    model: GPT | Decoder
    codec: Codec
    eos_ids: tuple[int, ...]

    @property
    def stop_name(self) -> str:
        return "<|endoftext|>" if isinstance(self.model, GPT) else "an eos token"


def decoder_folder(spec: str, download: bool = False) -> Path | None:
    """The folder of a Llama / Qwen3 checkpoint (its config.json's model_type), or None for GPT-2 weights."""
    source = resolve_weights(spec, download)
    config = source / "config.json"
    if not config.is_file():
        return None
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (ValueError, AttributeError):
        return None  # the GPT-2 loader reports it
    if isinstance(model_type, str) and model_type not in (*FAMILIES, "gpt2"):
        raise WeightsError(f"{config}: model_type {model_type!r} is not supported; --weights takes GPT-2 weights or "
                           f"a Llama / Qwen3 checkpoint (model_type {' or '.join(FAMILIES)})")
    return source if model_type in FAMILIES else None


def checkpoint_eos_ids(folder: Path, config: DecoderConfig) -> tuple[int, ...]:
    """config.json's eos_token_id (one or a list) and generation_config.json's, each once."""
    ids = list(config.eos_token_id)
    path = folder / "generation_config.json"
    if path.is_file():
        try:
            eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
        except (ValueError, AttributeError):
            raise WeightsError(f"{path}: not a JSON object; fix or delete it") from None
        ids += [eos] if isinstance(eos, int) else list(eos or [])
    return tuple(dict.fromkeys(ids))


def load_lm(spec: str, download: bool = False, n_head: int | None = None) -> LanguageModel:
    """GPT-2 weights (weights.load_language_model), or a Llama / Qwen3 checkpoint folder with its tokenizer."""
    folder = decoder_folder(spec, download)
    if folder is None:
        return LanguageModel(load_language_model(spec, download, n_head), GPT2_CODEC, (EOT_ID,))
    if n_head is not None:
        raise GenerateError(f"--n-head applies to GPT-2 weights only; {folder / 'config.json'} gives the heads")
    model = load_decoder(folder, lm_head=True).eval()
    tokenizer = HFTokenizer.from_folder(folder)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise WeightsError(f"{folder / 'tokenizer.json'}: token ids up to {tokenizer.vocab_size - 1}, beyond the "
                           f"model's vocab_size={model.config.vocab_size}; the tokenizer is from another checkpoint")
    return LanguageModel(model, Codec(tokenizer), checkpoint_eos_ids(folder, model.config))


@dataclass(frozen=True)
class Outcome:
    prompt_tokens: int
    new_tokens: list[int]
    context_length: int
    reason: str  # "max_new_tokens" | "endoftext" | "context"
    text: str = ""  # the continuation, decoded
    stop_name: str = "<|endoftext|>"


def stop_reason(prompt_tokens: int, new_tokens: int, max_new_tokens: int, context_length: int) -> str:
    if new_tokens == max_new_tokens:
        return "max_new_tokens"
    return "context" if prompt_tokens + new_tokens >= context_length else "endoftext"


# ---------------------------------------------------------------- the command


EPILOG = """examples:
  python -m dist_finetune.generate --weights gpt2 "Every effort moves"
  python -m dist_finetune.generate --weights path/to/gpt2-folder --temperature 1.0 --top-k 40 --seed 1 "Hello"
  python -m dist_finetune.generate --weights path/to/SmolLM2-135M "Every effort moves"
  python -m dist_finetune.generate --weights path/to/Qwen3-0.6B --chat-template "What is spam?"

--weights also takes a Llama / Qwen3 checkpoint folder (config.json, *.safetensors, tokenizer.json): the
architecture comes from its config.json, it stops at any of its eos ids.

Use it to check that pretrained weights load correctly before finetuning: sensible English means they
did. Prints the continuation alone on standard output; details go to standard error.
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m dist_finetune.generate", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Continue a prompt with a pretrained language model: GPT-2, Llama or Qwen3.")
    p.add_argument("prompt", help='the text to continue, e.g. "Every effort moves"')
    add_weights_args(p)
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS, metavar="N",
                   help="stop after this many new tokens; it also stops at <|endoftext|> or the model's context "
                        f"(default: {DEFAULT_MAX_NEW_TOKENS})")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T",
                   help="0 picks the most likely token each time (deterministic); above 0 samples, more varied as T "
                        "grows (default: 0)")
    p.add_argument("--top-k", type=int, metavar="K",
                   help="sample from the K most likely tokens only; needs --temperature (default: all tokens)")
    p.add_argument("--seed", type=int,
                   help="seed of the sampling, to repeat a result; needs --temperature (default: random, printed)")
    p.add_argument("--chat-template", action="store_true",
                   help="wrap the prompt in the checkpoint's chat template (tokenizer_config.json's chat_template) "
                        "as one user message, followed by the assistant's header; off by default because base "
                        "checkpoints have no template and a classifier's prompt is plain text")
    add_device_arg(p)
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 1:
        raise GenerateError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if not args.prompt:
        raise GenerateError('the prompt is empty: give the text to continue, e.g. "Every effort moves"')
    if not 0 <= args.temperature < float("inf"):
        raise GenerateError(f"--temperature must be a number >= 0 (0 = greedy), got {args.temperature}")
    if args.temperature == 0 and (args.top_k is not None or args.seed is not None):
        raise GenerateError("--top-k and --seed apply to sampling only: add --temperature T (> 0), e.g. 1.0")
    if args.top_k is not None and args.top_k < 1:
        raise GenerateError(f"--top-k must be at least 1, got {args.top_k}")
    if args.n_head is not None and args.n_head < 1:
        raise GenerateError(f"--n-head must be at least 1, got {args.n_head}")


def run(args: argparse.Namespace) -> Outcome:
    lm = load_lm(args.weights, args.download, args.n_head)
    prompt = lm.codec.encode_prompts([args.prompt], args.chat_template)[0]
    model = lm.model
    context = model.config.context_length
    if len(prompt) >= context:
        raise GenerateError(f"the prompt has {len(prompt)} tokens and leaves no room in the model's context of "
                            f"{context} tokens; shorten it")
    model = model.to(pick_device(args.device))
    generator = None
    if args.temperature > 0:
        seed = args.seed if args.seed is not None else secrets.randbits(63)
        generator = torch.Generator().manual_seed(seed)
        print(f"sampling: temperature {args.temperature}, top-k {args.top_k or 'all'}, seed {seed}", file=sys.stderr)
    new = generate(model, prompt, args.max_new_tokens, args.temperature, args.top_k, generator, lm.eos_ids)
    return Outcome(len(prompt), new, context, stop_reason(len(prompt), len(new), args.max_new_tokens, context),
                   lm.codec.decode(new), lm.stop_name)


def report(outcome: Outcome) -> str | None:
    if outcome.reason == "endoftext":
        return f"stopped at {outcome.stop_name} after {len(outcome.new_tokens)} new token(s)"
    if outcome.reason == "context":
        return (f"stopped at the context limit: prompt {outcome.prompt_tokens} + {len(outcome.new_tokens)} new "
                f"tokens fill the model's context of {outcome.context_length} tokens")
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_command(lambda: generate_and_print(args))


def generate_and_print(args: argparse.Namespace) -> int:
    check_args(args)
    outcome = run(args)
    sys.stdout.reconfigure(errors="backslashreplace")  # a terminal that cannot show every character
    sys.stdout.write(outcome.text + "\n")
    note = report(outcome)
    if note:
        print(note, file=sys.stderr)
    return 0


if __name__ == "__main__":
    leave(main())
