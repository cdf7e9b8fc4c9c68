"""Per-class weights of the training loss (`loss.class_weights`), built once from the training split."""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch

from .config import ConfigError
from .multilabel import positive_weights


def class_weights(spec: str | Sequence[float], train_labels: Sequence, labels: Sequence,
                  multi_label: bool = False) -> list[float] | None:
    """None for `none`; `balanced`: n_examples / (n_classes x count_c) (multi_label: per label, negatives /
    positives, the weight of its positives); a list: checked against the classes."""
    n_classes = len(labels)
    if spec == "none":
        return None
    if spec == "balanced" and multi_label:
        return positive_weights(train_labels)
    if spec == "balanced":
        counts = Counter(train_labels)
        return [len(train_labels) / (n_classes * counts[c]) if counts[c] else 0.0 for c in range(n_classes)]
    weights = [float(w) for w in spec]
    if len(weights) != n_classes:
        raise ConfigError(
            f"loss.class_weights: {len(weights)} weights given but the training data has {n_classes} classes "
            f"{list(labels)!r}; give one weight per class in that order, or use balanced | none"
        )
    return weights


def weight_tensor(weights: list[float] | None, device: torch.device) -> torch.Tensor | None:
    return None if weights is None else torch.tensor(weights, dtype=torch.float32, device=device)
