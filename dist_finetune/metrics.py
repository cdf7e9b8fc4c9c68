"""Classification metrics from a confusion matrix (rows: true class, columns: predicted class).

Everything here is arithmetic on counts, so the numbers are the same however the examples were
sharded. A ratio whose denominator is zero (no example of a class, no prediction of it) is 0.0.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class ClassScores:
    precision: float
    recall: float
    f1: float
    support: int


@dataclass(frozen=True)
class Metrics:
    confusion: tuple[tuple[int, ...], ...]
    accuracy: float
    examples: int
    per_class: tuple[ClassScores, ...]
    macro: ClassScores  # unweighted mean over classes; support = all examples
    weighted: ClassScores  # mean weighted by support; support = all examples

    def to_dict(self, labels: Sequence | None = None) -> dict[str, Any]:
        """JSON-ready; with `labels`, each per-class entry also names its label."""
        per_class = [asdict(s) for s in self.per_class]
        if labels is not None:
            per_class = [{"label": label, **s} for label, s in zip(labels, per_class, strict=True)]
        return {
            "accuracy": self.accuracy,
            "examples": self.examples,
            "macro": asdict(self.macro),
            "weighted": asdict(self.weighted),
            "per_class": per_class,
            "confusion_matrix": [list(row) for row in self.confusion],
        }


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


def _scores(tp: int, predicted: int, support: int) -> ClassScores:
    precision, recall = _ratio(tp, predicted), _ratio(tp, support)
    return ClassScores(precision, recall, _ratio(2 * precision * recall, precision + recall), support)


def _mean(scores: Sequence[ClassScores], weights: Sequence[float], total: int) -> ClassScores:
    norm = sum(weights)
    avg = [_ratio(sum(w * getattr(s, k) for s, w in zip(scores, weights)), norm)
           for k in ("precision", "recall", "f1")]
    return ClassScores(*avg, support=total)


def from_confusion(confusion: Sequence[Sequence[float]]) -> Metrics:
    """Accuracy, per-class precision / recall / F1 / support, macro and weighted averages."""
    cm = tuple(tuple(int(round(float(v))) for v in row) for row in confusion)
    n = len(cm)
    if any(len(row) != n for row in cm):
        raise ValueError(f"a confusion matrix must be square, got rows of lengths {[len(r) for r in cm]}")
    total = sum(map(sum, cm))
    support = [sum(cm[i]) for i in range(n)]
    predicted = [sum(cm[i][j] for i in range(n)) for j in range(n)]
    per_class = tuple(_scores(cm[i][i], predicted[i], support[i]) for i in range(n))
    return Metrics(
        confusion=cm,
        accuracy=_ratio(sum(cm[i][i] for i in range(n)), total),
        examples=total,
        per_class=per_class,
        macro=_mean(per_class, [1.0] * n, total),
        weighted=_mean(per_class, support, total),
    )


def format_table(result: dict[str, Any], labels: Sequence) -> str:
    """A plain-text report of `Metrics.to_dict(labels)` plus `loss`: scores per class, then the matrix."""
    names = [str(label) for label in labels]
    width = max([len(n) for n in names] + [len("weighted avg")])
    lines = [f"examples {result['examples']}   loss {result['loss']:.4f}   accuracy {result['accuracy']:.4f}", ""]
    lines.append(f"{'':<{width}}  precision  recall      f1  support")
    rows = [(n, s) for n, s in zip(names, result["per_class"])]
    rows += [("macro avg", result["macro"]), ("weighted avg", result["weighted"])]
    for i, (name, s) in enumerate(rows):
        if i == len(names):
            lines.append("")
        lines.append(f"{name:<{width}}  {s['precision']:9.4f}  {s['recall']:6.4f}  {s['f1']:6.4f}  {s['support']:7d}")
    cell = max([len(n) for n in names] + [len(str(v)) for row in result["confusion_matrix"] for v in row])
    lines += ["", "confusion matrix (rows: true label, columns: predicted label)"]
    lines.append(" " * width + "".join(f"  {n:>{cell}}" for n in names))
    for name, row in zip(names, result["confusion_matrix"]):
        lines.append(f"{name:<{width}}" + "".join(f"  {v:>{cell}}" for v in row))
    return "\n".join(lines)
