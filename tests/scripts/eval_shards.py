"""Evaluate a fixed random model on the val split under the current launch; write the metrics.

Run by tests with 1 process and under torchrun with 2-3 ranks: exact evaluation gives the same numbers.
"""
from __future__ import annotations

import json
import sys

from dist_finetune.config import load_config
from dist_finetune.data import load_data, make_collate
from dist_finetune.distributed import init_distributed, shutdown
from dist_finetune.engine import build_engine, plan_batches
from dist_finetune.model import build_model, set_trainable
from dist_finetune.step import evaluate
from dist_finetune.trainer import seed_everything


def main(config: str, out: str, *overrides: str) -> None:
    cfg = load_config(config, overrides)
    env = init_distributed(cfg.distributed.timeout_seconds)
    seed_everything(cfg.seed)
    data = load_data(cfg.data, cfg.model.context_length)
    model = build_model(cfg.model, len(data.label_map))
    set_trainable(model, cfg.model.trainable)
    engine, _ = build_engine(model, cfg, env, plan_batches(cfg, env.world_size), total_steps=1)
    metrics = evaluate(engine, data.val, cfg, env, make_collate(cfg.data.padding, data.max_length))
    if env.is_main:
        with open(out, "w") as f:
            json.dump(metrics, f)
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *sys.argv[3:])
