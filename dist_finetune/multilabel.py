"""task: multi_label — zero or more labels per text: one sigmoid per label, binary cross-entropy.

A label column cell holds the text's labels joined by `data.label_separator` (default `|`; an empty cell: no
label), or a JSON list in JSONL. A label is predicted when its probability reaches its threshold: `eval.threshold`
(default 0.5) for every label, or, with `eval.tune_thresholds: true`, each label's threshold tuned on the
validation split at the end of training (the one of a fixed grid with the best F1; saved with the export).
Metrics: micro / macro / per-label precision, recall and F1, subset accuracy (every label right) and Hamming loss
(the share of wrong label decisions). Every rank's probabilities are gathered in dataset order, so the metrics
are the same on every rank and for any number of ranks.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

METRICS = ("micro_f1", "macro_f1", "subset_accuracy", "hamming_loss")
LOWER_IS_BETTER = ("loss", "hamming_loss")
GRID = tuple(round(0.05 * i, 2) for i in range(1, 20))  # 0.05 ... 0.95, for tune_thresholds


def loss(logits: torch.Tensor, targets: torch.Tensor, pos_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean binary cross-entropy over texts and labels; `pos_weight` (loss.class_weights) weighs positives."""
    return F.binary_cross_entropy_with_logits(logits, targets, pos_weight=pos_weight)


def positive_weights(targets: Sequence[Sequence[float]]) -> list[float]:
    """loss.class_weights=balanced: per label, negatives / positives in the training split (1 when it has none)."""
    counts = torch.tensor(targets, dtype=torch.float64)
    positives = counts.sum(0)
    negatives = counts.shape[0] - positives
    return torch.where(positives > 0, negatives / positives.clamp(min=1), torch.ones_like(positives)).tolist()


def _scores(tp: float, fp: float, fn: float) -> dict[str, float]:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def metrics(logits: torch.Tensor, targets: torch.Tensor, labels: Sequence, thresholds: Sequence[float],
            pos_weight: torch.Tensor | None = None) -> dict[str, Any]:
    """logits / targets: [texts, labels] (float64); thresholds: one per label, on the probabilities."""
    n = logits.shape[0]
    result: dict[str, Any] = {"examples": n, "loss": float(loss(logits, targets, pos_weight)) if n else float("nan")}
    predicted = torch.sigmoid(logits) >= torch.tensor(thresholds, dtype=logits.dtype)
    truth = targets > 0.5
    tp = (predicted & truth).sum(0).double()
    fp = (predicted & ~truth).sum(0).double()
    fn = (~predicted & truth).sum(0).double()
    per_label = [{"label": label, **_scores(float(tp[k]), float(fp[k]), float(fn[k])), "support": int(truth[:, k].sum()),
                  "threshold": float(thresholds[k])} for k, label in enumerate(labels)]
    micro = _scores(float(tp.sum()), float(fp.sum()), float(fn.sum()))
    macro = {key: sum(p[key] for p in per_label) / len(per_label) for key in ("precision", "recall", "f1")}
    result.update({
        "micro": micro, "macro": macro, "micro_f1": micro["f1"], "macro_f1": macro["f1"],
        "subset_accuracy": float((predicted == truth).all(1).double().mean()) if n else 0.0,
        "hamming_loss": float((predicted != truth).double().mean()) if n else 0.0,
        "per_label": per_label,
    })
    return result


def tune_thresholds(logits: torch.Tensor, targets: torch.Tensor) -> list[float]:
    """Per label, the grid threshold with the best F1 on these texts (ties: the one nearest 0.5)."""
    probabilities, truth = torch.sigmoid(logits), targets > 0.5
    best = []
    for k in range(logits.shape[1]):
        def f1(t: float) -> float:
            predicted = probabilities[:, k] >= t
            return _scores(float((predicted & truth[:, k]).sum()), float((predicted & ~truth[:, k]).sum()),
                           float((~predicted & truth[:, k]).sum()))["f1"]
        best.append(max(GRID, key=lambda t: (f1(t), -abs(t - 0.5))))
    return best


def format_table(result: dict[str, Any]) -> str:
    lines = [f"examples {result['examples']}   loss {result['loss']:.4f}   subset accuracy "
             f"{result['subset_accuracy']:.4f}   hamming loss {result['hamming_loss']:.4f}", ""]
    names = [str(p["label"]) for p in result["per_label"]] + ["micro avg", "macro avg"]
    width = max(len(name) for name in names)
    lines.append(f"{'':<{width}}  precision  recall      f1  support  threshold")
    for p in result["per_label"]:
        lines.append(f"{str(p['label']):<{width}}  {p['precision']:9.4f}  {p['recall']:6.4f}  {p['f1']:6.4f}  "
                     f"{p['support']:7d}  {p['threshold']:9.2f}")
    lines.append("")
    for name in ("micro", "macro"):
        s = result[name]
        lines.append(f"{name + ' avg':<{width}}  {s['precision']:9.4f}  {s['recall']:6.4f}  {s['f1']:6.4f}")
    return "\n".join(lines)
