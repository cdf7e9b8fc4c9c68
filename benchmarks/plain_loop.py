"""The chapter-6 recipe as a plain PyTorch loop: the yardstick our DeepSpeed engine is measured against.

Raschka's LLMs-from-scratch chapter 6 (the SMS spam classifier): AdamW(lr 5e-5, weight decay 0.1),
micro-batches of 8 padded to the longest training text, fp32, no gradient clipping, no schedule, no
DeepSpeed. Our GPTClassifier stands in for the chapter's model (same architecture and init), built
as the framework builds it (build_model, set_trainable, configure_kernels).

    sys.path.insert(0, "benchmarks")  # not a package: throughput.py imports it the same way
    from plain_loop import train_epochs
    result = train_epochs(load_config("configs/gpt2_small_spam.yaml"), epochs=5, device=torch.device("cuda"))
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dist_finetune.config import Config
from dist_finetune.data import ClassificationDataset, load_data, make_collate
from dist_finetune.engine import param_groups
from dist_finetune.loaders import eval_loader, train_loader
from dist_finetune.model import GPTClassifier, GPTConfig, build_model, configure_kernels, set_trainable

CHAPTER_LR = 5e-5
CHAPTER_WEIGHT_DECAY = 0.1
CHAPTER_BATCH = 8

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class PlainResult:
    train_seconds: float
    samples_per_second: float
    test_accuracy: float
    val_accuracy: float
    epochs: int


def build_plain_model(cfg: Config, num_classes: int, device: torch.device, load_weights: bool = True,
                      init_on_device: bool = False) -> GPTClassifier:
    """Seeded with cfg.seed; model.weights loaded when set (the chapter starts from GPT-2's weights).

    Initialised on the CPU, as the framework does (the same seed, the same weights), unless
    `init_on_device` (fast for gpt2-xl; the device's generator then gives other weights).
    """
    torch.manual_seed(cfg.seed)
    with device if init_on_device else contextlib.nullcontext():
        model = build_model(cfg.model, num_classes, random_backbone=not load_weights)
    if load_weights and cfg.model.weights.lower() != "none":
        from dist_finetune.weights import load_pretrained

        load_pretrained(model, cfg.model.weights, download=cfg.model.download, head_policy=cfg.model.head)
    set_trainable(model, cfg.model.trainable, cfg.lora)
    configure_kernels(model, cfg.model.fused_qkv, cfg.model.attention_backend)
    return model.to(device)


def make_optimizer(model: nn.Module, lr: float = CHAPTER_LR, weight_decay: float = CHAPTER_WEIGHT_DECAY,
                   kind: str | None = None) -> torch.optim.Optimizer:
    """kind None: torch's default AdamW, as the chapter has it; torch_fused / torch_foreach: the
    implementation the engine picked (engine.optimizer_kind), for a like-for-like plain loop."""
    if kind is None:
        return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr)
    fused = kind == "torch_fused"
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, fused=fused, foreach=not fused)


def autocast_context(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def make_step(model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device, autocast: bool,
              grad_clip: float = 0.0) -> Callable[[Batch], torch.Tensor]:
    """One optimizer step on a batch already on `device`; returns the loss without reading it
    (no host synchronisation)."""
    trainable = [p for p in model.parameters() if p.requires_grad]

    def step(batch: Batch) -> torch.Tensor:
        with autocast_context(device, autocast):
            logits = model(batch["input_ids"], batch["lengths"])
        loss = F.cross_entropy(logits.float(), batch["labels"])
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(trainable, grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def accuracy(model: nn.Module, ds: ClassificationDataset, collate: Callable, device: torch.device,
             autocast: bool = False, batch_size: int = CHAPTER_BATCH) -> float:
    model.eval()
    correct = 0
    for batch in eval_loader(ds, batch_size, collate, rank=0, world_size=1):
        batch = to_device(batch, device)
        with autocast_context(device, autocast):
            logits = model(batch["input_ids"], batch["lengths"])
        correct += int((logits.argmax(dim=-1) == batch["labels"]).sum())
    model.train()
    return correct / len(ds)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_epochs(cfg: Config, epochs: int, device: torch.device, autocast: bool = False, grad_clip: float = 0.0,
                 batch_size: int = CHAPTER_BATCH, lr: float = CHAPTER_LR,
                 weight_decay: float = CHAPTER_WEIGHT_DECAY) -> PlainResult:
    """Whole epochs over the training split of cfg.data (every batch padded to data.max_length), then
    validation and test accuracy. Only the training epochs are timed."""
    data = load_data(cfg.data, GPTConfig.from_model_config(cfg.model).context_length)
    collate = make_collate("fixed", data.max_length)
    loader = train_loader(data.train, batch_size, collate, rank=0, world_size=1, seed=cfg.seed)
    model = build_plain_model(cfg, len(data.label_map), device).train()
    step = make_step(model, make_optimizer(model, lr, weight_decay), device, autocast, grad_clip)
    sync(device)
    start = time.perf_counter()
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        for batch in loader:
            step(to_device(batch, device))
    sync(device)
    seconds = time.perf_counter() - start
    samples = epochs * len(loader) * batch_size
    return PlainResult(
        train_seconds=seconds,
        samples_per_second=samples / seconds,
        test_accuracy=accuracy(model, data.test, collate, device, autocast),
        val_accuracy=accuracy(model, data.val, collate, device, autocast),
        epochs=epochs,
    )
