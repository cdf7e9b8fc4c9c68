"""The zero-shot prompt baseline: what the pretrained model does without finetuning.

    python -m dist_finetune.zeroshot --weights WEIGHTS [--split train|val|test | --data FILE
        --text-column C --label-column L] [--template T] [--answers ham=" no" spam=" yes" ...] [--out FILE]

Each text goes into the prompt template (the chapter's question by default); the model's next-token
logits at the prompt's last position, restricted to the answer words (one token each), are the
class scores, and the prediction is their argmax. --weights takes GPT-2 weights or a Llama / Qwen3
checkpoint folder (generate.load_lm); `--chat-template` puts each filled-in prompt in the checkpoint's
chat template as one user message, so the answer word is the first token of the assistant's reply. The metrics are those of `evaluate` (the loss is the
cross-entropy of the softmax over the answer logits), so a sweep can show what finetuning adds.
A text too long for the context loses tokens from its start: the question and the text's end stay.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .cli import add_device_arg, add_weights_args, pick_device, run_command
from .distributed import leave
from .data import SPLITS, DataError, LabelMap, bundled_sms_splits, read_table, read_texts
from .metrics import format_table, from_confusion
from .decoder import Decoder
from .generate import GPT2_CODEC, Codec, load_lm
from .model import GPT
from .report import write_json
from .tokenizer import PAD_ID
from .errors import UserError

TEXT = "{text}"
DEFAULT_TEMPLATE = "Is the following text 'spam'? Answer with 'yes' or 'no': '{text}'"
SMS_ANSWERS = {"ham": " no", "spam": " yes"}
_MARK = "\x00dist_finetune-text\x00"  # where the text goes, to find it in a rendered chat template


class ZeroShotError(UserError, ValueError):
    """A user error on the command line; the message names the flag and the fix."""


# ---------------------------------------------------------------- prompts and answers


@dataclass(frozen=True)
class Template:
    prefix: str
    suffix: str

    @classmethod
    def parse(cls, template: str) -> Template:
        if template.count(TEXT) != 1:
            raise ZeroShotError(f"--template must hold {TEXT} exactly once (where the text goes), got {template!r}")
        prefix, suffix = template.split(TEXT)
        return cls(prefix, suffix)


def build_prompts(texts: Sequence[str], template: Template, context_length: int, codec: Codec = GPT2_CODEC,
                  chat_template: bool = False) -> tuple[list[list[int]], int]:
    """Token ids of each filled-in prompt, and how many texts were cut to fit the context.

    A prompt that fits is the encoding of the whole filled-in string (in the chat template with
    `chat_template`); one that does not is the template's pieces around the text's last tokens (its
    first tokens are dropped), the tokenizer's special tokens (Llama 3's <|begin_of_text|>) on the first.
    """
    prefix, suffix = _chat_pieces(template, codec) if chat_template else (template.prefix, template.suffix)
    head, tail = codec.encode(prefix, not chat_template), codec.encode(suffix, False)
    room = context_length - len(head) - len(tail)
    if room < 1:
        raise ZeroShotError(f"--template: the template alone is {len(head) + len(tail)} tokens, leaving no room for "
                            f"the text in the model's context of {context_length}; shorten it")
    prompts = codec.encode_prompts([template.prefix + text + template.suffix for text in texts], chat_template)
    truncated = 0
    for i, ids in enumerate(prompts):
        if len(ids) > context_length:
            prompts[i] = head + codec.encode(texts[i], False)[-room:] + tail
            truncated += 1
    return prompts, truncated


def _chat_pieces(template: Template, codec: Codec) -> tuple[str, str]:
    """The rendered chat before and after the text (for a text cut to fit the context)."""
    pieces = codec.chat(template.prefix + _MARK + template.suffix).split(_MARK)
    if len(pieces) != 2:
        raise ZeroShotError("--chat-template: the checkpoint's chat template changes the prompt's text, so a text "
                            "too long for the context cannot be cut; leave the switch off")
    return pieces[0], pieces[1]


def parse_answers(items: Sequence[str]) -> dict[str, str]:
    """`LABEL=WORD` items -> {label: word}; the word keeps its spaces (" yes")."""
    answers: dict[str, str] = {}
    for item in items:
        label, sep, word = item.partition("=")
        if not sep or not label.strip() or not word:
            raise ZeroShotError(f"--answers: {item!r} is not LABEL=WORD; write e.g. --answers ham=' no' spam=' yes'")
        if label.strip() in answers:
            raise ZeroShotError(f"--answers: label {label.strip()!r} is given twice")
        answers[label.strip()] = word
    if len(answers) < 2:
        raise ZeroShotError("--answers: give an answer word for at least two labels, e.g. ham=' no' spam=' yes'")
    return answers


def answer_token_ids(answers: dict[Any, str], codec: Codec = GPT2_CODEC) -> list[int]:
    """One token per answer word (without the tokenizer's special tokens), in the order of `answers`; distinct."""
    ids = []
    for label, word in answers.items():
        tokens = codec.encode(word, False)
        if len(tokens) != 1:
            raise ZeroShotError(
                f"--answers: the answer {word!r} for label {label!r} is {len(tokens)} {codec.name} tokens; each answer "
                "must "
                "be a single token (mind the leading space: ' yes', not 'yes ' or ' yes please')"
            )
        ids.append(tokens[0])
    if len(set(ids)) != len(ids):
        raise ZeroShotError(f"--answers: two labels have the same answer token ({answers}); give distinct words")
    return ids


def label_map_of(answers: dict[str, str]) -> tuple[LabelMap, dict[Any, str]]:
    """The classes (sorted, as data.py orders a training label map) and the answers keyed by class."""
    labels = _as_labels(answers)
    try:
        label_map = LabelMap(tuple(sorted(labels)))
    except ValueError as exc:
        raise ZeroShotError(f"--answers: {exc}") from None
    by_label = dict(zip(labels, answers.values()))
    return label_map, {label: by_label[label] for label in label_map.labels}


def _as_labels(answers: dict[str, str]) -> list:
    """Labels as data.py reads them: integers when every label is one, else strings."""
    keys = list(answers)
    if all(k.lstrip("+-").isdigit() for k in keys):
        return [int(k) for k in keys]
    return keys


# ---------------------------------------------------------------- scoring


def answer_scores(logits: torch.Tensor, answer_ids: Sequence[int]) -> torch.Tensor:
    """Next-token logits [N, vocab] restricted to the answer tokens: [N, classes], class order of `answer_ids`."""
    return logits[:, list(answer_ids)]


@torch.no_grad()
def score_prompts(model: GPT | Decoder, prompts: Sequence[Sequence[int]], answer_ids: Sequence[int],
                  batch_size: int = 16, pad_id: int = PAD_ID) -> torch.Tensor:
    """Answer scores [N, classes] (fp32, CPU) from the logits at each prompt's last token.

    Prompts are right-padded per batch; the attention is causal, so the padding after a prompt's last
    token changes nothing at that position.
    """
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        lengths = torch.tensor([len(ids) for ids in batch], device=device)
        input_ids = torch.full((len(batch), int(lengths.max())), pad_id, dtype=torch.long)
        for row, ids in enumerate(batch):
            input_ids[row, :len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        hidden = model(input_ids.to(device))
        last = hidden[torch.arange(len(batch), device=device), lengths - 1]
        out.append(answer_scores(model.lm_logits(last), answer_ids).float().cpu())
    return torch.cat(out)


def metrics_of(scores: torch.Tensor, targets: torch.Tensor, labels: list) -> dict[str, Any]:
    """evaluate's report: loss (cross-entropy over the answer logits), accuracy, per-class scores, confusion."""
    n = len(labels)
    cells = targets * n + scores.argmax(-1)
    confusion = torch.bincount(cells, minlength=n * n).view(n, n).tolist()
    return {"loss": float(F.cross_entropy(scores, targets)), **from_confusion(confusion).to_dict(labels), "labels": labels}


# ---------------------------------------------------------------- data


@dataclass(frozen=True)
class Examples:
    texts: list[str]
    labels: list  # as read: strings, or integers when every label is one
    name: str  # split name or file stem


def load_examples(args: argparse.Namespace) -> Examples:
    if args.data is None:
        frame = bundled_sms_splits()[args.split]
        return Examples(frame["text"].tolist(), frame["label"].tolist(), args.split)
    frame, _ = read_texts(args.data, args.text_column, keys=("--data", "--text-column"))  # file + text column
    columns = [str(c) for c in frame.columns]
    if args.label_column not in columns:
        raise DataError(f"{args.data}: no column {args.label_column!r}; columns found: {', '.join(columns)}. "
                        "Set --label-column to the column that holds the labels.")
    table = read_table(args.data, args.text_column, args.label_column)  # every row validated as in training
    return Examples(table["text"].tolist(), table["label"].tolist(), args.data.stem)


def label_ids(examples: Examples, label_map: LabelMap, answers_given: bool) -> torch.Tensor:
    ids, unknown = [], []
    for label in examples.labels:
        try:
            ids.append(label_map.to_id(label))
        except DataError:
            unknown.append(label)
    if unknown:
        found = sorted({str(u) for u in unknown})
        fix = ("pass an answer word for every label" if answers_given
               else "the default answers cover the SMS labels ham and spam only: pass --answers for every label")
        raise ZeroShotError(f"{examples.name}: label(s) {found} have no answer word; {fix}, e.g. "
                            f"--answers {found[0]}=' yes'")
    return torch.tensor(ids, dtype=torch.long)


# ---------------------------------------------------------------- the command


EPILOG = """examples:
  python -m dist_finetune.zeroshot --weights gpt2
  python -m dist_finetune.zeroshot --weights gpt2 --data reviews.csv --template "Review: {text} Positive?" \\
      --answers pos=" yes" neg=" no"
  python -m dist_finetune.zeroshot --weights path/to/Qwen3-0.6B --chat-template --answers ham=no spam=yes

--weights also takes a Llama / Qwen3 checkpoint folder (config.json, *.safetensors, tokenizer.json).

Each text goes into the prompt; the label whose answer word the model finds most likely next is the
prediction. Prints the metrics of evaluate and writes them as JSON (see --out).
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m dist_finetune.zeroshot", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Classify by prompting a pretrained GPT-2, Llama or Qwen3, without finetuning: the baseline "
                    "to beat.")
    add_weights_args(p)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--split", choices=SPLITS, help="a split of the bundled SMS Spam Collection (default: test)")
    which.add_argument("--data", type=Path, metavar="FILE",
                       help="a labelled CSV / TSV / JSONL file instead of the bundled data")
    p.add_argument("--text-column", default="text", metavar="NAME",
                   help="the column of --data that holds the texts (default: text)")
    p.add_argument("--label-column", default="label", metavar="NAME",
                   help="the column of --data that holds the labels (default: label)")
    p.add_argument("--template", default=DEFAULT_TEMPLATE,
                   help=f"the prompt, with {TEXT} where the text goes (default: {DEFAULT_TEMPLATE!r})")
    p.add_argument("--answers", nargs="+", metavar="LABEL=WORD",
                   help="the answer word of each label, one token each, usually with a leading space "
                        "(default: ham=' no' spam=' yes')")
    p.add_argument("--chat-template", action="store_true",
                   help="put each filled-in prompt in the checkpoint's chat template as one user message, followed "
                        "by the assistant's header; off by default because base checkpoints have no template and "
                        "a classifier's prompt is plain text")
    p.add_argument("--batch-size", type=int, default=16, metavar="N",
                   help="prompts per forward pass; larger is faster and uses more memory (default: 16)")
    add_device_arg(p)
    p.add_argument("--out", type=Path, metavar="FILE",
                   help="the JSON report to write (default: ./zeroshot_<split or file stem>.json)")
    p.add_argument("--overwrite", action="store_true", help="replace a report that already exists (default: refuse)")
    args = p.parse_args(argv)
    if args.data is None:
        args.split = args.split or "test"
    return args


def check_args(args: argparse.Namespace) -> None:
    if args.batch_size < 1:
        raise ZeroShotError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.n_head is not None and args.n_head < 1:
        raise ZeroShotError(f"--n-head must be at least 1, got {args.n_head}")
    if args.data is None and (args.text_column != "text" or args.label_column != "label"):
        raise ZeroShotError("--text-column and --label-column apply to --data only")
    if args.out is not None and not args.out.parent.is_dir():
        raise ZeroShotError(f"--out {args.out}: the folder {args.out.parent} does not exist; create it first")
    out = output_path(args)
    if out.is_dir():
        raise ZeroShotError(f"--out {out} is a folder; give a file name ending in .json")
    if (out.exists() or out.is_symlink()) and not args.overwrite:
        raise ZeroShotError(f"{out} already exists; pass --overwrite to replace it, or choose another --out")


def output_path(args: argparse.Namespace) -> Path:
    return args.out or Path(f"zeroshot_{args.split if args.data is None else args.data.stem}.json")


def run(args: argparse.Namespace) -> dict[str, Any]:
    template = Template.parse(args.template)
    answers = parse_answers(args.answers) if args.answers else dict(SMS_ANSWERS)
    label_map, answers = label_map_of(answers)
    examples = load_examples(args)
    targets = label_ids(examples, label_map, args.answers is not None)
    lm = load_lm(args.weights, args.download, args.n_head)
    answer_ids = answer_token_ids(answers, lm.codec)
    context = lm.model.config.context_length
    prompts, truncated = build_prompts(examples.texts, template, context, lm.codec, args.chat_template)
    model = lm.model.to(pick_device(args.device))
    scores = score_prompts(model, prompts, answer_ids, args.batch_size, lm.codec.pad_id)
    result = metrics_of(scores, targets, label_map.to_json())
    return {
        "method": "zero-shot", "weights": args.weights, "split": args.split,
        "data": None if args.data is None else str(args.data), "template": args.template,
        "chat_template": args.chat_template,
        "answers": {str(k): v for k, v in answers.items()}, "answer_token_ids": answer_ids,
        **result, "truncated": truncated, "context_length": context, "name": examples.name,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_command(lambda: score_and_report(args))


def score_and_report(args: argparse.Namespace) -> int:
    check_args(args)
    report = run(args)
    report.pop("name")
    out = output_path(args)
    write_json(out, report)
    what = f"split {args.split}" if args.data is None else f"file {args.data}"
    print(f"zero-shot {args.weights}: {what}, answers " + ", ".join(f"{k}={v!r}" for k, v in report["answers"].items()))
    print(format_table(report, report["labels"]))
    if report["truncated"]:
        print(f"note: {report['truncated']} text(s) did not fit the model's context of {report['context_length']} "
              "tokens with the template; their first tokens were dropped", file=sys.stderr)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    leave(main())
