"""The GPT-2 architecture, the classifier's pooling and the freezing policies."""
from __future__ import annotations

import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from dist_finetune.config import ModelConfig
from dist_finetune.model import (
    configure_kernels,
    POOLINGS,
    GPTClassifier,
    GPTConfig,
    build_model,
    count_parameters,
    set_trainable,
)

TINY = GPTConfig(vocab_size=50257, context_length=64, n_embd=64, n_layer=2, n_head=4)
EOT = 50256


def tiny(num_classes: int = 2, pooling: str = "last", seed: int = 0, **changes) -> GPTClassifier:
    torch.manual_seed(seed)
    cfg = GPTConfig(**{**TINY.to_dict(), **changes})
    return GPTClassifier(cfg, num_classes, pooling).eval()


def hf_tiny(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(
        n_layer=2, n_embd=64, n_head=4, n_positions=64, vocab_size=50257,
        activation_function="gelu_new", resid_pdrop=0, embd_pdrop=0, attn_pdrop=0,
    )
    return GPT2LMHeadModel(cfg).eval()


def copy_from_hf(ours: GPTClassifier, hf: GPT2LMHeadModel) -> None:
    """Written independently of weights.py: HF Conv1D weights are [in, out], ours [out, in]."""
    src, dst = hf.transformer, ours.backbone
    with torch.no_grad():
        dst.wte.weight.copy_(src.wte.weight)
        dst.wpe.weight.copy_(src.wpe.weight)
        dst.ln_f.load_state_dict(src.ln_f.state_dict())
        for s, d in zip(src.h, dst.blocks):
            d.ln_1.load_state_dict(s.ln_1.state_dict())
            d.ln_2.load_state_dict(s.ln_2.state_dict())
            for s_lin, d_lin in ((s.attn.c_attn, d.attn.qkv), (s.attn.c_proj, d.attn.proj),
                                 (s.mlp.c_fc, d.mlp.fc), (s.mlp.c_proj, d.mlp.proj)):
                d_lin.weight.copy_(s_lin.weight.T)
                d_lin.bias.copy_(s_lin.bias)


# ---------------------------------------------------------------- architecture


def test_shapes():
    model = tiny(num_classes=3)
    ids = torch.randint(0, 50257, (2, 10))
    hidden = model.backbone(ids)
    assert hidden.shape == (2, 10, 64)
    assert model.backbone.lm_logits(hidden).shape == (2, 10, 50257)
    for pooling in POOLINGS:
        model.pooling = pooling
        assert model(ids, torch.tensor([10, 4])).shape == (2, 3)


def test_matches_transformers_gpt2():
    hf, ours = hf_tiny(), tiny()
    copy_from_hf(ours, hf)
    ids = torch.randint(0, 50257, (3, 40))
    with torch.no_grad():
        ref = hf(ids, output_hidden_states=True)
        hidden = ours.backbone(ids)
        torch.testing.assert_close(hidden, ref.hidden_states[-1], atol=1e-5, rtol=0)
        torch.testing.assert_close(ours.backbone.lm_logits(hidden), ref.logits, atol=1e-5, rtol=0)


def test_sequence_longer_than_context_is_refused():
    with pytest.raises(ValueError, match="context length 64"):
        tiny().backbone(torch.zeros(1, 65, dtype=torch.long))


def test_dropout_only_in_training():
    model = tiny(dropout=0.5)
    ids = torch.randint(0, 50257, (2, 12))
    lengths = torch.tensor([12, 5])
    assert torch.equal(model(ids, lengths), model(ids, lengths))
    model.train()
    assert not torch.equal(model(ids, lengths), model(ids, lengths))


def test_bf16_forward():
    model = tiny(pooling="mean").to(torch.bfloat16)
    logits = model(torch.randint(0, 50257, (2, 8)), torch.tensor([8, 3]))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def test_unknown_pooling_is_refused():
    with pytest.raises(ValueError, match="pooling 'middle'"):
        tiny(pooling="middle")


# ---------------------------------------------------------------- pooling


def _pad(text: list[int], total: int, how: str, gen: torch.Generator) -> list[int]:
    n = total - len(text)
    if how == "eot":
        return text + [EOT] * n
    return text + torch.randint(0, 50257, (n,), generator=gen).tolist()


@pytest.mark.parametrize("pooling", ["last_token", "mean"])
def test_padding_does_not_change_logits(pooling):
    model = tiny(pooling=pooling)
    gen = torch.Generator().manual_seed(1)
    texts = [torch.randint(0, 50256, (n,), generator=gen).tolist() for n in (1, 7, 20)]
    texts.append(texts[1][:-1] + [EOT])  # a text that itself ends in <|endoftext|>
    with torch.no_grad():
        alone = torch.cat([model(torch.tensor([t]), torch.tensor([len(t)])) for t in texts])
        for total in (20, 33, 64):
            for how in ("eot", "random"):
                ids = torch.tensor([_pad(t, total, how, gen) for t in texts])
                lengths = torch.tensor([len(t) for t in texts])
                torch.testing.assert_close(model(ids, lengths), alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("pooling", ["last_token", "mean"])
def test_trailing_endoftext_is_part_of_the_text(pooling):
    model = tiny(pooling=pooling)
    text = [15496, 11, 995, EOT]
    with torch.no_grad():
        padded = model(torch.tensor([text + [EOT] * 6]), torch.tensor([4]))
        whole = model(torch.tensor([text]), torch.tensor([4]))
        without = model(torch.tensor([text[:-1]]), torch.tensor([3]))
    torch.testing.assert_close(padded, whole, atol=1e-5, rtol=0)
    assert not torch.allclose(padded, without, atol=1e-4)


def test_pooled_values():
    model = tiny(pooling="last")
    ids = torch.randint(0, 50257, (2, 9))
    lengths = torch.tensor([9, 4])
    with torch.no_grad():
        hidden = model.backbone(ids)
        torch.testing.assert_close(model(ids, lengths), model.head(hidden[:, -1]))
        model.pooling = "last_token"
        torch.testing.assert_close(model(ids, lengths), model.head(hidden[[0, 1], [8, 3]]))
        model.pooling = "mean"
        means = torch.stack([hidden[0].mean(0), hidden[1, :4].mean(0)])
        torch.testing.assert_close(model(ids, lengths), model.head(means))
        # no lengths: every position is real
        torch.testing.assert_close(model(ids), model.head(hidden.mean(1)))


# ---------------------------------------------------------------- freezing


def _trainable(model: GPTClassifier) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _names(model: GPTClassifier, *prefixes: str) -> set[str]:
    return {n for n, _ in model.named_parameters() if n.startswith(prefixes)}


@pytest.mark.parametrize(
    "policy, prefixes",
    [
        ("all", ("",)),
        ("head", ("head.",)),
        ("last_block", ("backbone.blocks.1.", "backbone.ln_f.", "head.")),
        ("last_1_blocks", ("backbone.blocks.1.", "backbone.ln_f.", "head.")),
        ("last_2_blocks", ("backbone.blocks.0.", "backbone.blocks.1.", "backbone.ln_f.", "head.")),
    ],
)
def test_set_trainable(policy, prefixes):
    model = tiny()
    set_trainable(model, "head")  # a second call must fully replace the first
    set_trainable(model, policy)
    assert _trainable(model) == _names(model, *prefixes)


def test_last_block_names_exactly():
    model = tiny()
    set_trainable(model, "last_block")
    block = {f"backbone.blocks.1.{n}" for n in (
        "ln_1.weight", "ln_1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
        "attn.proj.bias", "ln_2.weight", "ln_2.bias", "mlp.fc.weight", "mlp.fc.bias",
        "mlp.proj.weight", "mlp.proj.bias")}
    assert _trainable(model) == block | {"backbone.ln_f.weight", "backbone.ln_f.bias",
                                         "head.weight", "head.bias"}


@pytest.mark.parametrize("policy", ["last_3_blocks", "last_0_blocks", "everything"])
def test_bad_policies_are_refused(policy):
    with pytest.raises(ValueError, match=policy):
        set_trainable(tiny(), policy)


def test_count_parameters():
    model = tiny(num_classes=3)
    total = sum(p.numel() for p in model.parameters())
    assert count_parameters(model) == (total, total)
    set_trainable(model, "head")
    assert count_parameters(model) == (64 * 3 + 3, total)


def test_frozen_parameters_get_no_gradient():
    model = tiny().train()
    set_trainable(model, "last_block")
    model(torch.randint(0, 50257, (2, 6)), torch.tensor([6, 2])).sum().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name


# ---------------------------------------------------------------- config and building


def test_gpt_config_round_trip_and_presets():
    assert GPTConfig.from_dict(TINY.to_dict()) == TINY
    with pytest.raises(ValueError, match="n_heads"):
        GPTConfig.from_dict({**TINY.to_dict(), "n_heads": 4})
    cfg = GPTConfig.from_model_config(ModelConfig(name="gpt2-medium", dropout=0.1, qkv_bias=False))
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.context_length) == (24, 16, 1024, 1024)
    assert (cfg.dropout, cfg.qkv_bias, cfg.vocab_size) == (0.1, False, 50257)


def test_build_model_uses_the_config_and_gpt2_init():
    mc = ModelConfig(name="custom", n_layer=2, n_head=4, n_embd=64, context_length=64,
                     pooling="mean", qkv_bias=False)
    torch.manual_seed(0)
    model = build_model(mc, num_classes=5)
    assert model.config == GPTConfig(context_length=64, n_embd=64, n_layer=2, n_head=4, qkv_bias=False)
    assert model.pooling == "mean" and model.head.out_features == 5 and model.head.bias is not None
    assert model.backbone.blocks[0].attn.qkv.bias is None
    assert all(p.requires_grad for p in model.parameters())
    block = model.backbone.blocks[0]
    assert block.mlp.fc.weight.std().item() == pytest.approx(0.02, rel=0.1)
    residual_std = 0.02 / math.sqrt(2 * 2)
    assert block.attn.proj.weight.std().item() == pytest.approx(residual_std, rel=0.1)
    assert block.mlp.proj.weight.std().item() == pytest.approx(residual_std, rel=0.1)
    assert torch.all(block.mlp.fc.bias == 0) and torch.all(model.head.bias == 0)
    assert torch.all(block.ln_1.weight == 1)


# ---------------------------------------------------------------- kernel choices


def test_unfused_qkv_and_math_attention_compute_the_same_logits():
    model = tiny(pooling="last_token", seed=3).eval()
    ids = torch.randint(0, 50257, (3, 20), generator=torch.Generator().manual_seed(1))
    lengths = torch.tensor([20, 7, 12])
    expected = model(ids, lengths)
    for fused, backend in ((False, "auto"), (True, "math"), (False, "math")):
        configure_kernels(model, fused_qkv=fused, attention_backend=backend)
        torch.testing.assert_close(model(ids, lengths), expected, atol=1e-5, rtol=0)
    assert set(model.state_dict()) == set(tiny().state_dict())  # the weights are untouched


def test_lora_attention_stays_fused():
    from dist_finetune.config import LoraConfig
    from dist_finetune.lora import apply_lora

    model = tiny()
    apply_lora(model, LoraConfig(targets=("attn",)))
    configure_kernels(model, fused_qkv=False)
    assert all(block.attn.fused_qkv for block in model.backbone.blocks)
    model(torch.randint(0, 50257, (2, 5)))
