"""Finetune a GPT-2 model as a text classifier (python -m dist_finetune.train, or dist-finetune train)."""
from __future__ import annotations

import argparse

from . import logs
from .cli import run_command
from .config import load_config, to_yaml
from .distributed import init_distributed, leave
from .trainer import Trainer

EXIT_INTERRUPTED = 130  # Ctrl-C: the checkpoint was saved at the next step, as for SIGUSR1

DESCRIPTION = "Finetune a GPT-2 model as a text classifier, on CPUs or GPUs, in one process or many."
EXAMPLES = """\
examples:
  python -m dist_finetune.train --config configs/quickstart.yaml
  python -m dist_finetune.train --config configs/quickstart.yaml train.lr=1e-4 output_dir=runs/lr1e-4
  python -m dist_finetune.train --config configs/quickstart.yaml resume=auto    # continue a stopped run
  torchrun --nproc_per_node=2 -m dist_finetune.train --config configs/quickstart.yaml output_dir=runs/two
  python -m dist_finetune.train --print-config                                   # every setting, its default

The run folder (output_dir) receives the checkpoints, metrics, plots, logs/ and the exported model.
Options and key=value settings may come in any order. Exit status: 0 finished (all steps or an early
stop); 2 a problem with the config, data or run folder (one "error:" line names it and the fix); 3
non-finite numbers stopped training; 4 another rank failed; 130 Ctrl-C (a checkpoint was saved:
resume=auto continues)."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dist_finetune.train", description=DESCRIPTION, epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE",
                   help="YAML file with the run's settings (default: none, every setting at its default)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="change one setting, e.g. train.lr=1e-4 or output_dir=runs/try2 (any number; they win "
                        "over the file; --print-config lists every key)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in output_dir (only a folder this tool created; default: an "
                        "existing run folder is refused)")
    p.add_argument("--verbose", action="store_true",
                   help="also show DeepSpeed's and PyTorch's own log lines (default: only their warnings; every "
                        "line is in RUN/logs/train_rankN.log either way)")
    p.add_argument("--print-config", action="store_true",
                   help="print the settings the run would use (defaults, file and key=value merged) and exit")
    p.add_argument("--debug", action="store_true",
                   help="train on the CPU even when a GPU is present (default: the GPUs when there are any; "
                        "same as distributed.debug=true)")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # older launchers
    return p.parse_intermixed_args(argv)


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    env = init_distributed(cfg.distributed.timeout_seconds, debug=args.debug or cfg.distributed.debug)
    logs.route_deepspeed()  # the device is chosen: DeepSpeed may be imported now
    trainer = Trainer(cfg, env, overwrite=args.overwrite)
    trainer.fit()
    return EXIT_INTERRUPTED if trainer.interrupted else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logs.configure(args.verbose)
    return run_command(lambda: run(args))


if __name__ == "__main__":
    leave(main())
