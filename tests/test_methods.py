"""Pooling, trainable-layer, attention-mask and padding choices, each shown by its behaviour."""
from __future__ import annotations

import pytest
import torch

import runner
from dist_finetune.config import ConfigError, from_dict, load_config
from dist_finetune.data import make_collate, ClassificationDataset
from dist_finetune.loaders import train_loader
from dist_finetune.model import build_model, set_trainable

ARCH = {"name": "custom", "n_layer": 2, "n_head": 4, "n_embd": 64, "context_length": 32}


def model_with(**model):
    torch.manual_seed(0)
    return build_model(from_dict({"model": {**ARCH, **model}}).model, 2).eval()


def two_texts():
    torch.manual_seed(3)
    a = torch.randint(0, 50000, (1, 10))
    b = a.clone()
    b[0, 1:] = torch.randint(0, 50000, (9,))  # same first token, different rest
    return a, b


def test_first_pooling_with_causal_mask_sees_only_the_first_token():
    model = model_with(pooling="first")
    a, b = two_texts()
    assert torch.equal(model(a), model(b))


def test_without_causal_mask_the_first_position_sees_the_rest():
    model = model_with(pooling="first", causal_mask=False)
    a, b = two_texts()
    assert not torch.allclose(model(a), model(b))


def test_without_causal_mask_padding_is_never_attended():
    model = model_with(pooling="mean", causal_mask=False)
    a, _ = two_texts()
    padded = torch.cat([a, torch.full((1, 6), 50256)], dim=1)
    other_pad = torch.cat([a, torch.randint(0, 50000, (1, 6))], dim=1)
    length = torch.tensor([10])
    assert torch.allclose(model(padded, length), model(a, length), atol=1e-5)
    assert torch.allclose(model(other_pad, length), model(a, length), atol=1e-5)


def test_causal_default_path_is_unchanged_by_lengths():
    model = model_with(pooling="last")
    a, _ = two_texts()
    assert torch.equal(model(a, torch.tensor([4])), model(a))  # causal: lengths only matter for pooling


@pytest.mark.parametrize("policy", ["last_layer", "head"])
def test_last_layer_trains_only_the_head(policy):
    model = model_with(trainable=policy)
    set_trainable(model, policy)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"head.weight", "head.bias"}


def test_last_n_blocks_trains_those_blocks_final_norm_and_head():
    model = model_with()
    set_trainable(model, "last_2_blocks")
    trained = {n.split(".")[2] for n, p in model.named_parameters() if p.requires_grad and ".blocks." in n}
    assert trained == {"0", "1"}
    set_trainable(model, "last_block")
    assert {n.split(".")[2] for n, p in model.named_parameters() if p.requires_grad and ".blocks." in n} == {"1"}


def test_padding_none_needs_batch_one():
    with pytest.raises(ConfigError, match="train.micro_batch_size=1"):
        load_config(None, ["data.padding=none"])
    cfg = load_config(None, ["data.padding=none", "train.micro_batch_size=1", "train.grad_accum_steps=8"])
    assert cfg.data.padding == "none"


def test_padding_none_batches_are_unpadded_sharded_and_seeded():
    collate = make_collate("none", 16)
    out = collate([([1, 2, 3], 0)])
    assert out["input_ids"].shape == (1, 3)
    with pytest.raises(ValueError, match="padding 'none'"):
        collate([([1, 2, 3], 0), ([4], 1)])
    ds = ClassificationDataset([[i + 1] * (1 + i % 5) for i in range(20)], [i % 2 for i in range(20)], [""] * 20)
    order = lambda rank, seed: [b["input_ids"][0, 0].item() for b in train_loader(ds, 1, collate, rank, 2, seed)]
    r0, r1 = order(0, 7), order(1, 7)
    assert len(r0) == len(r1) == 10 and not set(r0) & set(r1)
    assert order(0, 7) == r0 and order(0, 8) != r0


def test_fixed_padding_pads_to_max_length_and_longest_to_the_batch():
    batch = [([1, 2, 3], 0), ([4], 1)]
    assert make_collate("fixed", 16)(batch)["input_ids"].shape == (2, 16)
    assert make_collate("longest", 16)(batch)["input_ids"].shape == (2, 3)


@pytest.mark.slow
def test_runs_with_no_padding_first_pooling_and_no_causal_mask(tmp_path):
    run = runner.train(tmp_path, "nopad", ["data.padding=none", "train.micro_batch_size=1", "train.grad_accum_steps=4",
                                           "model.pooling=first", "model.causal_mask=false", "train.max_steps=4",
                                           "eval.max_batches=8", "model.trainable=last_layer"])
    assert run.ok, run.output()
    s = run.summary()
    assert s["global_step"] == 4 and s["trainable_parameters"] == 64 * 2 + 2
    from dist_finetune.weights import load_export

    model, _ = load_export(run.dir / "export")
    assert model.config.causal is False and model.pooling == "first"
