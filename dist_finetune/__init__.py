"""dist_finetune: finetune GPT-2 models as text classifiers, from one CPU to many GPUs."""

__version__ = "0.1.0"
