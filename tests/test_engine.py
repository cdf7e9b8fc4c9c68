"""engine.py: batch plan, the generated DeepSpeed config, parameter groups, the schedule, a real engine."""
from __future__ import annotations

import math
import os
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dist_finetune.config import Config, ConfigError, load_config
from dist_finetune.distributed import DistEnv
from dist_finetune.engine import (
    OWNED_KEYS,
    BatchPlan,
    build_engine,
    deepspeed_config,
    ensure_cuda_arch_list,
    lr_multiplier,
    make_optimizer,
    optimizer_kind,
    param_group_names,
    param_groups,
    plan_batches,
    resolve_precision,
)
from dist_finetune.model import GPTClassifier, build_model, set_trainable

TINY = ["model.name=custom", "model.n_layer=2", "model.n_embd=64", "model.n_head=4", "model.context_length=64"]
CPU = torch.device("cpu")


def config(*overrides: str) -> Config:
    return load_config(None, [*TINY, *overrides])


def tiny_model(policy: str, seed: int = 0) -> GPTClassifier:
    torch.manual_seed(seed)
    model = build_model(config().model, num_classes=2)
    set_trainable(model, policy)
    return model


# ---------------------------------------------------------------- plan_batches


def test_plan_defaults_to_no_accumulation() -> None:
    plan = plan_batches(config("train.micro_batch_size=4"), world_size=3)
    assert plan == BatchPlan(micro_batch_size=4, grad_accum_steps=1, world_size=3)
    assert plan.global_batch_size == 12


def test_plan_takes_accumulation_as_given() -> None:
    plan = plan_batches(config("train.micro_batch_size=4", "train.grad_accum_steps=3"), world_size=2)
    assert (plan.grad_accum_steps, plan.global_batch_size) == (3, 24)


@pytest.mark.parametrize(("world_size", "accum"), [(1, 8), (2, 4), (8, 1)])
def test_plan_derives_accumulation_from_the_global_batch(world_size: int, accum: int) -> None:
    plan = plan_batches(config("train.micro_batch_size=4", "train.global_batch_size=32"), world_size)
    assert plan.grad_accum_steps == accum
    assert plan.global_batch_size == 32


def test_plan_accepts_agreeing_keys() -> None:
    cfg = config("train.micro_batch_size=4", "train.grad_accum_steps=4", "train.global_batch_size=32")
    assert plan_batches(cfg, 2).grad_accum_steps == 4


def test_plan_mismatch_error() -> None:
    cfg = config("train.micro_batch_size=4", "train.grad_accum_steps=3", "train.global_batch_size=32")
    with pytest.raises(ConfigError) as info:
        plan_batches(cfg, 2)
    assert str(info.value) == (
        "train.micro_batch_size x train.grad_accum_steps x world size = 4 x 3 x 2 = 24, but "
        "train.global_batch_size=32; drop one of the two accumulation keys or make them agree"
    )


def test_plan_non_multiple_error() -> None:
    cfg = config("train.micro_batch_size=4", "train.global_batch_size=30")
    with pytest.raises(ConfigError) as info:
        plan_batches(cfg, 2)
    assert str(info.value) == (
        "train.global_batch_size=30 is not a multiple of train.micro_batch_size x world size = 4 x 2 = 8; "
        "change one of them"
    )


# ---------------------------------------------------------------- deepspeed_config

PLAN = BatchPlan(micro_batch_size=4, grad_accum_steps=3, world_size=2)


def test_batch_keys_come_from_the_plan() -> None:
    ds = deepspeed_config(config("train.grad_clip=0.5"), PLAN, "fp32")
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 24
    assert ds["gradient_clipping"] == 0.5
    assert "optimizer" not in ds and "scheduler" not in ds  # the engine passes its own objects


def test_stage_zero_has_no_zero_options() -> None:
    assert deepspeed_config(config("zero.stage=0"), PLAN, "fp32")["zero_optimization"] == {"stage": 0}


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stages(stage: int) -> None:
    zero = deepspeed_config(config(f"zero.stage={stage}", "zero.overlap_comm=true"), PLAN, "fp32")["zero_optimization"]
    assert zero == {"stage": stage, "overlap_comm": True, "contiguous_gradients": True}


def test_optimizer_offload() -> None:
    zero = deepspeed_config(config("zero.stage=2", "zero.offload_optimizer=true"), PLAN, "bf16")["zero_optimization"]
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True}


def test_bf16_keys() -> None:
    ds = deepspeed_config(config(), PLAN, "bf16")
    assert ds["bf16"] == {"enabled": True}
    assert "fp16" not in ds


def test_fp16_keys() -> None:
    ds = deepspeed_config(config(), PLAN, "fp16")
    assert ds["fp16"]["enabled"] is True
    assert ds["fp16"]["loss_scale"] == 0  # dynamic loss scaling
    assert "bf16" not in ds


def test_fp32_has_no_half_precision_keys() -> None:
    ds = deepspeed_config(config(), PLAN, "fp32")
    assert "bf16" not in ds and "fp16" not in ds


def test_precision_argument_wins_over_the_config() -> None:
    # The caller passes the resolved precision (bf16 -> fp16 on GPUs without bf16).
    assert "fp16" in deepspeed_config(config("precision=bf16"), PLAN, "fp16")


# ---------------------------------------------------------------- the expert `deepspeed:` section


def test_expert_unknown_keys_merge_through() -> None:
    cfg = config("deepspeed.activation_checkpointing.partition_activations=true", "deepspeed.steps_per_print=7")
    ds = deepspeed_config(cfg, PLAN, "fp32")
    assert ds["activation_checkpointing"] == {"partition_activations": True}
    assert ds["steps_per_print"] == 7
    assert ds["train_batch_size"] == 24  # derived keys stay


@pytest.mark.parametrize("key", sorted(OWNED_KEYS))
def test_expert_owned_key_is_refused_with_its_run_config_key(key: str) -> None:
    cfg = config(f"deepspeed.{key}.something=1")
    with pytest.raises(ConfigError) as info:
        deepspeed_config(cfg, PLAN, "bf16")
    message = str(info.value)
    assert message.startswith(f"deepspeed.{key}: set by the run config from {OWNED_KEYS[key]}; set it there instead")


def test_expert_owned_key_message_shows_the_derived_value() -> None:
    with pytest.raises(ConfigError) as info:
        deepspeed_config(config("deepspeed.train_micro_batch_size_per_gpu=16"), PLAN, "fp32")
    assert str(info.value) == (
        "deepspeed.train_micro_batch_size_per_gpu: set by the run config from train.micro_batch_size; "
        "set it there instead (derived value: 4)"
    )


def test_expert_owned_key_equal_to_the_derived_value_is_accepted() -> None:
    ds = deepspeed_config(config("deepspeed.gradient_accumulation_steps=3"), PLAN, "fp32")
    assert ds["gradient_accumulation_steps"] == 3


def test_expert_contradicting_zero_stage_is_refused() -> None:
    cfg = config("zero.stage=1", "deepspeed.zero_optimization.stage=2")
    with pytest.raises(ConfigError) as info:
        deepspeed_config(cfg, PLAN, "fp32")
    assert str(info.value) == "deepspeed.zero_optimization.stage=2 contradicts zero.stage=1; set zero.stage instead"


def test_expert_zero_keys_merge_into_the_derived_ones() -> None:
    cfg = config("zero.stage=2", "deepspeed.zero_optimization.stage=2",
                 "deepspeed.zero_optimization.reduce_bucket_size=1000")
    zero = deepspeed_config(cfg, PLAN, "fp32")["zero_optimization"]
    assert zero == {"stage": 2, "overlap_comm": False, "contiguous_gradients": True, "reduce_bucket_size": 1000}


def test_expert_merge_leaves_the_config_alone() -> None:
    cfg = config("zero.stage=2", "deepspeed.zero_optimization.reduce_bucket_size=1000")
    deepspeed_config(cfg, PLAN, "fp32")
    assert cfg.deepspeed == {"zero_optimization": {"reduce_bucket_size": 1000}}


# ---------------------------------------------------------------- parameter groups

LAST_BLOCK_DECAY = [
    "backbone.blocks.1.attn.qkv.weight",
    "backbone.blocks.1.attn.proj.weight",
    "backbone.blocks.1.mlp.fc.weight",
    "backbone.blocks.1.mlp.proj.weight",
    "head.weight",
]
LAST_BLOCK_NO_DECAY = [
    "backbone.blocks.1.ln_1.weight",
    "backbone.blocks.1.ln_1.bias",
    "backbone.blocks.1.attn.qkv.bias",
    "backbone.blocks.1.attn.proj.bias",
    "backbone.blocks.1.ln_2.weight",
    "backbone.blocks.1.ln_2.bias",
    "backbone.blocks.1.mlp.fc.bias",
    "backbone.blocks.1.mlp.proj.bias",
    "backbone.ln_f.weight",
    "backbone.ln_f.bias",
    "head.bias",
]


def test_group_names_for_last_block() -> None:
    decay, no_decay = param_group_names(tiny_model("last_block"))
    assert sorted(decay) == sorted(LAST_BLOCK_DECAY)
    assert sorted(no_decay) == sorted(LAST_BLOCK_NO_DECAY)


def test_groups_match_names_in_order() -> None:
    model = tiny_model("last_block")
    by_name = dict(model.named_parameters())
    groups = param_groups(model, weight_decay=0.1)
    names = param_group_names(model)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    for group, group_names in zip(groups, names, strict=True):
        assert [id(p) for p in group["params"]] == [id(by_name[n]) for n in group_names]


def test_groups_hold_only_and_all_trainable_parameters() -> None:
    model = tiny_model("last_block")
    in_groups = [p for g in param_groups(model, 0.1) for p in g["params"]]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(in_groups) == len({id(p) for p in in_groups})  # no parameter twice
    assert {id(p) for p in in_groups} == {id(p) for p in trainable}
    assert sum(p.numel() for p in in_groups) < sum(p.numel() for p in model.parameters())


def test_all_trainable_keeps_embeddings_out_of_decay() -> None:
    decay, no_decay = param_group_names(tiny_model("all"))
    assert "backbone.wte.weight" in no_decay and "backbone.wpe.weight" in no_decay
    assert len(decay) == 2 * 4 + 1  # four Linear matrices per block, plus the head
    assert all(name.endswith(".weight") for name in decay)
    model = tiny_model("all")
    params = dict(model.named_parameters())
    assert all(params[name].dim() == 2 for name in decay)


def test_head_only() -> None:
    assert param_group_names(tiny_model("head")) == [["head.weight"], ["head.bias"]]


def test_empty_groups_are_dropped_in_both() -> None:
    only_matrix = nn.Sequential(nn.Linear(3, 3, bias=False))
    assert param_group_names(only_matrix) == [["0.weight"]]
    assert [g["weight_decay"] for g in param_groups(only_matrix, 0.1)] == [0.1]
    only_norm = nn.Sequential(nn.LayerNorm(3))
    assert param_group_names(only_norm) == [["0.weight", "0.bias"]]
    assert [g["weight_decay"] for g in param_groups(only_norm, 0.1)] == [0.0]


def test_cpu_optimizer_is_adamw_with_the_config_settings() -> None:
    cfg = config("train.lr=3e-4", "train.betas=[0.8, 0.95]", "train.eps=1e-6", "train.weight_decay=0.05")
    opt = make_optimizer(tiny_model("last_block"), cfg, CPU)
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    assert all(g["lr"] == pytest.approx(3e-4) and g["betas"] == (0.8, 0.95) and g["eps"] == 1e-6
               for g in opt.param_groups)


# ---------------------------------------------------------------- lr_multiplier


def multipliers(*overrides: str, total: int, steps: range) -> list[float]:
    cfg = config(*overrides)
    return [lr_multiplier(step, cfg, total) for step in steps]


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_warmup_is_linear_and_below_one(schedule: str) -> None:
    values = multipliers("train.warmup_steps=4", f"train.schedule={schedule}", total=20, steps=range(5))
    assert values == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])


def test_no_warmup_starts_at_one() -> None:
    assert multipliers("train.schedule=cosine", total=10, steps=range(1)) == [1.0]


def test_constant_stays_at_one() -> None:
    values = multipliers("train.warmup_steps=2", "train.schedule=constant", "train.min_lr_ratio=0.3",
                         total=10, steps=range(2, 15))
    assert values == [1.0] * len(values)


def test_linear_decay() -> None:
    values = multipliers("train.warmup_steps=4", "train.schedule=linear", total=14, steps=range(4, 17))
    assert values[0] == 1.0
    assert values[5] == pytest.approx(0.5)  # half way through the decay
    assert values[10] == pytest.approx(0.0)  # at total_steps
    assert values[11:] == pytest.approx([0.0, 0.0])  # stays there after
    assert all(a > b for a, b in zip(values[:10], values[1:11]))


def test_cosine_decay() -> None:
    values = multipliers("train.warmup_steps=4", "train.schedule=cosine", total=24, steps=range(4, 26))
    assert values[0] == 1.0
    assert values[5] == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))  # a quarter of the way
    assert values[10] == pytest.approx(0.5)
    assert values[20] == pytest.approx(0.0)
    linear = multipliers("train.warmup_steps=4", "train.schedule=linear", total=24, steps=range(4, 26))
    assert all(c > lin for c, lin in zip(values[1:10], linear[1:10]))  # above linear in the first half


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_min_lr_ratio(schedule: str) -> None:
    values = multipliers("train.schedule=" + schedule, "train.min_lr_ratio=0.1", total=10, steps=range(0, 13))
    assert values[0] == 1.0
    assert values[5] == pytest.approx(0.55)  # both shapes are at 0.5 half way
    assert values[10:] == pytest.approx([0.1] * 3)
    assert min(values) == pytest.approx(0.1)


# ---------------------------------------------------------------- device helpers


def test_ensure_cuda_arch_list_keeps_an_existing_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    ensure_cuda_arch_list()
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "8.0;9.0"


def test_ensure_cuda_arch_list_without_a_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    ensure_cuda_arch_list()
    expected = None
    if torch.cuda.is_available():
        expected = "{}.{}".format(*torch.cuda.get_device_capability())
    assert os.environ.get("TORCH_CUDA_ARCH_LIST") == expected


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_precision_is_kept_on_cpu(precision: str) -> None:
    assert resolve_precision(precision, CPU) == precision


def test_fp16_on_cpu_is_refused_with_the_alternatives() -> None:
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU.*precision=bf16 or precision=fp32"):
        resolve_precision("fp16", CPU)


# ---------------------------------------------------------------- a real engine on a one-rank gloo group

def engine_config() -> Config:
    return config("model.trainable=last_block", "precision=fp32", "zero.stage=0", "train.micro_batch_size=4",
                  "train.lr=1e-3", "train.warmup_steps=2", "train.schedule=linear", "train.weight_decay=0.0")


def test_one_rank_group(dist_env: DistEnv) -> None:
    assert (dist_env.rank, dist_env.world_size, dist_env.backend, dist_env.launcher) == (0, 1, "gloo", "single")
    assert dist_env.device == CPU


def test_engine_trains_exactly_the_trainable_parameters(dist_env: DistEnv) -> None:
    cfg = engine_config()
    model = tiny_model(cfg.model.trainable, seed=1)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = [p for p in model.parameters() if p.requires_grad]
    total_steps = 10
    engine, precision = build_engine(model, cfg, dist_env, plan_batches(cfg, dist_env.world_size), total_steps)
    assert precision == "fp32"

    held = [p for g in engine.optimizer.param_groups for p in g["params"]]
    assert sum(p.numel() for p in held) == sum(p.numel() for p in trainable)
    assert {id(p) for p in held} == {id(p) for p in trainable}

    losses = train_fixed_batch(engine, steps=6)
    assert losses[-1] < 0.7 * losses[0], losses
    assert engine.get_lr()[0] == pytest.approx(1e-3 * lr_multiplier(6, cfg, total_steps))
    for name, p in engine.module.named_parameters():
        if name in frozen_before:
            assert torch.equal(p.detach(), frozen_before[name]), f"frozen {name} changed"


def train_fixed_batch(engine: Any, steps: int) -> list[float]:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 50257, (4, 16), generator=generator)
    labels = torch.tensor([0, 1, 0, 1])
    lengths = torch.full((4,), 16)
    engine.train()
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(engine(input_ids, lengths).float(), labels)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
    return losses


# ---------------------------------------------------------------- performance switches


def test_bf16_autocast_is_deepspeeds_torch_autocast_with_fp32_weights() -> None:
    ds = deepspeed_config(config("precision=bf16_autocast"), PLAN, "bf16_autocast")
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert "bf16" not in ds and "fp16" not in ds


def test_zero_bucket_sizes_reach_deepspeed_only_when_set() -> None:
    zero = deepspeed_config(config("zero.stage=2", "zero.reduce_bucket_size=200000000",
                                   "zero.contiguous_gradients=false"), PLAN, "bf16")["zero_optimization"]
    assert zero["reduce_bucket_size"] == 200_000_000 and zero["contiguous_gradients"] is False
    assert "allgather_bucket_size" not in zero


@pytest.mark.parametrize(("overrides", "device", "kind"), [
    ((), "cpu", "torch_foreach"),
    ((), "cuda", "torch_fused"),
    (("train.optimizer=deepspeed_fused",), "cuda", "deepspeed_fused"),
    (("train.optimizer=torch_fused",), "cpu", "torch_fused"),
    (("zero.stage=2", "zero.offload_optimizer=true"), "cuda", "deepspeed_cpu"),
])
def test_optimizer_kind(overrides: tuple[str, ...], device: str, kind: str) -> None:
    assert optimizer_kind(config(*overrides), torch.device(device)) == kind


@pytest.mark.parametrize(("overrides", "message"), [
    (("train.optimizer=deepspeed_fused",), "needs a CUDA GPU"),
    (("zero.stage=2", "zero.offload_optimizer=true", "train.optimizer=torch_fused"), "set train.optimizer=auto"),
])
def test_impossible_optimizer_is_refused(overrides: tuple[str, ...], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        optimizer_kind(config(*overrides), CPU)


def test_torch_fused_adamw_on_cpu_is_fused() -> None:
    opt = make_optimizer(tiny_model("all"), config("train.optimizer=torch_fused"), CPU)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"] is True


def test_bf16_autocast_engine_keeps_fp32_weights_and_tracks_fp32(dist_env: DistEnv) -> None:
    losses = {}
    for precision in ("fp32", "bf16_autocast"):
        cfg = replace_precision(engine_config(), precision)
        engine, resolved = build_engine(tiny_model("last_block", seed=1), cfg, dist_env,
                                        plan_batches(cfg, 1), total_steps=10)
        assert resolved == precision
        assert all(p.dtype == torch.float32 for p in engine.module.parameters())
        losses[precision] = train_fixed_batch(engine, steps=4)
    assert losses["bf16_autocast"][-1] < 0.8 * losses["bf16_autocast"][0]
    for a, b in zip(losses["fp32"], losses["bf16_autocast"]):
        assert abs(a - b) < 0.05 * a


def replace_precision(cfg: Config, precision: str) -> Config:
    from dist_finetune.config import replace

    return replace(cfg, [f"precision={precision}"])


@pytest.mark.slow
def test_compiled_engine_matches_eager(dist_env: DistEnv) -> None:
    """torch.compile inside the DeepSpeed engine (inductor on this CPU: ~30 s to compile)."""
    from dist_finetune.config import replace

    runs = {}
    for compiled in (False, True):
        cfg = replace(engine_config(), [f"train.compile={str(compiled).lower()}"])
        engine, _ = build_engine(tiny_model("last_block", seed=1), cfg, dist_env, plan_batches(cfg, 1), 10)
        assert engine.is_compiled is compiled
        runs[compiled] = train_fixed_batch(engine, steps=3)
    for a, b in zip(runs[False], runs[True]):
        assert b == pytest.approx(a, rel=1e-4)
