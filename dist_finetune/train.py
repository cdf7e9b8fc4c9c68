"""`python -m dist_finetune.train --config CONFIG [key.sub=value ...]`: the training command.

Options and `key=value` overrides may come in any order. The run itself is `trainer.Trainer`.
"""
from __future__ import annotations

import argparse
import logging

from .cli import run_command
from .config import load_config, to_yaml
from .distributed import init_distributed, leave
from .trainer import Trainer

EXIT_INTERRUPTED = 130  # Ctrl-C: the checkpoint was saved at the next step, as for SIGUSR1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dist_finetune.train", description=__doc__)
    p.add_argument("--config", help="YAML run config (default: all defaults)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.lr=1e-4")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing run folder (only one this framework created)")
    p.add_argument("--debug", action="store_true", help="CPU + gloo even where CUDA exists")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # older launchers
    return p.parse_intermixed_args(argv)


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    env = init_distributed(cfg.distributed.timeout_seconds, debug=args.debug or cfg.distributed.debug)
    trainer = Trainer(cfg, env, overwrite=args.overwrite)
    trainer.fit()
    return EXIT_INTERRUPTED if trainer.interrupted else 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    return run_command(lambda: run(args))


if __name__ == "__main__":
    leave(main())
