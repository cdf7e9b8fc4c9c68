"""One step's arithmetic, shared by training and evaluation: forward, loss, and the per-batch sums.

Exact evaluation: every rank evaluates its shard; the loss sum and the confusion matrix travel in one
all-reduce, and every metric is computed from those counts (metrics.py), so 1 and N ranks agree. A split of
windows (data.long_texts=chunk) gathers every window's logits to every rank instead, in dataset order, and
scores each text from its windows (mean or max of their logits), so 1 and N ranks agree there too.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from .config import Config
from .distributed import DistEnv, all_gather_rows, all_reduce_sum
from .loaders import ShardedEvalSampler, eval_loader
from . import multilabel, regression
from .metrics import from_confusion


def forward(model, batch: dict[str, torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 logits, labels) of one batch; `model` is called as `model(input_ids, lengths)`."""
    input_ids = batch["input_ids"].to(device, non_blocking=True)
    lengths = batch["lengths"].to(device, non_blocking=True)
    labels = batch["labels"].to(device, non_blocking=True)
    return model(input_ids, lengths).float(), labels


def loss_of(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None = None,
            task: str = "single_label", huber: bool = False) -> torch.Tensor:
    """Cross-entropy over class ids (`weight`: per class); multi_label: binary cross-entropy per label (`weight`:
    per label, on positives); regression: MSE or Huber on standardized targets."""
    if task == "regression":
        return regression.loss(logits, labels, huber)
    if task == "multi_label":
        return multilabel.loss(logits, labels, weight)
    return F.cross_entropy(logits, labels, weight=weight)


# Fields of `batch_sums`, in order.
LOSS_SUM, CORRECT, EXAMPLES, TOKENS, NONFINITE = range(5)


def batch_sums(loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, tokens: int,
               task: str = "single_label") -> torch.Tensor:
    """[loss x examples, correct, examples, real tokens, non-finite losses] of one micro-batch, on the
    device (nothing is read back: no host synchronisation). A non-finite loss counts only as such."""
    finite = torch.isfinite(loss.detach()).double()
    n = labels.shape[0]  # texts: a multi_label or regression row holds several values
    loss_sum = torch.nan_to_num(loss.detach().double() * n, nan=0.0, posinf=0.0, neginf=0.0) * finite
    if task == "regression":  # no accuracy
        correct = torch.zeros((), dtype=torch.float64, device=loss.device)
    elif task == "multi_label":  # every label right, at 0.5
        correct = ((logits.detach() > 0) == (labels > 0.5)).all(-1).sum().double() * finite
    else:
        correct = (logits.detach().argmax(-1) == labels).sum().double() * finite
    return torch.stack([loss_sum, correct, finite * n, finite * tokens, 1.0 - finite])


class RunningSums:
    """`batch_sums` added up on this rank since the last flush, kept on the device."""

    def __init__(self, device: torch.device) -> None:
        self.sums = torch.zeros(5, dtype=torch.float64, device=device)

    def add(self, sums: torch.Tensor) -> None:
        self.sums += sums

    def flush(self, env: DistEnv) -> list[float]:
        """The sums over all ranks since the last flush; every rank calls it at the same point."""
        totals = all_reduce_sum(self.sums, env).tolist()
        self.sums.zero_()
        return totals

    def nonfinite(self, env: DistEnv) -> float:
        """Non-finite losses on all ranks since the last flush, without flushing."""
        return all_reduce_sum(self.sums[NONFINITE:], env)[0].item()


def mean_loss_accuracy(totals: list[float]) -> tuple[float, float]:
    loss_sum, correct, count = totals[LOSS_SUM], totals[CORRECT], totals[EXAMPLES]
    return (loss_sum / count, correct / count) if count else (float("nan"), float("nan"))


def eval_batch_size(cfg: Config) -> int:
    if cfg.data.padding == "none":  # no padding: one example per forward
        return 1
    return cfg.eval.batch_size or 2 * cfg.train.micro_batch_size


def evaluate(model, dataset, cfg: Config, env: DistEnv, collate, max_batches: int | None = None,
             num_classes: int | None = None, aggregate: str | None = None,
             scale: regression.TargetScale | None = None, thresholds: list[float] | None = None,
             label_names: list | None = None) -> dict[str, Any]:
    """Exact metrics: every rank runs the same number of forwards (ZeRO-3 gathers), and every rank gets the
    same numbers: single_label sums reduced; windows (chunk), multi_label and regression outputs gathered.

    `model` is any module called as `model(input_ids, lengths) -> logits` (a DeepSpeed engine is one).
    single_label: loss, accuracy, examples, macro / weighted / per-class scores and the confusion matrix;
    `thresholds` (multi_label) or `scale` (regression): that task's metrics (multilabel.py, regression.py).
    """
    batch_size = eval_batch_size(cfg)
    aggregate = aggregate or cfg.data.chunk_aggregate
    loader = eval_loader(dataset, batch_size, collate, env.rank, env.world_size,
                         pin_memory=cfg.data.pin_memory and env.device.type == "cuda")
    steps = math.ceil(math.ceil(len(dataset) / env.world_size) / batch_size)
    if max_batches is not None:
        steps = min(steps, max_batches)
    module = getattr(model, "module", model)  # a DeepSpeed engine's own `training` flag is not kept
    was_training = module.training
    model.eval()
    # ZeRO-3 gathers parameters inside the forward; those must not become inference tensors.
    grad_off = torch.no_grad if cfg.zero.stage == 3 else torch.inference_mode
    doc_ids = getattr(dataset, "doc_ids", None)
    windows = doc_ids is not None and max_batches is None  # a capped evaluation scores the windows it reached
    if scale is None and thresholds is None and not windows:  # single_label: sums of counts, one all-reduce
        with grad_off():
            sums = _eval_sums(model, iter(loader), steps, env, num_classes)
        model.train(was_training)
        if sums is None:  # no forwards at all (an empty split): the same on every rank
            sums = torch.zeros(1 + (num_classes or 0) ** 2, dtype=torch.float64)
        return _classification(all_reduce_sum(sums, env))
    with grad_off():  # every rank gets every output, in dataset order
        local_outputs, local_targets = _outputs_and_targets(model, iter(loader), steps, env,
                                                            per_text=scale is None and thresholds is None)
    model.train(was_training)
    counts = [min(len(ShardedEvalSampler(len(dataset), r, env.world_size)), steps * batch_size)
              for r in range(env.world_size)]
    outputs, targets = all_gather_rows(local_outputs, counts, env), all_gather_rows(local_targets, counts, env)
    if windows:
        outputs, targets = _per_document(outputs, targets, doc_ids, aggregate)
    if thresholds is not None:
        result = multilabel.metrics(outputs, targets, label_names or list(range(len(thresholds))), thresholds)
        result["points"] = (outputs, targets)  # for tuning thresholds on the validation split; popped
    elif scale is not None:
        result = regression.metrics(outputs, targets, scale, cfg.loss.regression == "huber")
        result["points"] = (scale.to_units(outputs), scale.to_units(targets))  # for a scatter plot; popped
    else:
        result = _classification(_confusion_sums(outputs, targets[:, 0].long()))
    return result


def _classification(totals: torch.Tensor) -> dict[str, Any]:
    """[loss sum, confusion cells] -> loss, accuracy, examples and every score of metrics.py."""
    n = math.isqrt(totals.numel() - 1)
    metrics = from_confusion(totals[1:].view(n, n).tolist())
    return {"loss": float(totals[0]) / max(metrics.examples, 1), **metrics.to_dict()}


def _confusion_sums(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[loss sum, confusion cells] of logits whose class ids are `labels`."""
    n = logits.shape[-1]
    sums = torch.zeros(1 + n * n, dtype=torch.float64, device=logits.device)
    if len(labels):
        sums[0] = F.cross_entropy(logits, labels, reduction="sum").double()
        sums[1:] = torch.bincount(labels * n + logits.argmax(-1), minlength=n * n).double()
    return sums


def _forwards(model, batches, steps: int, env: DistEnv):
    """(logits, labels, real) of `steps` forwards: a rank whose shard is done runs a one-token dummy batch, so
    every rank runs the same forwards (ZeRO-3 gathers parameters inside each)."""
    for _ in range(steps):
        batch = next(batches, None)
        real = batch is not None
        if not real:
            # token 0: in every model's vocabulary (the output is dropped)
            batch = {"input_ids": torch.zeros((1, 1), dtype=torch.long), "lengths": torch.ones(1, dtype=torch.long),
                     "labels": torch.zeros(1, dtype=torch.long)}
        logits, labels = forward(model, batch, env.device)
        yield logits, labels, real


def _outputs_and_targets(model, batches, steps: int, env: DistEnv,
                         per_text: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's outputs and targets (float64, on the CPU, one row per example), in dataset order. A target
    row is the example's values (multi_label, regression), or its class id alone (`per_text`: single_label)."""
    outputs, targets, width = [], [], 0
    for logits, labels, real in _forwards(model, batches, steps, env):
        width = logits.shape[-1]  # dummy forwards too: a rank without examples still knows the width
        if real:
            outputs.append(logits.double().cpu())
            targets.append(labels.double().cpu().reshape(len(labels), -1))
    if not outputs:
        return torch.zeros((0, width), dtype=torch.float64), torch.zeros((0, 1 if per_text else width),
                                                                          dtype=torch.float64)
    return torch.cat(outputs), torch.cat(targets)


def _per_document(outputs: torch.Tensor, targets: torch.Tensor, doc_ids: list[int],
                  aggregate: str) -> tuple[torch.Tensor, torch.Tensor]:
    """data.long_texts=chunk: one row per text, from its windows' rows (mean or max), and its target."""
    docs = torch.as_tensor(doc_ids)
    count, width = int(docs[-1]) + 1, outputs.shape[-1]
    per_doc = torch.zeros((count, width), dtype=torch.float64)
    if aggregate == "max":
        per_doc.fill_(-math.inf)
        per_doc.scatter_reduce_(0, docs[:, None].expand(-1, width), outputs, reduce="amax")
    else:
        per_doc.index_add_(0, docs, outputs)
        per_doc /= torch.bincount(docs, minlength=count).clamp(min=1)[:, None]
    first = torch.zeros(count, dtype=torch.long)
    first[docs.flip(0)] = torch.arange(len(doc_ids) - 1, -1, -1)  # each text's first window
    return per_doc, targets[first]


def _eval_sums(model, batches, steps: int, env: DistEnv, num_classes: int | None) -> torch.Tensor | None:
    """[loss sum, confusion matrix cells] on the device: no host synchronisation per batch."""
    sums = None
    for logits, labels, real in _forwards(model, batches, steps, env):
        n = num_classes or logits.shape[-1]
        if sums is None:
            sums = torch.zeros(1 + n * n, dtype=torch.float64, device=logits.device)
        if real:
            sums += _confusion_sums(logits, labels)
    return sums
