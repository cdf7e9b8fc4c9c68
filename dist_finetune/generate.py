"""`python -m dist_finetune.generate --weights WEIGHTS "Every effort moves"`: continue a prompt with the
language-model head of pretrained GPT-2 weights, to check that they loaded correctly before finetuning.

Greedy by default (deterministic); `--temperature T` (> 0) samples, optionally from the `--top-k K`
most likely tokens, seeded by `--seed S`. Generation stops after `--max-new-tokens` tokens, at
<|endoftext|>, or when prompt + continuation fill the model's context (no sliding window: the
model never sees a cropped prompt). Prints the continuation alone on stdout; details go to stderr.
"""
from __future__ import annotations

import argparse
import secrets
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .cli import add_device_arg, add_weights_args, pick_device, run_command
from .distributed import leave
from .model import GPT
from .tokenizer import EOT_ID, decode, encode
from .weights import load_language_model
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
def generate(model: GPT, token_ids: Sequence[int], max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, generator: torch.Generator | None = None,
             eos_id: int | None = EOT_ID) -> list[int]:
    """The new token ids (the prompt not included, <|endoftext|> not included).

    Stops after `max_new_tokens`, at `eos_id`, or when prompt + new tokens reach the context length.
    """
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
        if token == eos_id:
            break
        new.append(token)
        ids = torch.cat([ids, torch.tensor([[token]], device=device)], dim=1)
    return new


@dataclass(frozen=True)
class Outcome:
    prompt_tokens: int
    new_tokens: list[int]
    context_length: int
    reason: str  # "max_new_tokens" | "endoftext" | "context"


def stop_reason(prompt_tokens: int, new_tokens: int, max_new_tokens: int, context_length: int) -> str:
    if new_tokens == max_new_tokens:
        return "max_new_tokens"
    return "context" if prompt_tokens + new_tokens >= context_length else "endoftext"


# ---------------------------------------------------------------- the command


EPILOG = """examples:
  python -m dist_finetune.generate --weights gpt2 "Every effort moves"
  python -m dist_finetune.generate --weights path/to/gpt2-folder --temperature 1.0 --top-k 40 --seed 1 "Hello"

Use it to check that pretrained weights load correctly before finetuning: sensible English means they
did. Prints the continuation alone on standard output; details go to standard error.
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m dist_finetune.generate", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Continue a prompt with a pretrained GPT-2 language model.")
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
    prompt = encode(args.prompt)
    model = load_language_model(args.weights, args.download, args.n_head)
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
    new = generate(model, prompt, args.max_new_tokens, args.temperature, args.top_k, generator)
    return Outcome(len(prompt), new, context, stop_reason(len(prompt), len(new), args.max_new_tokens, context))


def report(outcome: Outcome) -> str | None:
    if outcome.reason == "endoftext":
        return f"stopped at <|endoftext|> after {len(outcome.new_tokens)} new token(s)"
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
    sys.stdout.write(decode(outcome.new_tokens) + "\n")
    note = report(outcome)
    if note:
        print(note, file=sys.stderr)
    return 0


if __name__ == "__main__":
    leave(main())
