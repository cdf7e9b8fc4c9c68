"""LoRA: low-rank adapters beside frozen linear layers (Hu et al., 2021), without PEFT.

`LoRALinear` wraps an existing `nn.Linear` as `base` and adds `lora_A` (in -> rank) and `lora_B`
(rank -> out), both `nn.Linear` without bias so that the optimizer's decay rule (matrices of linear
layers) covers them. `lora_B` starts at zero: a freshly wrapped model computes what it did before.

lora.scaling and lora.a_init switch to the chapter's LoRALayer: `alpha * (x @ A @ B)` with A an
(in, rank) Parameter under kaiming_uniform_(a=sqrt(5)), whose fan-in torch takes to be the rank.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from dist_finetune.config import LoraConfig

# Which linear layers each `lora.targets` item names (relative to the classifier).
# GPT-2 has attn.qkv / attn.proj and mlp.fc / mlp.proj; the Llama / Qwen3 decoder keeps the Hugging Face names,
# one group each (q k v o gate up down), and attn / mlp name all of its attention / MLP projections.
_DECODER_GROUPS = {"q": ("attn.q_proj",), "k": ("attn.k_proj",), "v": ("attn.v_proj",), "o": ("attn.o_proj",),
                   "gate": ("mlp.gate_proj",), "up": ("mlp.up_proj",), "down": ("mlp.down_proj",)}
TARGET_LAYERS = {"attn": ("attn.qkv", "attn.proj", *(_DECODER_GROUPS[g][0] for g in "qkvo")),
                 "mlp": ("mlp.fc", "mlp.proj", *(_DECODER_GROUPS[g][0] for g in ("gate", "up", "down"))),
                 "head": ("head",), **_DECODER_GROUPS}
ADAPTER_MARK = ".lora_"


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                 scaling: str = "alpha_over_rank", a_init: str = "in_features"):
        super().__init__()
        if scaling not in ("alpha_over_rank", "alpha") or a_init not in ("in_features", "rank"):
            raise ValueError(f"scaling {scaling!r} / a_init {a_init!r}: see LoraConfig for the choices")
        self.base = base
        self.rank = rank
        self.scale = alpha / rank if scaling == "alpha_over_rank" else alpha
        self.lora_A = nn.Linear(base.in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False)
        self.drop = nn.Dropout(dropout)
        if a_init == "in_features":
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        else:  # the chapter's (in, rank) tensor: fan-in = rank; stored transposed as nn.Linear keeps it
            nn.init.kaiming_uniform_(self.lora_A.weight.T, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.to(device=base.weight.device, dtype=base.weight.dtype)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_B(self.lora_A(self.drop(x))) * self.scale

    def merged(self) -> nn.Linear:
        """A plain Linear computing base + adapter (in fp32, cast back to the base's dtype)."""
        base = self.base
        out = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                        device=base.weight.device, dtype=base.weight.dtype)
        delta = self.lora_B.weight.float() @ self.lora_A.weight.float() * self.scale
        with torch.no_grad():
            out.weight.copy_((base.weight.float() + delta).to(base.weight.dtype))
            if base.bias is not None:
                out.bias.copy_(base.bias)
        return out


def _target_names(model: nn.Module, targets: tuple[str, ...]) -> list[str]:
    suffixes = tuple(s for t in targets for s in TARGET_LAYERS[t])
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and (name in suffixes or name.endswith(tuple("." + s for s in suffixes)))
            and ADAPTER_MARK.strip(".") not in name]


def _set_child(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def apply_lora(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Wraps the target Linears in place (idempotent); returns the wrapped module names."""
    names = _target_names(model, tuple(cfg.targets))
    for name in names:
        _set_child(model, name, LoRALinear(model.get_submodule(name), cfg.rank, cfg.alpha, cfg.dropout,
                                           cfg.scaling, cfg.a_init))
    return names


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def merge_lora(model: nn.Module) -> nn.Module:
    """Replaces every LoRALinear by its merged plain Linear, in place; returns the model."""
    names = [name for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    for name in names:
        _set_child(model, name, model.get_submodule(name).merged())
    return model


def is_lora_trainable(name: str, targets: tuple[str, ...]) -> bool:
    """Under model.trainable=lora: adapters, and the head unless the head itself carries an adapter."""
    return ADAPTER_MARK in name or ("head" not in targets and name.startswith("head."))
