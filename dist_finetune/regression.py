"""task: regression — numeric targets (one column, or several), learned on standardized values.

Targets are standardized with the training split's mean and standard deviation (saved with the run and the
export), so one learning rate fits targets of any scale and several targets weigh alike in the loss; predictions
are turned back into the targets' own units. The loss is MSE (or Huber, `loss.regression: huber`) on the
standardized values. Metrics are in the targets' units: MSE, RMSE, MAE, R², Pearson and Spearman per target,
and their mean over targets. Every rank's predictions are gathered in dataset order, so the metrics are the same
on every rank and for any number of ranks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

METRICS = ("mse", "rmse", "mae", "r2", "pearson", "spearman")
LOWER_IS_BETTER = ("loss", "mse", "rmse", "mae")


@dataclass(frozen=True)
class TargetScale:
    """Per target: the training split's mean and standard deviation (1.0 where it is 0)."""

    names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def of(cls, names: tuple[str, ...], rows: list[list[float]]) -> TargetScale:
        values = torch.tensor(rows, dtype=torch.float64)
        mean = values.mean(0)
        std = values.std(0, unbiased=False)
        std = torch.where(std > 0, std, torch.ones_like(std))
        return cls(names, tuple(mean.tolist()), tuple(std.tolist()))

    def standardize(self, rows: list[list[float]]) -> list[list[float]]:
        return [[(v - m) / s for v, m, s in zip(row, self.mean, self.std)] for row in rows]

    def to_units(self, values: torch.Tensor) -> torch.Tensor:
        return values * torch.tensor(self.std, dtype=values.dtype) + torch.tensor(self.mean, dtype=values.dtype)

    def to_json(self) -> dict[str, Any]:
        return {"targets": list(self.names), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TargetScale:
        return cls(tuple(data["targets"]), tuple(map(float, data["mean"])), tuple(map(float, data["std"])))


def loss(outputs: torch.Tensor, targets: torch.Tensor, huber: bool = False) -> torch.Tensor:
    """Mean over examples and targets, on standardized values."""
    return F.huber_loss(outputs, targets) if huber else F.mse_loss(outputs, targets)


def _ranks(values: torch.Tensor) -> torch.Tensor:
    """Average ranks (ties share the mean of their positions), as Spearman's rho needs."""
    order = torch.argsort(values, stable=True)
    sorted_values = values[order]
    ranks = torch.empty_like(values)
    start = 0
    n = len(values)
    while start < n:
        stop = start + 1
        while stop < n and sorted_values[stop] == sorted_values[start]:
            stop += 1
        ranks[order[start:stop]] = (start + stop - 1) / 2.0
        start = stop
    return ranks


def _pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x - x.mean(), y - y.mean()
    denominator = math.sqrt(float((x * x).sum()) * float((y * y).sum()))
    return float((x * y).sum()) / denominator if denominator > 0 else math.nan  # a constant: undefined


def metrics(outputs: torch.Tensor, targets: torch.Tensor, scale: TargetScale, huber: bool = False) -> dict[str, Any]:
    """outputs / targets: [examples, targets], standardized (float64). Metrics in the targets' own units."""
    n = outputs.shape[0]
    result: dict[str, Any] = {"examples": n, "loss": float(loss(outputs, targets, huber)) if n else float("nan")}
    predicted, true = scale.to_units(outputs), scale.to_units(targets)
    per_target = []
    for k, name in enumerate(scale.names):
        p, y = predicted[:, k], true[:, k]
        error = p - y
        mse = float((error * error).mean()) if n else float("nan")
        total = float(((y - y.mean()) ** 2).sum()) if n else 0.0
        per_target.append({
            "target": name, "mse": mse, "rmse": math.sqrt(mse) if n else float("nan"),
            "mae": float(error.abs().mean()) if n else float("nan"),
            "r2": 1.0 - float((error * error).sum()) / total if total > 0 else math.nan,  # no variance: undefined
            "pearson": _pearson(p, y) if n > 1 else math.nan,
            "spearman": _pearson(_ranks(p), _ranks(y)) if n > 1 else math.nan,
        })
    for key in METRICS:
        result[key] = sum(t[key] for t in per_target) / len(per_target)
    result["per_target"] = per_target
    return result


def format_table(result: dict[str, Any]) -> str:
    lines = [f"examples {result['examples']}   loss {result['loss']:.4f}", "",
             f"{'target':<16}  {'mse':>10}  {'rmse':>10}  {'mae':>10}  {'r2':>8}  {'pearson':>8}  {'spearman':>8}"]
    for t in result["per_target"]:
        lines.append(f"{t['target']:<16}  {t['mse']:10.4f}  {t['rmse']:10.4f}  {t['mae']:10.4f}  {t['r2']:8.4f}  "
                     f"{t['pearson']:8.4f}  {t['spearman']:8.4f}")
    return "\n".join(lines)
