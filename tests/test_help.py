"""Every command's --help is written for users: one line of what it does, examples that parse, and each
option's meaning with its default."""
from __future__ import annotations

import argparse
import importlib
import shlex

import pytest

from dist_finetune import cli

COMMANDS = ("train", "evaluate", "predict", "export", "generate", "zeroshot", "sweep", "serve")
INTERNALS = ("all-reduce", "broadcast", "collective", "gloo", "nccl", "rank 0", "state dict", "closure")


def help_of(name: str, monkeypatch, capsys) -> tuple[argparse.ArgumentParser, str]:
    """`main(["--help"])` in this process; the parser it built and what it printed."""
    parsers: list[argparse.ArgumentParser] = []
    original = argparse.ArgumentParser.parse_known_args

    def recording(self, *args, **kwargs):
        parsers.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", recording)
    module = importlib.import_module(f"dist_finetune.{name}")
    with pytest.raises(SystemExit) as exited:
        module.main(["--help"])
    assert exited.value.code == 0
    assert len(parsers) == 1
    return parsers[0], capsys.readouterr().out


def examples(epilog: str, name: str) -> list[list[str]]:
    """The arguments of each `python -m dist_finetune.NAME ...` example (after a pipe, after torchrun's `--`)."""
    text = epilog.replace("\\\n", " ")
    module = f"dist_finetune.{name}"
    found = []
    for line in text.splitlines():
        words = shlex.split(line.split("|")[-1], comments=True) if f"-m {module}" in line else []
        if module in words:
            rest = words[words.index(module) + 1:]
            found.append(rest[1:] if rest[:1] == ["--"] else rest)
    return found


@pytest.mark.parametrize("name", COMMANDS)
def test_help_says_what_the_command_does_with_examples_and_every_default(name, monkeypatch, capsys):
    parser, text = help_of(name, monkeypatch, capsys)
    description = (parser.description or "").strip()
    assert description and "\n" not in description and len(description) <= 100, description
    assert description in text
    assert "examples:" in (parser.epilog or "") and "examples:" in text
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
            continue  # hidden on purpose (a launcher's --local_rank)
        flag = "/".join(action.option_strings) or action.dest
        assert action.help and len(action.help) > 10, f"{name} {flag}: no help"
        if action.default not in (None, False, [], argparse.SUPPRESS):
            assert "default" in action.help, f"{name} {flag}: the help does not say its default {action.default!r}"
    for word in INTERNALS:
        assert word not in text.lower(), f"{name} --help speaks of {word!r}"
    given = examples(parser.epilog, name)
    assert given, f"{name}: no example runs python -m dist_finetune.{name}"
    module = importlib.import_module(f"dist_finetune.{name}")
    for argv in given:
        module.parse_args(argv)  # an example that does not parse exits here


def test_the_dispatcher_lists_every_command_with_examples():
    text = cli.usage()
    assert set(cli.COMMANDS) == set(COMMANDS)
    for name, what in cli.COMMANDS.items():
        assert f"  {name}  " in text and len(what) > 20, name
    lines = text.splitlines()
    shown = lines[lines.index("examples:") + 1:]
    assert shown[0].startswith("  dist-finetune ")
    for line in shown:
        if not line.startswith("  dist-finetune "):
            break
        name, *argv = shlex.split(line)[1:]
        importlib.import_module(f"dist_finetune.{name}").parse_args(argv)
