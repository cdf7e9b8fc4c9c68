"""The chapter's recipe, switchable: decay on every trainable parameter, no clipping, LoRA's `alpha * (x A B)`
with the chapter's A init, and nn.Linear's default head init; the experiment configs select all of it."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from dist_finetune.config import Config, LoraConfig, load_config
from dist_finetune.engine import BatchPlan, deepspeed_config, make_optimizer, param_group_names, param_groups
from dist_finetune.lora import LoRALinear
from dist_finetune.model import GPTClassifier, GPTConfig, build_model, set_trainable

REPO = Path(__file__).resolve().parents[1]
TINY = ["model.name=custom", "model.n_layer=2", "model.n_head=4", "model.n_embd=64", "model.context_length=32"]
CHAPTER_CONFIGS = sorted((REPO / "configs" / "experiments").glob("row*.yaml")) + [REPO / "configs" / "gpt2_small_spam.yaml"]


def tiny(policy: str, *overrides: str, seed: int = 0) -> tuple[GPTClassifier, Config]:
    cfg = load_config(None, [*TINY, f"model.trainable={policy}", *overrides])
    torch.manual_seed(seed)
    model = build_model(cfg.model, num_classes=2)
    set_trainable(model, policy, cfg.lora)
    return model, cfg


# ---------------------------------------------------------------- train.decay


@pytest.mark.parametrize("policy", ["all", "last_block", "lora"])
def test_decay_all_puts_every_trainable_parameter_in_one_decayed_group(policy: str) -> None:
    model, cfg = tiny(policy, "train.decay=all")
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(model, cfg, torch.device("cpu"))
    assert len(optimizer.param_groups) == 1
    assert optimizer.param_groups[0]["weight_decay"] == 0.1
    assert [id(p) for p in optimizer.param_groups[0]["params"]] == [id(p) for p in trainable]
    names = param_group_names(model, "all")
    assert names == [[n for n, p in model.named_parameters() if p.requires_grad]]
    assert any(n.endswith(("bias", "ln_f.weight")) for n in names[0])  # what linear_weights spares


def test_decay_linear_weights_keeps_the_old_split() -> None:
    model, cfg = tiny("all")
    assert cfg.train.decay == "linear_weights"
    decay, no_decay = param_group_names(model)
    assert decay and all(n.endswith("weight") and "ln" not in n and "wte" not in n and "wpe" not in n for n in decay)
    assert "head.bias" in no_decay and "backbone.ln_f.weight" in no_decay
    groups = make_optimizer(model, cfg, torch.device("cpu")).param_groups
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert [len(g["params"]) for g in groups] == [len(decay), len(no_decay)]
    assert [len(g["params"]) for g in param_groups(model, 0.1, "linear_weights")] == [len(decay), len(no_decay)]


def test_decay_all_decays_a_bias_in_a_real_step() -> None:
    model, cfg = tiny("head", "train.decay=all", "train.lr=0.1")
    with torch.no_grad():
        model.head.bias.fill_(1.0)
    optimizer = make_optimizer(model, cfg, torch.device("cpu"))
    model.head.bias.grad = torch.zeros_like(model.head.bias)
    model.head.weight.grad = torch.zeros_like(model.head.weight)
    optimizer.step()
    assert torch.allclose(model.head.bias, torch.full_like(model.head.bias, 1.0 - 0.1 * 0.1))


# ---------------------------------------------------------------- clipping


def test_grad_clip_zero_means_no_clipping_in_deepspeed() -> None:
    cfg = load_config(None, ["train.grad_clip=0"])
    assert deepspeed_config(cfg, BatchPlan(8, 1, 1), "fp32")["gradient_clipping"] == 0.0
    assert Config().train.grad_clip == 1.0  # our default is unchanged


# ---------------------------------------------------------------- lora.scaling / lora.a_init


@pytest.mark.parametrize(("scaling", "factor"), [("alpha", 16.0), ("alpha_over_rank", 16.0 / 4)])
def test_lora_output_is_base_plus_scaled_x_a_b(scaling: str, factor: float) -> None:
    torch.manual_seed(0)
    base = nn.Linear(12, 5)
    layer = LoRALinear(base, rank=4, alpha=16.0, scaling=scaling)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    a, b = layer.lora_A.weight.T, layer.lora_B.weight.T  # the chapter's (in, rank) and (rank, out)
    x = torch.randn(3, 12)
    expected = base(x) + factor * (x @ a @ b)
    assert torch.allclose(layer(x), expected, atol=1e-5)
    merged = layer.merged()
    assert torch.allclose(merged(x), expected, atol=1e-5)


def test_apply_lora_passes_scaling_and_a_init() -> None:
    model, _ = tiny("lora", "lora.rank=4", "lora.alpha=16", "lora.scaling=alpha", "lora.a_init=rank")
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert layers and all(m.scale == 16.0 for m in layers)
    model, _ = tiny("lora", "lora.rank=4", "lora.alpha=16")
    assert all(m.scale == 4.0 for m in model.modules() if isinstance(m, LoRALinear))


def test_a_init_rank_is_the_chapters_kaiming_uniform_over_rank() -> None:
    torch.manual_seed(0)
    rank, n_in = 16, 768
    chapter = LoRALinear(nn.Linear(n_in, 4), rank, 16.0, a_init="rank").lora_A.weight.detach()
    ours = LoRALinear(nn.Linear(n_in, 4), rank, 16.0).lora_A.weight.detach()
    assert chapter.abs().max() <= 1 / math.sqrt(rank) and ours.abs().max() <= 1 / math.sqrt(n_in)
    # uniform on +-bound: std = bound / sqrt(3)
    assert chapter.std().item() == pytest.approx(1 / math.sqrt(rank) / math.sqrt(3), rel=0.05)
    assert chapter.abs().max() > 0.9 / math.sqrt(rank)


def test_lora_config_defaults_are_unchanged() -> None:
    assert (LoraConfig().scaling, LoraConfig().a_init) == ("alpha_over_rank", "in_features")


# ---------------------------------------------------------------- model.head_init


def test_head_init_torch_equals_a_fresh_nn_linear_under_the_same_rng() -> None:
    gpt = GPTConfig(n_layer=2, n_head=4, n_embd=64, context_length=32)
    torch.manual_seed(7)
    chapter = GPTClassifier(gpt, 3, head_init="torch")
    torch.manual_seed(7)
    GPTClassifier(gpt, 3, head_init="gpt2")  # the same draws up to the head's re-init
    fresh = nn.Linear(64, 3)
    assert torch.equal(chapter.head.weight, fresh.weight) and torch.equal(chapter.head.bias, fresh.bias)
    assert chapter.head.bias.abs().sum() > 0


def test_head_init_gpt2_is_the_default_normal_with_zero_bias() -> None:
    model, cfg = tiny("all", "model.n_embd=256", "model.n_head=4")
    assert cfg.model.head_init == "gpt2"
    assert torch.count_nonzero(model.head.bias) == 0
    assert model.head.weight.std().item() == pytest.approx(0.02, rel=0.15)


def test_build_model_uses_model_head_init() -> None:
    model, _ = tiny("all", "model.head_init=torch")
    bound = 1 / math.sqrt(64)
    assert model.head.weight.abs().max() <= bound and model.head.weight.std() > 0.03
    assert torch.count_nonzero(model.head.bias) > 0


# ---------------------------------------------------------------- the experiment configs


@pytest.mark.parametrize("path", CHAPTER_CONFIGS, ids=lambda p: p.name)
def test_experiment_configs_are_the_chapters_recipe(path: Path) -> None:
    cfg = load_config(path)
    assert (cfg.train.decay, cfg.train.grad_clip, cfg.model.head_init) == ("all", 0.0, "torch")
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.train.betas, cfg.train.eps) == (5e-5, 0.1, (0.9, 0.999), 1e-8)
    assert cfg.precision == "fp32" and not cfg.early_stopping.enabled and cfg.train.epochs == 5
    assert cfg.train.micro_batch_size * (cfg.train.grad_accum_steps or 1) in (1, 8)  # rows 14, 15: batch 1 / 1 x 8
    if cfg.model.trainable == "lora":
        assert (cfg.lora.scaling, cfg.lora.a_init) == ("alpha", "rank")
    text = path.read_text()
    for key in ("train.decay: all", "train.grad_clip: 0", "model.head_init: torch"):
        assert key in text  # each file says what differs from our defaults, and why
