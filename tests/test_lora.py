"""LoRA: which parameters train, what the optimizer holds, merged export == unmerged model, real runs."""
from __future__ import annotations

import copy

import pytest
import torch

import runner
from dist_finetune.config import ConfigError, from_dict, load_config
from dist_finetune.engine import param_group_names, param_groups
from dist_finetune.lora import LoRALinear, merge_lora
from dist_finetune.model import build_model, set_trainable
from dist_finetune.weights import load_export, save_export

ARCH = {"name": "custom", "n_layer": 2, "n_head": 4, "n_embd": 64, "context_length": 32, "trainable": "lora"}


def lora_model(targets=("attn",), **lora):
    cfg = from_dict({"model": ARCH, "lora": {"targets": list(targets), "rank": 4, **lora}})
    model = build_model(cfg.model, 2)
    set_trainable(model, "lora", cfg.lora)
    return model, cfg


def randomize_adapters(model):
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)


def batch():
    torch.manual_seed(1)
    return torch.randint(0, 50257, (3, 12)), torch.tensor([12, 7, 3])


def test_only_adapters_and_head_get_gradients():
    model, _ = lora_model(targets=("attn", "mlp"))
    randomize_adapters(model)
    ids, lengths = batch()
    model(ids, lengths).sum().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all(".lora_" in n or n.startswith("head.") for n in with_grad)
    assert {n for n in with_grad if n.startswith("head.")} == {"head.weight", "head.bias"}
    assert any(".mlp.fc.lora_A" in n for n in with_grad) and any(".attn.qkv.lora_B" in n for n in with_grad)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".base." in n or n.startswith("backbone.w"))


def test_head_target_freezes_the_head_base():
    model, _ = lora_model(targets=("head",))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"head.lora_A.weight", "head.lora_B.weight"}
    assert isinstance(model.head, LoRALinear) and model.head.out_features == 2


def test_optimizer_holds_only_adapters_and_head_with_decay_on_adapter_matrices():
    model, _ = lora_model()
    groups = param_groups(model, 0.1)
    held = {id(p) for g in groups for p in g["params"]}
    assert held == {id(p) for p in model.parameters() if p.requires_grad}
    decay, no_decay = param_group_names(model)
    assert all(".lora_" in n or n == "head.weight" for n in decay)
    assert no_decay == ["head.bias"]


def test_fresh_adapters_change_nothing_and_merge_matches_unmerged(tmp_path):
    cfg = from_dict({"model": ARCH, "lora": {"targets": ["attn", "mlp", "head"], "rank": 4}})
    plain = build_model(cfg.model, 2).eval()
    model = copy.deepcopy(plain)
    set_trainable(model, "lora", cfg.lora)  # wraps the loaded weights, as training does
    ids, lengths = batch()
    model.eval()
    assert torch.allclose(model(ids, lengths), plain(ids, lengths), atol=1e-6)  # lora_B starts at zero
    randomize_adapters(model)
    before = model(ids, lengths)
    merged = merge_lora(copy.deepcopy(model))
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert torch.allclose(merged(ids, lengths), before, atol=1e-5)
    save_export(merged, tmp_path / "merged", "last", ["ham", "spam"])
    loaded, _ = load_export(tmp_path / "merged")
    assert torch.allclose(loaded(ids, lengths), before, atol=1e-5)


def test_separate_export_rebuilds_the_adapters(tmp_path):
    from dist_finetune.config import to_dict

    model, cfg = lora_model(targets=("attn", "mlp"), export="separate")
    randomize_adapters(model)
    model.eval()
    ids, lengths = batch()
    save_export(model, tmp_path / "sep", "last", ["ham", "spam"], lora=to_dict(cfg.lora))
    loaded, _ = load_export(tmp_path / "sep")
    assert any(isinstance(m, LoRALinear) for m in loaded.modules())
    assert torch.allclose(loaded(ids, lengths), model(ids, lengths), atol=1e-6)


@pytest.mark.parametrize("override, key", [
    ("lora.rank=0", "lora.rank"), ("lora.alpha=-1", "lora.alpha"), ("lora.dropout=1.0", "lora.dropout"),
    ("lora.targets=[attn, ffn]", "lora.targets"), ("lora.export=both", "lora.export"),
])
def test_bad_lora_settings_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, ["model.trainable=lora", override])


@pytest.mark.slow
def test_lora_run_trains_exports_merged_and_matches_full_training(tmp_path):
    common = ["train.max_steps=60", "train.lr=3e-3", "eval.max_batches=4", "early_stopping.enabled=false"]
    full = runner.train(tmp_path, "full", common)
    lora = runner.train(tmp_path, "lora", [*common, "model.trainable=lora", "lora.rank=8",
                                           "lora.targets=[attn, mlp]"])
    assert full.ok, full.output()
    assert lora.ok, lora.output()
    f, l = full.summary(), lora.summary()
    assert l["trainable_parameters"] < f["trainable_parameters"] / 5
    assert l["val"]["accuracy"] > 0.75 or abs(l["val"]["accuracy"] - f["val"]["accuracy"]) <= 0.1, (l, f)
    model, _ = load_export(lora.dir / "export")
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert "backbone.blocks.0.attn.qkv.weight" in model.state_dict()


@pytest.mark.slow
def test_lora_under_zero3_two_ranks_bf16_trains_and_exports(tmp_path):
    run = runner.train(tmp_path, "z3", ["model.trainable=lora", "lora.targets=[attn, mlp, head]", "zero.stage=3",
                                        "precision=bf16", "train.max_steps=6", "eval.max_batches=2",
                                        "lora.export=separate"], nproc=2)
    assert run.ok, run.output()
    s = run.summary()
    assert s["zero_stage"] == 3 and s["global_step"] == 6
    model, _ = load_export(run.dir / "export")
    assert isinstance(model.head, LoRALinear)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # the adapters moved off zero
