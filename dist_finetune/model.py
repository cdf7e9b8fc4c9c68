"""GPT-2 (nanoGPT style, attention through F.scaled_dot_product_attention) and the classifier around it.

The classifier replaces GPT-2's 50,257-way LM head with an N-class head on a pooled hidden state.
Padding is known only from `lengths` (right padding), never from token values: the pad id 50256 is
also <|endoftext|>, which a text may legitimately end with.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from dist_finetune.config import ConfigError, Trainable
from dist_finetune.decoder import Attention as DecoderAttention
from dist_finetune.decoder import Decoder, DecoderConfig
from dist_finetune.zero3 import full_numel

if TYPE_CHECKING:
    from pathlib import Path

    from dist_finetune.config import LoraConfig, ModelConfig

POOLINGS = ("last", "last_token", "first", "mean")
SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 50257
    context_length: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    dropout: float = 0.0
    qkv_bias: bool = True
    # False: bidirectional attention over the real tokens (padding masked out by `lengths`).
    causal: bool = True

    @classmethod
    def from_model_config(cls, mc: ModelConfig) -> GPTConfig:
        arch = mc.arch()
        return cls(
            vocab_size=mc.vocab_size,
            context_length=arch["context_length"],
            n_embd=arch["n_embd"],
            n_layer=arch["n_layer"],
            n_head=arch["n_head"],
            dropout=mc.dropout,
            qkv_bias=mc.qkv_bias,
            causal=mc.causal_mask,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GPTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"GPTConfig: unknown keys {unknown}; known keys: {sorted(known)}")
        return cls(**d)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        if config.n_embd % config.n_head != 0:
            raise ValueError(f"n_embd ({config.n_embd}) must be divisible by n_head ({config.n_head})")
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.qkv_bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_drop = nn.Dropout(config.dropout)
        # Runtime kernel choices (see configure_kernels); they never change the weights.
        self.fused_qkv = True
        self.backend: SDPBackend | None = None

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`key_mask` (B, 1, 1, T) bool, True for real tokens: bidirectional attention; None: causal."""
        B, T, C = x.shape
        if self.fused_qkv:
            q, k, v = self.qkv(x).split(self.n_embd, dim=2)
        else:  # three projections from the same weight: only for measuring what fusing saves
            biases = self.qkv.bias.chunk(3) if self.qkv.bias is not None else (None,) * 3
            q, k, v = (F.linear(x, w, b) for w, b in zip(self.qkv.weight.chunk(3), biases))
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = self._attend(q, k, v, key_mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_drop(self.proj(y))

    def _attend(self, q, k, v, key_mask: torch.Tensor | None) -> torch.Tensor:
        # Causal attention over right padding needs no mask: real tokens never attend to the padding
        # after them, so is_causal=True lets SDPA pick the flash / memory-efficient kernels.
        kwargs = dict(attn_mask=key_mask, dropout_p=self.dropout if self.training else 0.0,
                      is_causal=key_mask is None)
        if self.backend is None:
            return F.scaled_dot_product_attention(q, k, v, **kwargs)
        with sdpa_kernel(self.backend):
            return F.scaled_dot_product_attention(q, k, v, **kwargs)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), key_mask)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """The GPT-2 backbone: token ids -> hidden states after the final LayerNorm."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.context_length, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """`lengths` matters only without the causal mask: padding is then masked out as a key."""
        B, T = input_ids.shape
        if T > self.config.context_length:
            raise ValueError(
                f"sequence length {T} exceeds the model's context length {self.config.context_length}"
            )
        pos = torch.arange(T, device=input_ids.device)
        x = self.drop(self.wte(input_ids) + self.wpe(pos))
        key_mask = None
        if not self.config.causal:
            real = lengths.to(input_ids.device) if lengths is not None else torch.full((B,), T, device=pos.device)
            key_mask = (pos[None, :] < real[:, None])[:, None, None, :]
        for block in self.blocks:
            x = block(x, key_mask)
        return self.ln_f(x)

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """GPT-2's LM head, tied to the token embedding."""
        return hidden @ self.wte.weight.T


class GPTClassifier(nn.Module):
    """A classifier head on a backbone: GPT-2 (GPTConfig) or a Llama / Qwen3 decoder (DecoderConfig)."""

    def __init__(self, gpt_config: GPTConfig | DecoderConfig, num_classes: int, pooling: str = "last",
                 head_init: str = "gpt2", head_bias: bool = True, backbone: nn.Module | None = None):
        """`backbone`: one built elsewhere, whose weights are loaded next (build_model): only the head is
        initialised here."""
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling {pooling!r} is not one of {', '.join(POOLINGS)}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.pooling = pooling
        self.num_classes = num_classes
        decoder = isinstance(gpt_config, DecoderConfig)
        built = backbone is None
        if built:
            backbone = Decoder(gpt_config, lm_head=False) if decoder else GPT(gpt_config)
        self.backbone = backbone
        self.head = nn.Linear(gpt_config.n_embd, num_classes, bias=head_bias)
        if not built:
            self.head.apply(_init_weights)
            init_head(self.head, head_init)
            return
        self.apply(_init_weights)
        # GPT-2: scale the init of the projections that write into the residual stream.
        std = 0.02 / math.sqrt(2 * gpt_config.n_layer)
        for block in self.backbone.blocks:
            out_projs = (block.attn.o_proj, block.mlp.down_proj) if decoder else (block.attn.proj, block.mlp.proj)
            for proj in out_projs:
                nn.init.normal_(proj.weight, mean=0.0, std=std)
        init_head(self.head, head_init)

    @property
    def config(self) -> GPTConfig | DecoderConfig:
        return self.backbone.config

    @property
    def head_linear(self) -> nn.Linear:
        """The head's own Linear, also under a LoRA wrapper (lora.targets with head)."""
        return getattr(self.head, "base", self.head)

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """`lengths` (right padding) marks the real tokens; None means every position is real."""
        hidden = self.backbone(input_ids, lengths)
        return self.head(pool(hidden, lengths, self.pooling))


def pool(hidden: torch.Tensor, lengths: torch.Tensor | None, pooling: str) -> torch.Tensor:
    B, T, _ = hidden.shape
    if pooling == "first":
        return hidden[:, 0, :]
    if pooling == "last" or (lengths is None and pooling == "last_token"):
        return hidden[:, -1, :]
    if lengths is None:
        lengths = torch.full((B,), T, device=hidden.device)
    lengths = lengths.to(hidden.device)
    if pooling == "last_token":
        return hidden[torch.arange(B, device=hidden.device), lengths - 1]
    if pooling == "mean":
        mask = torch.arange(T, device=hidden.device)[None, :] < lengths[:, None]
        summed = hidden.float().masked_fill(~mask[:, :, None], 0.0).sum(dim=1)
        return (summed / lengths.clamp(min=1)[:, None].float()).to(hidden.dtype)
    raise ValueError(f"pooling {pooling!r} is not one of {', '.join(POOLINGS)}")


def init_head(head: nn.Linear, head_init: str) -> None:
    """model.head_init. gpt2: normal(0, 0.02) and a zero bias, as every Linear here (already done by
    _init_weights). torch: nn.Linear's own default (kaiming uniform, uniform bias), as the chapter's
    `nn.Linear(768, 2)` out_head; draws from the global RNG after the rest of the model."""
    if head_init == "torch":
        head.reset_parameters()
    elif head_init != "gpt2":
        raise ValueError(f"head_init must be 'gpt2' or 'torch', got {head_init!r}")


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)


def trainable_prefixes(policy: str, n_layer: int) -> tuple[str, ...]:
    """Parameter-name prefixes that train under `policy` (see config.Trainable)."""
    trainable = Trainable.parse(policy)
    if trainable.blocks is None:
        return ("",)
    if trainable.blocks == 0:  # head (lora: plus the adapters, see set_trainable)
        return ("head.",)
    n = trainable.blocks
    if not 1 <= n <= n_layer:  # a ConfigError: model.name=auto learns n_layer from config.json only here
        raise ConfigError(f"model.trainable: {policy!r} asks for {n} blocks but the model has {n_layer}; choose "
                          f"at most last_{n_layer}_blocks")
    blocks = tuple(f"backbone.blocks.{i}." for i in range(n_layer - n, n_layer))
    return blocks + ("backbone.ln_f.", "head.")


def set_trainable(model: GPTClassifier, policy: str, lora: LoraConfig | None = None) -> None:
    """Freezes all but the policy's parameters; `lora` first wraps its targets with adapters."""
    if policy == "lora":
        from dist_finetune.config import LoraConfig
        from dist_finetune.lora import apply_lora, is_lora_trainable

        lora = lora or LoraConfig()
        apply_lora(model, lora)
        for name, p in model.named_parameters():
            p.requires_grad_(is_lora_trainable(name, tuple(lora.targets)))
        return
    prefixes = trainable_prefixes(policy, model.config.n_layer)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(prefixes))


def configure_kernels(model: nn.Module, fused_qkv: bool = True, attention_backend: str = "auto") -> None:
    """Kernel choices for every attention layer: fused or separate Q/K/V matmuls, the SDPA backend."""
    backend = None if attention_backend == "auto" else SDPA_BACKENDS[attention_backend]
    for module in model.modules():
        if isinstance(module, CausalSelfAttention):
            module.fused_qkv = fused_qkv or not isinstance(module.qkv, nn.Linear)
            module.backend = backend
        elif isinstance(module, DecoderAttention):  # separate q/k/v projections: nothing to fuse
            module.backend = backend


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts (whole, also where ZeRO-3 holds a share of each)."""
    params = list(model.parameters())
    return sum(full_numel(p) for p in params if p.requires_grad), sum(full_numel(p) for p in params)


def build_model(mc: ModelConfig, num_classes: int, lora: LoraConfig | None = None,
                run_dir: Path | None = None, ds_config: dict[str, Any] | None = None,
                random_backbone: bool = False) -> GPTClassifier:
    """The architecture (families.backbone_config: GPT-2 or a Llama / Qwen3 decoder) with GPT-2's random
    init; weights.load_pretrained loads weights. A decoder's backbone is not initialised (NaN: every weight is
    loaded next, from its checkpoint or the run's), and with a ZeRO-3 `ds_config` it is built partitioned across
    the ranks (zero3.py): every rank must call then. `random_backbone`: a decoder that will not be loaded (a
    benchmark) gets GPT-2's random init too.

    With `lora` and model.trainable=lora, the adapters are in place too (to read a LoRA checkpoint).
    `run_dir`: a run read back (a resume, evaluate, export): a decoder's architecture as the run saved it.
    """
    from dist_finetune.decoder_weights import unloaded_decoder  # both import this module
    from dist_finetune.families import backbone_config

    arch = backbone_config(mc, run_dir)
    unloaded = isinstance(arch, DecoderConfig) and not random_backbone
    backbone = unloaded_decoder(arch, lm_head=False, ds_config=ds_config) if unloaded else None
    model = GPTClassifier(arch, num_classes, pooling=mc.pooling, head_init=mc.head_init, head_bias=mc.head_bias,
                          backbone=backbone)
    if lora is not None and mc.trainable == "lora":
        from dist_finetune.lora import apply_lora

        apply_lora(model, lora)
    return model
