"""Optimizer step time of the DeepSpeed engine against a plain PyTorch loop of the same model.

    python benchmarks/step_time.py --config configs/quickstart.yaml [--steps N --warmup W --batch B --seq T]
                                   [--json PATH] [key.sub=value ...]

One rank, one process. Both variants get the same model (same init seed, same trainable parameters,
same AdamW parameter groups, clipping and LR schedule) and the same random token batches of shape
B x T (every position real). One step = forward + backward + optimizer update; it is timed after the
warm-up steps. The plain loop runs under bf16 autocast when the config asks for bf16 and the device is
CUDA, else in fp32. Peak memory: torch.cuda.max_memory_allocated on CUDA (reset before each variant);
on CPU the process's peak resident set (ru_maxrss), which only grows, so the plain loop runs first and
the engine's figure is the peak of both.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dist_finetune.config import Config, ConfigError, load_config, replace
from dist_finetune.distributed import DistEnv, init_distributed, shutdown
from dist_finetune.engine import build_engine, lr_multiplier, param_groups, plan_batches
from dist_finetune.model import GPTClassifier, build_model, count_parameters, set_trainable
from dist_finetune.report import peak_memory_bytes

NUM_CLASSES = 2
DISTINCT_BATCHES = 4


@dataclass(frozen=True)
class Result:
    name: str
    precision: str
    median_ms: float
    mean_ms: float
    samples_per_second: float
    tokens_per_second: float
    peak_memory_bytes: int
    first_loss: float
    last_loss: float


@dataclass(frozen=True)
class Shape:
    batch: int
    seq: int
    warmup: int
    steps: int


# ---------------------------------------------------------------- set-up


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python benchmarks/step_time.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML run config")
    p.add_argument("--steps", type=int, default=50, help="timed optimizer steps (default 50)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    p.add_argument("--batch", type=int, help="batch size B (default: train.micro_batch_size)")
    p.add_argument("--seq", type=int, help="sequence length T (default: data.max_length or the context)")
    p.add_argument("--json", type=Path, help="write the figures to this JSON file")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. zero.stage=2")
    return p.parse_intermixed_args(argv)


def resolve_shape(args: argparse.Namespace, cfg: Config) -> Shape:
    context = cfg.model.arch()["context_length"]
    batch = args.batch or cfg.train.micro_batch_size
    seq = args.seq or cfg.data.max_length or context
    if not 1 <= seq <= context:
        raise ConfigError(f"--seq {seq}: must be between 1 and the model's context length ({context})")
    if batch < 1 or args.steps < 1 or args.warmup < 0:
        raise ConfigError("--batch and --steps must be >= 1, --warmup >= 0")
    return Shape(batch=batch, seq=seq, warmup=args.warmup, steps=args.steps)


def one_step_config(cfg: Config, shape: Shape) -> Config:
    """Micro-batch B, no accumulation: every engine.step() is one optimizer step."""
    return replace(cfg, [f"train.micro_batch_size={shape.batch}", "train.grad_accum_steps=1",
                         "train.global_batch_size=null"])


def make_batches(shape: Shape, vocab_size: int, seed: int, device: torch.device) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(DISTINCT_BATCHES):
        batches.append({
            "input_ids": torch.randint(0, vocab_size, (shape.batch, shape.seq), generator=generator).to(device),
            "lengths": torch.full((shape.batch,), shape.seq, dtype=torch.long).to(device),
            "labels": torch.randint(0, NUM_CLASSES, (shape.batch,), generator=generator).to(device),
        })
    return batches


def fresh_model(cfg: Config) -> GPTClassifier:
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, NUM_CLASSES)
    set_trainable(model, cfg.model.trainable)
    return model


# ---------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def time_steps(step: Callable[[dict[str, torch.Tensor]], float], batches: list[dict[str, torch.Tensor]],
               shape: Shape, device: torch.device) -> tuple[list[float], list[float]]:
    """(seconds of each timed step, loss of every step)."""
    seconds, losses = [], []
    for i in range(shape.warmup + shape.steps):
        batch = batches[i % len(batches)]
        sync(device)
        start = time.perf_counter()
        losses.append(step(batch))
        sync(device)
        if i >= shape.warmup:
            seconds.append(time.perf_counter() - start)
    return seconds, losses


def summarise(name: str, precision: str, seconds: list[float], losses: list[float], shape: Shape,
              device: torch.device) -> Result:
    mean = statistics.fmean(seconds)
    return Result(
        name=name,
        precision=precision,
        median_ms=statistics.median(seconds) * 1e3,
        mean_ms=mean * 1e3,
        samples_per_second=shape.batch / mean,
        tokens_per_second=shape.batch * shape.seq / mean,
        peak_memory_bytes=peak_memory_bytes(device),
        first_loss=losses[0],
        last_loss=losses[-1],
    )


# ---------------------------------------------------------------- the two variants


def run_plain(cfg: Config, shape: Shape, env: DistEnv, batches: list[dict[str, torch.Tensor]]) -> Result:
    reset_peak(env.device)
    model = fresh_model(cfg).to(env.device).train()
    t = cfg.train
    optimizer = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=t.betas, eps=t.eps)
    total = shape.warmup + shape.steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, cfg, total))
    trainable = [p for p in model.parameters() if p.requires_grad]
    use_bf16 = cfg.precision == "bf16" and env.device.type == "cuda"

    def autocast() -> contextlib.AbstractContextManager[Any]:
        if use_bf16:
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step(batch: dict[str, torch.Tensor]) -> float:
        with autocast():
            logits = model(batch["input_ids"], batch["lengths"])
        loss = F.cross_entropy(logits.float(), batch["labels"])
        loss.backward()
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(trainable, t.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    seconds, losses = time_steps(step, batches, shape, env.device)
    result = summarise("plain pytorch", "bf16 autocast" if use_bf16 else "fp32", seconds, losses, shape, env.device)
    del model, optimizer, scheduler, trainable
    return result


def run_engine(cfg: Config, shape: Shape, env: DistEnv, batches: list[dict[str, torch.Tensor]]) -> Result:
    reset_peak(env.device)
    model = fresh_model(cfg)
    plan = plan_batches(cfg, env.world_size)
    engine, precision = build_engine(model, cfg, env, plan, total_steps=shape.warmup + shape.steps)
    engine.train()

    def step(batch: dict[str, torch.Tensor]) -> float:
        logits = engine(batch["input_ids"], batch["lengths"]).float()
        loss = F.cross_entropy(logits, batch["labels"])
        engine.backward(loss)
        engine.step()
        return float(loss.detach())

    seconds, losses = time_steps(step, batches, shape, env.device)
    return summarise(f"deepspeed zero {cfg.zero.stage}", precision, seconds, losses, shape, env.device)


# ---------------------------------------------------------------- output


def table(results: list[Result]) -> str:
    header = f"{'':<18} {'precision':<14} {'median ms':>10} {'mean ms':>9} {'samples/s':>10} " \
             f"{'tokens/s':>10} {'peak MiB':>9} {'loss first->last':>17}"
    lines = [header]
    for r in results:
        lines.append(
            f"{r.name:<18} {r.precision:<14} {r.median_ms:>10.2f} {r.mean_ms:>9.2f} {r.samples_per_second:>10.1f} "
            f"{r.tokens_per_second:>10.0f} {r.peak_memory_bytes / 2**20:>9.0f} "
            f"{r.first_loss:>8.4f}->{r.last_loss:.4f}"
        )
    engine, plain = results
    ratio = ratios(engine, plain)
    lines.append(
        f"{'ratio engine/plain':<18} {'':<14} {ratio['median_ms']:>9.3f}x {ratio['mean_ms']:>8.3f}x "
        f"{ratio['samples_per_second']:>9.3f}x {ratio['tokens_per_second']:>9.3f}x {ratio['peak_memory_bytes']:>8.3f}x"
    )
    return "\n".join(lines)


def ratios(engine: Result, plain: Result) -> dict[str, float]:
    keys = ("median_ms", "mean_ms", "samples_per_second", "tokens_per_second", "peak_memory_bytes")
    return {k: getattr(engine, k) / max(getattr(plain, k), 1e-12) for k in keys}


def describe(cfg: Config, shape: Shape, env: DistEnv, model: GPTClassifier) -> str:
    arch = cfg.model.arch()
    trainable, total = count_parameters(model)
    return (
        f"step time on {env.device}: model {cfg.model.name} ({arch['n_layer']} layers, {arch['n_embd']} wide, "
        f"{arch['n_head']} heads), trainable={cfg.model.trainable} ({trainable:,}/{total:,} parameters), "
        f"batch {shape.batch} x {shape.seq} tokens, {shape.steps} timed steps after {shape.warmup} warm-up, "
        f"torch threads {torch.get_num_threads()}"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        shape = resolve_shape(args, cfg)
        cfg = one_step_config(cfg, shape)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    env = init_distributed(cfg.distributed.timeout_seconds, debug=cfg.distributed.debug)
    try:
        if env.world_size != 1:
            print("error: the benchmark runs one rank; launch it as a plain process", file=sys.stderr)
            return 2
        batches = make_batches(shape, cfg.model.vocab_size, cfg.seed, env.device)
        plain = run_plain(cfg, shape, env, batches)
        engine = run_engine(cfg, shape, env, batches)
    finally:
        shutdown()
    print(describe(cfg, shape, env, fresh_model(cfg)))
    print(table([engine, plain]))
    if args.json is not None:
        figures = {"device": str(env.device), "shape": asdict(shape), "config": args.config,
                   "overrides": args.overrides, "engine": asdict(engine), "plain": asdict(plain),
                   "ratio_engine_over_plain": ratios(engine, plain)}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
