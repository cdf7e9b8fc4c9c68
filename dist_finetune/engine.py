"""Run config -> DeepSpeed config, optimizer, schedule, and the initialised DeepSpeed engine."""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .config import Config, ConfigError
from .distributed import DistEnv
from .zero3 import match_partitioned_dtype

log = logging.getLogger(__name__)

# deepspeed: keys the engine derives from the run config, and the run-config key that owns each.
OWNED_KEYS = {
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum_steps",
    "train_batch_size": "train.global_batch_size",
    "gradient_clipping": "train.grad_clip",
    "bf16": "precision",
    "fp16": "precision",
    "torch_autocast": "precision",
    "optimizer": "train.lr / train.weight_decay / train.betas",
    "scheduler": "train.schedule / train.warmup_steps",
}


@dataclass(frozen=True)
class BatchPlan:
    micro_batch_size: int
    grad_accum_steps: int
    world_size: int

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps * self.world_size


def plan_batches(cfg: Config, world_size: int) -> BatchPlan:
    """Accumulation from the config, derived from train.global_batch_size when only it is given."""
    t = cfg.train
    micro, accum, glob = t.micro_batch_size, t.grad_accum_steps, t.global_batch_size
    if glob is not None:
        per_step = micro * world_size
        if accum is None:
            if glob % per_step:
                raise ConfigError(
                    f"train.global_batch_size={glob} is not a multiple of train.micro_batch_size x "
                    f"world size = {micro} x {world_size} = {per_step}; change one of them"
                )
            accum = glob // per_step
        elif micro * accum * world_size != glob:
            raise ConfigError(
                f"train.micro_batch_size x train.grad_accum_steps x world size = {micro} x {accum} x "
                f"{world_size} = {micro * accum * world_size}, but train.global_batch_size={glob}; "
                "drop one of the two accumulation keys or make them agree"
            )
    return BatchPlan(micro, accum or 1, world_size)


def resolve_precision(requested: str, device: torch.device) -> str:
    """bf16 where the device has it, else fp16 on CUDA, else fp32 (said once)."""
    if requested == "fp16" and device.type != "cuda":
        raise ConfigError("precision: fp16 needs a CUDA GPU (DeepSpeed's fp16 loss scaling is GPU-only); "
                          "use precision=bf16 or precision=fp32 on a CPU")
    if requested not in ("bf16", "bf16_autocast") or device.type != "cuda" or torch.cuda.is_bf16_supported():
        return requested
    if requested == "bf16_autocast":
        log.warning("precision: this GPU has no bf16; using fp32 instead of bf16 autocast")
        return "fp32"
    log.warning("precision: this GPU has no bf16; using fp16 with dynamic loss scaling instead")
    return "fp16"


def ensure_cuda_arch_list() -> None:
    """Hopper reports `sm_90a`, which DeepSpeed's op builder cannot parse; pin the arch first."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST") or not torch.cuda.is_available():
        return
    major, minor = torch.cuda.get_device_capability()
    os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"


def deepspeed_config(cfg: Config, plan: BatchPlan, precision: str) -> dict[str, Any]:
    z = cfg.zero
    zero: dict[str, Any] = {"stage": z.stage}
    if z.stage > 0:
        zero.update(overlap_comm=z.overlap_comm, contiguous_gradients=z.contiguous_gradients)
        for key in ("reduce_bucket_size", "allgather_bucket_size"):
            if getattr(z, key) is not None:
                zero[key] = getattr(z, key)
    if cfg.zero.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.grad_accum_steps,
        "train_batch_size": plan.global_batch_size,
        "gradient_clipping": cfg.train.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif precision == "bf16_autocast":
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    elif precision == "fp16":
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    return _merge_expert(ds, cfg.deepspeed)


def _merge_expert(derived: dict[str, Any], expert: dict[str, Any]) -> dict[str, Any]:
    merged = dict(derived)
    for key, value in expert.items():
        if key in OWNED_KEYS and value != derived.get(key):
            raise ConfigError(
                f"deepspeed.{key}: set by the run config from {OWNED_KEYS[key]}; "
                f"set it there instead (derived value: {derived.get(key)!r})"
            )
        if key == "zero_optimization" and isinstance(value, dict):
            stage = value.get("stage", derived[key]["stage"])
            if stage != derived[key]["stage"]:
                raise ConfigError(
                    f"deepspeed.zero_optimization.stage={stage} contradicts zero.stage="
                    f"{derived[key]['stage']}; set zero.stage instead"
                )
            for sub, owner in (("offload_optimizer", "zero.offload_optimizer"), ("overlap_comm", "zero.overlap_comm")):
                if sub in value and value[sub] != derived[key].get(sub):
                    raise ConfigError(f"deepspeed.zero_optimization.{sub}: set it with {owner} instead")
            merged[key] = {**derived[key], **value}
        else:
            merged[key] = value
    return merged


def _split_trainable(model: nn.Module, decay_rule: str = "linear_weights",
                     ) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """train.decay: linear_weights decays the weight matrices of linear layers only (not biases, norms
    or embeddings); all decays every trainable parameter (the chapter's recipe)."""
    if decay_rule not in ("linear_weights", "all"):
        raise ValueError(f"decay rule must be 'linear_weights' or 'all', got {decay_rule!r}")
    decay, no_decay = [], []
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if p.requires_grad:
                decayed = decay_rule == "all" or (isinstance(module, nn.Linear) and name == "weight")
                full = f"{module_name}.{name}" if module_name else name
                (decay if decayed else no_decay).append((full, p))
    return decay, no_decay


def param_groups(model: nn.Module, weight_decay: float, decay_rule: str = "linear_weights") -> list[dict[str, Any]]:
    decay, no_decay = _split_trainable(model, decay_rule)
    groups = [{"params": [p for _, p in decay], "weight_decay": weight_decay},
              {"params": [p for _, p in no_decay], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def param_group_names(model: nn.Module, decay_rule: str = "linear_weights") -> list[list[str]]:
    """Names for `param_groups`, group by group, in the same order (saved with checkpoints)."""
    return [[n for n, _ in group] for group in _split_trainable(model, decay_rule) if group]


def optimizer_kind(cfg: Config, device: torch.device) -> str:
    """train.optimizer resolved for the device: torch_fused | torch_foreach | deepspeed_fused | deepspeed_cpu."""
    requested = cfg.train.optimizer
    if cfg.zero.offload_optimizer:
        if requested not in ("auto", "torch_foreach"):
            raise ConfigError(f"train.optimizer={requested} cannot run with zero.offload_optimizer=true (the "
                              "optimizer then runs on the CPU): set train.optimizer=auto")
        return "deepspeed_cpu"
    if requested == "auto":
        return "torch_fused" if device.type == "cuda" else "torch_foreach"
    if requested == "deepspeed_fused" and device.type != "cuda":
        raise ConfigError("train.optimizer=deepspeed_fused needs a CUDA GPU; use train.optimizer=auto on a CPU")
    return requested


def make_optimizer(model: nn.Module, cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.train.weight_decay, cfg.train.decay)
    t = cfg.train
    kind = optimizer_kind(cfg, device)
    if kind == "deepspeed_fused":
        ensure_cuda_arch_list()
        from deepspeed.ops.adam import FusedAdam

        return FusedAdam(groups, lr=t.lr, betas=t.betas, eps=t.eps, adam_w_mode=True)
    if kind == "deepspeed_cpu":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=t.lr, betas=t.betas, eps=t.eps, adamw_mode=True)
    fused = kind == "torch_fused"
    return torch.optim.AdamW(groups, lr=t.lr, betas=t.betas, eps=t.eps, fused=fused, foreach=not fused)


def lr_multiplier(step: int, cfg: Config, total_steps: int) -> float:
    """Linear warmup, then constant / linear / cosine decay to train.min_lr_ratio at total_steps."""
    t = cfg.train
    if step < t.warmup_steps:
        return (step + 1) / (t.warmup_steps + 1)
    if t.schedule == "constant":
        return 1.0
    span = max(1, total_steps - t.warmup_steps)
    progress = min(1.0, (step - t.warmup_steps) / span)
    if t.schedule == "linear":
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return t.min_lr_ratio + (1.0 - t.min_lr_ratio) * shape


def skip_shm_comm_op(env: DistEnv) -> None:
    """DeepSpeed compiles its CPU shared-memory op (~30 s on a fresh install) when it sets up
    communication on the CPU, yet uses it only in `inference_all_reduce` (tensor-parallel inference),
    which training never calls: mark it unavailable, so gloo's all-reduce serves every collective."""
    if env.device.type != "cpu":
        return
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def build_engine(model: nn.Module, cfg: Config, env: DistEnv, plan: BatchPlan, total_steps: int):
    """deepspeed.initialize with the trainable parameters only; returns (engine, precision)."""
    import deepspeed

    ensure_cuda_arch_list()
    skip_shm_comm_op(env)
    precision = resolve_precision(cfg.precision, env.device)
    ds_config = deepspeed_config(cfg, plan, precision)
    model = model.to(env.device)
    match_partitioned_dtype(model)
    optimizer = make_optimizer(model, cfg, env.device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, cfg, total_steps)
    )
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=ds_config,
        dist_init_required=False,
    )
    if cfg.train.compile:
        engine.compile(compile_kwargs={"mode": cfg.train.compile_mode})
    return engine, precision
