"""Exact evaluation across ranks: every rank evaluates its shard, the sums are all-reduced."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .config import Config
from .data import eval_loader
from .distributed import DistEnv, all_reduce_sum


def evaluate(engine, dataset, cfg: Config, env: DistEnv, collate, max_batches: int | None = None) -> dict[str, float]:
    """Exact metrics: every rank runs the same number of forwards (ZeRO-3 gathers), sums reduced."""
    batch_size = cfg.eval.batch_size or 2 * cfg.train.micro_batch_size
    loader = eval_loader(dataset, batch_size, collate, env.rank, env.world_size)
    largest_shard = math.ceil(len(dataset) / env.world_size)
    steps = math.ceil(largest_shard / batch_size)
    if max_batches is not None:
        steps = min(steps, max_batches)
    engine.eval()
    loss_sum = correct = count = 0.0
    batches = iter(loader)
    with torch.no_grad():
        for _ in range(steps):
            batch = next(batches, None)
            real = batch is not None
            if not real:  # this rank's shard is done; keep the forwards in step with the others
                batch = {"input_ids": torch.full((1, 1), 50256), "lengths": torch.ones(1, dtype=torch.long),
                         "labels": torch.zeros(1, dtype=torch.long)}
            logits, labels = forward(engine, batch, env)
            if real:
                loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
                correct += float((logits.argmax(-1) == labels).sum())
                count += labels.numel()
    engine.train()
    loss_sum, correct, count = all_reduce_sum([loss_sum, correct, count], env).tolist()
    return {"loss": loss_sum / max(count, 1), "accuracy": correct / max(count, 1), "examples": int(count)}


def forward(engine, batch: dict[str, torch.Tensor], env: DistEnv) -> tuple[torch.Tensor, torch.Tensor]:
    input_ids = batch["input_ids"].to(env.device, non_blocking=True)
    lengths = batch["lengths"].to(env.device, non_blocking=True)
    labels = batch["labels"].to(env.device, non_blocking=True)
    return engine(input_ids, lengths).float(), labels
