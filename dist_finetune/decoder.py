"""Llama 3.x / SmolLM2 / Qwen3 decoders: one configurable module, parity-tested against transformers.

The two families share RMSNorm, rotary positions (RoPE, with Llama 3's frequency scaling), grouped-
query attention and a SwiGLU MLP; Qwen3 adds an RMSNorm over each head of q and k (`qk_norm`). GPT-2
(learned positions, LayerNorm, GELU, fused qkv) stays in model.py.

`Decoder` presents the backbone interface of `model.GPT`: `forward(input_ids, lengths) -> hidden
states after the final norm`, `.blocks`, `.ln_f`, `.wte`, `.lm_logits(hidden)` and a `.config` with
vocab_size / n_embd / n_layer / n_head / context_length. Inside a block the linear layers keep the
Hugging Face names (attn.q_proj ... mlp.down_proj), so LoRA targets and the weight map read alike.
Right padding with causal attention: real tokens never see the padding after them, so no mask.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

FAMILIES = ("llama", "qwen3")
HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}
LLAMA3_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
# What transformers assumes when config.json leaves a key out (LlamaConfig / Qwen3Config defaults).
_HF_DEFAULTS: dict[str, Any] = dict(rms_norm_eps=1e-6, tie_word_embeddings=False, attention_bias=False,
                                    mlp_bias=False, attention_dropout=0.0)
_ROPE_THETA_DEFAULT = 10000.0
_MAX_POSITIONS_DEFAULT = {"llama": 2048, "qwen3": 32768}


@dataclass(frozen=True)
class DecoderConfig:
    family: str  # the Hugging Face model_type: "llama" (Llama 3.x, SmolLM2) or "qwen3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, float] | None = None  # Llama 3: the four LLAMA3_SCALING_KEYS; None: plain RoPE
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool | None = None  # Qwen3's per-head q/k RMSNorm; None: as the family has it
    attention_dropout: float = 0.0
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()  # Llama 3 instruct checkpoints stop on several

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"DecoderConfig.family {self.family!r} is not one of {', '.join(FAMILIES)}")
        if self.qk_norm is None:
            object.__setattr__(self, "qk_norm", self.family == "qwen3")
        if self.qk_norm != (self.family == "qwen3"):
            raise ValueError(f"qk_norm={self.qk_norm} does not exist in the {self.family} family")
        eos = self.eos_token_id
        object.__setattr__(self, "eos_token_id", () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos))
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for rotary positions")
        if self.rope_scaling is not None and set(self.rope_scaling) != set(LLAMA3_SCALING_KEYS):
            raise ValueError(f"rope_scaling keys {sorted(self.rope_scaling)}: expected {list(LLAMA3_SCALING_KEYS)}")

    # The names the rest of the framework reads on model.GPT's config.
    @property
    def n_embd(self) -> int:
        return self.hidden_size

    @property
    def n_layer(self) -> int:
        return self.num_hidden_layers

    @property
    def n_head(self) -> int:
        return self.num_attention_heads

    @property
    def context_length(self) -> int:
        return self.max_position_embeddings

    @property
    def causal(self) -> bool:
        return True

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> DecoderConfig:
        """From a Hugging Face config.json (transformers 4's rope_theta / rope_scaling or 5's rope_parameters)."""
        family = hf.get("model_type")
        if family not in FAMILIES:
            raise ValueError(f"model_type {family!r} is not supported: this decoder reads model_type "
                             f"{' or '.join(FAMILIES)} (GPT-2 checkpoints go through model.name=gpt2*)")
        _check_supported(hf)
        heads = _required(hf, "num_attention_heads")
        hidden = _required(hf, "hidden_size")
        rope_theta, rope_scaling = _rope_from_hf(hf)
        optional = {k: v if hf.get(k) is None else hf[k] for k, v in _HF_DEFAULTS.items()}
        head_dim = hf.get("head_dim") or (128 if family == "qwen3" else hidden // heads)
        max_positions = hf.get("max_position_embeddings") or _MAX_POSITIONS_DEFAULT[family]
        return cls(
            family=family, vocab_size=_required(hf, "vocab_size"), hidden_size=hidden,
            intermediate_size=_required(hf, "intermediate_size"),
            num_hidden_layers=_required(hf, "num_hidden_layers"), num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads, head_dim=head_dim,
            max_position_embeddings=max_positions,
            rope_theta=rope_theta, rope_scaling=rope_scaling, **optional,
            bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"),
        )

    def to_hf(self) -> dict[str, Any]:
        """A config.json that transformers (4.x and 5.x) reads back into the same architecture."""
        eos = self.eos_token_id
        hf: dict[str, Any] = {
            "architectures": [HF_ARCHITECTURES[self.family]], "model_type": self.family,
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim, "hidden_act": "silu", "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta,
            "rope_scaling": {"rope_type": "llama3", **self.rope_scaling} if self.rope_scaling else None,
            "tie_word_embeddings": self.tie_word_embeddings, "attention_bias": self.attention_bias,
            "attention_dropout": self.attention_dropout, "bos_token_id": self.bos_token_id,
            "eos_token_id": None if not eos else eos[0] if len(eos) == 1 else list(eos),
        }
        if self.family == "llama":
            hf["mlp_bias"] = self.mlp_bias
        else:
            hf["use_sliding_window"] = False
        return hf

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["eos_token_id"] = list(self.eos_token_id)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DecoderConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"DecoderConfig: unknown keys {unknown}; known keys: {sorted(known)}")
        return cls(**d)


def _required(hf: dict[str, Any], key: str) -> Any:
    if hf.get(key) is None:
        raise ValueError(f"config key {key!r} is missing")
    return hf[key]


def _check_supported(hf: dict[str, Any]) -> None:
    """Variants transformers would run differently from this module: refuse them by name."""
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"config key 'hidden_act' is {act!r}; only 'silu' (SwiGLU) is supported")
    for key in ("use_sliding_window", "rope_interleaved"):
        if hf.get(key):
            raise ValueError(f"config key {key!r} is true; only full attention with half-split RoPE is supported")
    quant = hf.get("quantization_config")
    if quant:  # fp8 / GPTQ / AWQ / bitsandbytes tensors: transformers dequantizes them, this module does not
        method = quant.get("quant_method") if isinstance(quant, dict) else None
        raise ValueError(f"config key 'quantization_config' ({method or 'present'}): quantized checkpoints are not "
                         "supported; use the unquantized (bf16 / fp32) checkpoint")
    if hf.get("mlp_bias") and hf["model_type"] != "llama":
        raise ValueError("config key 'mlp_bias' is true; Qwen3 has no MLP bias")


def _rope_from_hf(hf: dict[str, Any]) -> tuple[float, dict[str, float] | None]:
    """(rope_theta, llama3 scaling or None) from either config layout."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    if any(isinstance(v, dict) for v in params.values()):
        raise ValueError("config key 'rope_parameters' is per layer type; one RoPE for all layers is supported")
    theta = float(params.get("rope_theta") or hf.get("rope_theta") or _ROPE_THETA_DEFAULT)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("config key 'partial_rotary_factor' is not 1; only full rotary head dims are supported")
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise ValueError(f"config key 'rope_type' is {rope_type!r}; supported: 'default', 'llama3'")
    params.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings"))
    missing = [k for k in LLAMA3_SCALING_KEYS if params.get(k) is None]
    if missing:
        raise ValueError(f"config key 'rope_scaling' (llama3) lacks {missing}")
    return theta, {k: params[k] for k in LLAMA3_SCALING_KEYS}


# ---------------------------------------------------------------- rotary positions


def rope_inv_freq(config: DecoderConfig) -> torch.Tensor:
    """The (head_dim / 2,) inverse frequencies in fp32 on the CPU, computed as transformers does."""
    dim = config.head_dim
    steps = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").to(torch.float) / dim
    inv_freq = 1.0 / (config.rope_theta ** steps)
    if config.rope_scaling is not None:
        inv_freq = llama3_scaled(inv_freq, **config.rope_scaling)
    return inv_freq


def llama3_scaled(inv_freq: torch.Tensor, factor: float, low_freq_factor: float, high_freq_factor: float,
                  original_max_position_embeddings: int) -> torch.Tensor:
    """Llama 3.1's scaling: long wavelengths slowed by `factor`, short ones kept, a smooth blend between."""
    old_len = original_max_position_embeddings
    low_freq_wavelen, high_freq_wavelen = old_len / low_freq_factor, old_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, seq_len: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, head_dim) cos and sin, computed in fp32 and cast to the activations' dtype (as transformers)."""
    pos = torch.arange(seq_len, device=inv_freq.device, dtype=torch.float)
    angles = pos[:, None] * inv_freq[None, :]
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D); the two halves of D rotate as one complex number (transformers' rotate_half)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


# ---------------------------------------------------------------- layers


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalised in fp32, cast back before the scale, as transformers (bit-level parity in bf16).
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, KV, T, D) -> (B, KV * n_rep, T, D): query head h reads key/value head h // n_rep."""
    if n_rep == 1:
        return x
    B, KV, T, D = x.shape
    return x[:, :, None].expand(B, KV, n_rep, T, D).reshape(B, KV * n_rep, T, D)


class Attention(nn.Module):
    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.n_head, self.n_kv_head = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        hidden, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(hidden, self.n_head * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.n_kv_head * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.n_kv_head * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, hidden, bias=bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.qk_norm = config.qk_norm
        self.dropout = config.attention_dropout
        self.backend: SDPBackend | None = None  # as model.CausalSelfAttention.backend

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        n_rep = self.n_head // self.n_kv_head
        y = self._attend(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep))
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        dropout = self.dropout if self.training else 0.0
        if self.backend is None:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        with sdpa_kernel(self.backend):
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        hidden, inner, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(hidden, inner, bias=bias)
        self.up_proj = nn.Linear(hidden, inner, bias=bias)
        self.down_proj = nn.Linear(inner, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderBlock(nn.Module):
    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.ln_1 = RMSNorm(config.hidden_size, config.rms_norm_eps)  # HF: input_layernorm
        self.attn = Attention(config)
        self.ln_2 = RMSNorm(config.hidden_size, config.rms_norm_eps)  # HF: post_attention_layernorm
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cos, sin)
        return x + self.mlp(self.ln_2(x))


class Decoder(nn.Module):
    """The Llama / Qwen3 backbone: token ids -> hidden states after the final RMSNorm.

    `lm_head=False` leaves out an untied LM head (a classifier never uses it; it is vocab x hidden).
    """

    def __init__(self, config: DecoderConfig, lm_head: bool = True):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)  # HF: model.embed_tokens
        self.blocks = nn.ModuleList(DecoderBlock(config) for _ in range(config.num_hidden_layers))
        self.ln_f = RMSNorm(config.hidden_size, config.rms_norm_eps)  # HF: model.norm
        self.lm_head = None
        if lm_head and not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # A plain attribute, not a buffer: .to(bfloat16) must not round the frequencies (the CPU copy
        # stays the fp32 master), and it is no weight to save, shard or load.
        self._inv_freq_cpu = rope_inv_freq(config)
        self._inv_freq = self._inv_freq_cpu

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """`lengths` is not needed: causal attention over right padding (see the module docstring)."""
        T = input_ids.size(1)
        if T > self.config.context_length:
            raise ValueError(f"sequence length {T} exceeds the model's context length {self.config.context_length}")
        x = self.wte(input_ids)
        cos, sin = rope_cos_sin(self._inv_freq_on(x.device), T, x.dtype)
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.ln_f(x)

    def _inv_freq_on(self, device: torch.device) -> torch.Tensor:
        if self._inv_freq.device != device:
            self._inv_freq = self._inv_freq_cpu.to(device)
        return self._inv_freq

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head is not None:
            return self.lm_head(hidden)
        if not self.config.tie_word_embeddings:
            raise ValueError("this Decoder was built with lm_head=False and its embeddings are untied")
        return F.linear(hidden, self.wte.weight)
