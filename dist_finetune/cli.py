"""What every command shares: the runner that turns a user error into one line and an exit code, the
device choice of the single-process commands, and the `dist-finetune` dispatcher.

    dist-finetune train --config CONFIG [key=value ...]       (= python -m dist_finetune.train ...)
    dist-finetune evaluate | predict | export | generate | zeroshot | sweep ...
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .errors import UserError
from .files import atomic_write_text

COMMANDS = {
    "train": "finetune a GPT-2 classifier on labelled texts (a YAML config + key=value settings)",
    "evaluate": "measure a trained run on a split or a labelled file (accuracy, F1, confusion matrix)",
    "predict": "label new texts (arguments, a file or standard input) with a trained model",
    "export": "write a run's checkpoint as a standalone model folder for predict",
    "generate": "continue a prompt with pretrained GPT-2 weights (checks that they load)",
    "zeroshot": "classify by prompting pretrained GPT-2 without finetuning (a baseline)",
    "sweep": "train a grid of settings one after another and compare the results in one table",
    "serve": "serve a trained model over HTTP, batching concurrent requests (needs .[serve])",
}
EXAMPLES = """examples:
  dist-finetune train --config configs/quickstart.yaml
  dist-finetune predict --model runs/quickstart "WINNER! Claim your prize" "see you at 8"
  dist-finetune evaluate --run runs/quickstart --split val"""


class DeviceError(UserError):
    """The device asked for is not there."""


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda: no CUDA device is available; use --device cpu or auto")
    return torch.device(name)


def add_device_arg(p: argparse.ArgumentParser) -> None:
    """--device of the single-process commands (see pick_device)."""
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where the model runs: auto uses CUDA when available, else CPU (default: auto)")


BACKENDS = ("auto", "torch", "onnx")


def add_backend_arg(p: argparse.ArgumentParser) -> None:
    """--backend of the commands that run an export (predict, serve)."""
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="torch runs model.safetensors; onnx runs model.onnx under onnxruntime (an export written "
                        "with export --format onnx; needs the onnx extra); auto: onnx for a folder that holds only "
                        "model.onnx, else torch (default: auto)")


def add_weights_args(p: argparse.ArgumentParser) -> None:
    """--weights, --download and --n-head of the commands that run a pretrained language model."""
    p.add_argument("--weights", required=True,
                   help="pretrained GPT-2 weights: a folder, a file, or a Hugging Face id such as gpt2 (found in the "
                        "local cache)")
    p.add_argument("--download", action="store_true", help="download a Hugging Face id missing from the local cache")
    p.add_argument("--n-head", type=int, metavar="N",
                   help="attention heads, for weights without a config.json beside them that match no GPT-2 size "
                        "(default: from the config or the GPT-2 size)")


def _rank_prefix() -> str:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return f" (rank {dist.get_rank()})"
    return ""


def record_for_torchrun(line: str, exc: BaseException) -> None:
    """Write `line` to the error file torchrun gave this worker (TORCHELASTIC_ERROR_FILE), in the layout
    torch's `ErrorHandler.record_exception` writes, with our line where the traceback would be: the
    agent's closing summary then shows it under "Root Cause", the last thing on the console."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    data = {"message": {"message": f"{type(exc).__name__}: {exc}",
                        "extraInfo": {"py_callstack": line, "timestamp": str(int(time.time()))}}}
    try:
        atomic_write_text(Path(path), json.dumps(data))
    except OSError as err:
        print(f"warning: cannot write torchrun's error file {path}: {err}", file=sys.stderr, flush=True)


def run_command(body: Callable[[], int]) -> int:
    """Run a command's body. A `UserError` (raised by every rank at the same point) becomes one
    `error: ...` line and its exit code; a failed collective (a peer died) exits 4 at once, without the
    collectives a clean shutdown would need; anything else is a bug and keeps its traceback. Under
    torchrun the error line (or a bug's traceback) is also recorded as the worker's failure; a failed
    collective is not, as it is the consequence of another rank's failure, not the cause."""
    from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

    from .distributed import collective_failure, shutdown, tell_deepspeed_cpu

    if not torch.cuda.is_available():
        tell_deepspeed_cpu()
    try:
        code = body()
        sys.stdout.flush()  # a reader that went away (`| head`) is met here, not in the exit path
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's own flush goes nowhere
        code = 141  # 128 + SIGPIPE: what a shell tool stopped by the closed pipe returns
    except UserError as exc:
        line = f"error{_rank_prefix()}: {exc}"
        print(line, file=sys.stderr, flush=True)
        record_for_torchrun(line, exc)
        code = exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        os._exit(130)
    except Exception as exc:
        message = collective_failure(exc)
        if message is None:
            ErrorHandler().record_exception(exc)
            raise
        print(f"error: {message}", file=sys.stderr, flush=True)
        os._exit(4)
    shutdown()
    return code


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name.ljust(width)}  {what}" for name, what in COMMANDS.items()]
    return ("usage: dist-finetune COMMAND [options]\n\nFinetune GPT-2 models as text classifiers, and use them.\n\n"
            "commands:\n" + "\n".join(lines) + f"\n\n{EXAMPLES}\n\n"
            "`dist-finetune COMMAND --help` shows a command's options; `dist-finetune X` is "
            "`python -m dist_finetune.X`.")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"dist_finetune.{name}")
    return module.main(rest)


def entry() -> None:
    """The console script: leave the way `python -m dist_finetune.X` does (see distributed.leave)."""
    from .distributed import leave

    leave(main())


if __name__ == "__main__":
    entry()
