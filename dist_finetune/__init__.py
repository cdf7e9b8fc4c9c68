"""dist_finetune: finetune GPT-2 models as text classifiers, from one CPU to many GPUs.

Using a finetuned model from Python: `from dist_finetune import Classifier` (see classifier.py).
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Classifier", "Prediction", "__version__"]


def __getattr__(name: str) -> Any:
    """`Classifier` and `Prediction` on first use: importing a submodule need not import torch."""
    if name in ("Classifier", "Prediction"):
        from . import classifier

        return getattr(classifier, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
