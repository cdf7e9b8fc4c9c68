"""Training throughput of a matrix of settings: our DeepSpeed engine against the chapter-6 plain loop.

    python benchmarks/throughput.py --matrix tiny|cpu|gpu [--only NAME ...] [--steps N --warmup W]
                                    [--peak-tflops X] [--with-compile] [--json PATH]

One process, one rank. Each setting trains a fresh model (seeded, so a setting and its plain twin
start from the same weights) on real SMS training texts and reports, after its warm-up steps:
optimizer step time, samples/s, real and padded tokens/s, model TFLOP/s, MFU and peak memory.

Settings
    A setting is a config (the matrix's base overrides plus its own), a micro-batch, a padding and an
    engine switch. engine=False runs the plain loop of plain_loop.py (torch AdamW lr 5e-5, weight
    decay 0.1, no DeepSpeed; bf16 autocast when the setting's precision is bf16 or bf16_autocast, else
    fp32; it clips gradients only when its train.grad_clip > 0: the baseline is the chapter's loop,
    train.grad_clip=0, while a plain twin clips as the engine does so both do the same work).
    engine=True runs build_engine with the setting's config: the framework's defaults (gradient
    clipping 1.0; train.optimizer=auto: torch's fused AdamW on a GPU, its foreach AdamW on a CPU).
    A plain twin uses the same AdamW implementation as the engine; the baseline keeps the chapter's
    default AdamW (per tensor on a CPU). One optimizer step = one
    micro-batch (train.grad_accum_steps=1). The first setting of every matrix is the baseline: the plain fp32
    chapter loop at 8 x 120 fixed tokens, every layer trainable, the matrix's model.

Batches
    padding=fixed: every batch padded (or cut) to `seq` tokens. padding=longest: each batch padded to
    its longest text, batches grouped by length (data.group_by_length). The first 16 batches of an
    epoch go to the device once, before timing, and are cycled. Real tokens are the texts' tokens;
    padded tokens are what the model computes on (batch x width). Every setting gets the texts' GPT-2 BPE
    ids: a Llama / Qwen3 setting (random weights, as GPT-2's) gets them folded into its vocabulary
    (id % vocab_size), so its batches have GPT-2's shapes and real tokens and no tokenizer is read.

Timing
    Warm-up steps first (torch.compile compiles there; their wall time is `warmup_seconds`), then N
    timed steps between two synchronisations and none in between, as training runs. The losses are
    read after timing (first and last step).

MFU
    Model FLOPs per padded token (see FlopCounter) x padded tokens of the timed steps, over the
    timed seconds, over the card's dense bf16 peak (--peak-tflops, else from the GPU's name; unknown
    GPU or CPU: no MFU). fp32 settings are held to the same bf16 peak.

Peak memory
    CUDA: torch.cuda.max_memory_allocated, reset before each setting. CPU: the process's peak
    resident set (ru_maxrss), which only grows over the matrix.
"""
from __future__ import annotations

import argparse
import atexit
import datetime
import functools
import gc
import itertools
import json
import math
import os
import platform
import re
import shutil
import subprocess
import tempfile
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dist_finetune.config import Config, ConfigError, load_config
from dist_finetune.data import ClassificationDataset, DataBundle, load_data, make_collate
from dist_finetune.distributed import DistEnv, init_distributed, shutdown
from dist_finetune.engine import build_engine, optimizer_kind, plan_batches
from dist_finetune.families import backbone_config
from dist_finetune.loaders import train_loader
from dist_finetune.model import GPTClassifier, count_parameters
from dist_finetune.report import peak_memory_bytes

HERE = str(Path(__file__).resolve().parent)  # plain_loop.py sits next to this file
if HERE not in sys.path:
    sys.path.insert(0, HERE)
from plain_loop import build_plain_model, make_optimizer, make_step, sync, to_device  # noqa: E402

NUM_CLASSES = 2
DISTINCT_BATCHES = 16
Batch = dict[str, torch.Tensor]
Step = Callable[[Batch], torch.Tensor]


# ---------------------------------------------------------------- settings and matrices


@dataclass(frozen=True)
class Setting:
    name: str
    overrides: tuple[str, ...] = ()
    micro_batch: int = 8
    padding: str = "fixed"  # fixed: every batch `seq` tokens; longest: per batch, grouped by length
    seq: int = 120
    engine: bool = True
    steps: int | None = None  # caps the matrix's timed steps (slow settings)
    warmup: int | None = None
    plain_twin: str | None = None  # a plain setting of the matrix to compare step time with
    threads: int | None = None  # intra-op threads while it runs (None: as dist_finetune sets them)
    busy_neighbour: bool = False  # another process keeps one core busy meanwhile


@dataclass(frozen=True)
class Matrix:
    name: str
    base: tuple[str, ...]
    settings: tuple[Setting, ...]
    steps: int
    warmup: int


BASELINE = Setting("baseline", ("precision=fp32", "train.grad_clip=0"), engine=False)

TINY_BASE = ("model.name=custom", "model.n_layer=2", "model.n_head=2", "model.n_embd=64",
             "model.context_length=128", "model.weights=none", "model.pooling=last_token", "model.trainable=all",
             "precision=fp32")
QUICKSTART_BASE = ("model.name=custom", "model.n_layer=2", "model.n_head=4", "model.n_embd=128",
                   "model.context_length=128", "model.weights=none", "model.pooling=last_token",
                   "model.trainable=all", "precision=fp32")
GPT2_BASE = ("model.name=gpt2", "model.weights=none", "model.pooling=last_token", "model.trainable=all",
             "precision=bf16")
B64 = dict(micro_batch=64, seq=128)
# A decoder refuses model.weights=none (it names the folder of its tokenizer); the benchmark never reads it: the
# weights are random (as GPT-2's above) and the batches GPT-2 BPE ids folded into the model's vocabulary.
UNREAD_WEIGHTS = "model.weights=unread-random-weights"
DECODER_PRESET_SETTINGS = ("smollm2-135m", "qwen3-0.6b", "llama-3.2-1b")  # the families beside GPT-2 124M
_NO_GPT2_ARCH = ("model.n_layer=null", "model.n_head=null", "model.n_embd=null", "model.context_length=null")
TINY_LLAMA = dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True)


@functools.lru_cache(maxsize=1)
def tiny_llama_folder() -> Path:
    """A config.json alone (model.name=auto reads the architecture there; no weights, no tokenizer), removed at exit."""
    folder = Path(tempfile.mkdtemp(prefix="throughput-tiny-llama-"))
    atexit.register(shutil.rmtree, folder, True)
    (folder / "config.json").write_text(json.dumps(TINY_LLAMA), encoding="utf-8")
    return folder


def tiny_matrix(with_compile: bool) -> Matrix:
    settings = [
        BASELINE,
        Setting("engine-zero0"),
        Setting("engine-zero1", ("zero.stage=1",)),
        Setting("engine-longest-8", padding="longest"),
        Setting("engine-unfused-qkv", ("model.fused_qkv=false",)),
        Setting("engine-last-block", ("model.trainable=last_block",)),
        Setting("engine-tiny-llama", ("model.name=auto", f"model.weights={tiny_llama_folder()}", *_NO_GPT2_ARCH)),
    ]
    if with_compile:
        settings.insert(5, Setting("engine-compiled", ("train.compile=true",)))
    return Matrix("tiny", TINY_BASE, tuple(settings), steps=5, warmup=1)


BUSY_ALL = "engine-8x128-busy-neighbour-all-threads"
BUSY_SHARED = "engine-8x128-busy-neighbour-shared-threads"


def cpu_matrix(with_compile: bool) -> Matrix:
    settings = [
        BASELINE,
        Setting("plain-fp32-8x128", seq=128, engine=False),
        Setting("engine-zero0-fp32-8x128", seq=128, plain_twin="plain-fp32-8x128"),
        Setting("engine-longest-8", padding="longest"),
    ]
    # Another busy process on the machine (a second rank, a data job): all cores' threads against the
    # share dist_finetune picks for two ranks on the node (cores // 2), in the same run.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    settings += [
        Setting(BUSY_ALL, seq=128, threads=cores, busy_neighbour=True),
        Setting(BUSY_SHARED, seq=128, threads=max(1, cores // 2), busy_neighbour=True),
    ]
    if with_compile:
        settings.append(Setting("engine-zero0-fp32-8x128-compiled", ("train.compile=true",), seq=128,
                                plain_twin="plain-fp32-8x128"))
    return Matrix("cpu", QUICKSTART_BASE, tuple(settings), steps=30, warmup=3)


def gpu_matrix(with_compile: bool = True) -> Matrix:
    """GPT-2 124M on one GPU (gpt2-xl last); torch fused AdamW unless named otherwise. The compiled
    settings are always in (`with_compile` is for the CPU matrices)."""
    twin = "plain-bf16-autocast-64x128"
    compiled = ("train.compile=true",)
    xl = ("model.name=gpt2-xl", "zero.stage=3")
    return Matrix("gpu", GPT2_BASE, (
        BASELINE,
        Setting(twin, ("precision=bf16_autocast",), engine=False, **B64),
        Setting("engine-bf16-8x120"),
        Setting("engine-bf16-autocast-8x120", ("precision=bf16_autocast",)),
        # The chapter's tiny steps are launch-bound: CUDA graphs (compile mode reduce-overhead).
        Setting("engine-bf16-autocast-8x120-cudagraphs",
                ("precision=bf16_autocast", *compiled, "train.compile_mode=reduce-overhead")),
        Setting("engine-bf16-64x128", plain_twin=twin, **B64),
        Setting("engine-bf16-64x128-compiled", compiled, plain_twin=twin, **B64),
        Setting("engine-bf16-autocast-64x128", ("precision=bf16_autocast",), plain_twin=twin, **B64),
        Setting("engine-zero2-64x128", ("zero.stage=2",), **B64),
        Setting("engine-unfused-qkv-64x128", ("model.fused_qkv=false",), **B64),
        Setting("engine-math-attention-64x128", ("model.attention_backend=math",), **B64),
        Setting("engine-deepspeed-adam-64x128", ("train.optimizer=deepspeed_fused",), **B64),
        Setting("engine-last-block-8x120", ("model.trainable=last_block",)),
        Setting("engine-longest-8", padding="longest"),
        Setting("engine-longest-64", padding="longest", micro_batch=64),
        Setting("engine-zero3-64x128", ("zero.stage=3",), **B64),
        Setting("gpt2-xl-zero3-4x128", xl, micro_batch=4, seq=128, steps=5, warmup=2),
        Setting("gpt2-xl-zero3-16x128", xl, micro_batch=16, seq=128, steps=5, warmup=2),
        *(Setting(f"{name}-bf16-64x128", (f"model.name={name}", UNREAD_WEIGHTS), **B64)
          for name in DECODER_PRESET_SETTINGS),
    ), steps=25, warmup=3)


MATRICES: dict[str, Callable[[bool], Matrix]] = {"tiny": tiny_matrix, "cpu": cpu_matrix, "gpu": gpu_matrix}


def select(matrix: Matrix, only: list[str] | None) -> list[Setting]:
    """The named settings, plus the baseline and the plain twins they name, in matrix order."""
    if not only:
        return list(matrix.settings)
    names = {s.name for s in matrix.settings}
    unknown = [n for n in only if n not in names]
    if unknown:
        raise ConfigError(f"--only: no setting {', '.join(unknown)} in the {matrix.name} matrix; "
                          f"choose from {', '.join(s.name for s in matrix.settings)}")
    wanted = {BASELINE.name, *only}
    wanted |= {s.plain_twin for s in matrix.settings if s.name in wanted and s.plain_twin}
    return [s for s in matrix.settings if s.name in wanted]


def setting_config(matrix: Matrix, setting: Setting) -> Config:
    batch = [f"train.micro_batch_size={setting.micro_batch}", "train.grad_accum_steps=1",
             "train.global_batch_size=null", f"data.padding={setting.padding}",
             f"data.group_by_length={str(setting.padding == 'longest').lower()}"]
    if setting.padding == "fixed":
        batch.append(f"data.max_length={setting.seq}")
    return load_config(None, [*matrix.base, *setting.overrides, *batch])


def check_matrix(matrix: Matrix, settings: list[Setting]) -> None:
    """Every config valid and every twin a plain setting, before the first minute of measuring."""
    plain = {s.name for s in matrix.settings if not s.engine}
    if matrix.settings[0] != BASELINE:
        raise ConfigError(f"the {matrix.name} matrix must start with the baseline")
    for s in settings:
        cfg = setting_config(matrix, s)
        if s.padding not in ("fixed", "longest"):
            raise ConfigError(f"{s.name}: padding must be fixed or longest, got {s.padding!r}")
        if not s.engine and cfg.precision not in ("fp32", "bf16", "bf16_autocast"):
            raise ConfigError(f"{s.name}: the plain loop runs fp32 or bf16 autocast, not {cfg.precision}")
        if s.plain_twin is not None and s.plain_twin not in plain:
            raise ConfigError(f"{s.name}: plain_twin {s.plain_twin!r} is not a plain setting of the matrix")


# ---------------------------------------------------------------- FLOPs


@dataclass(frozen=True)
class FlopCounter:
    """Model FLOPs per token, from non-embedding parameters and attention.

    forward = 2 x (n_layer x block parameters + final LayerNorm and head parameters)
              + 4 x n_layer x seq x n_embd (QK^T and AV over the full seq x seq square: not halved for
              the causal mask, as nanoGPT and PaLM count it); n_embd: the attention's width, for a Llama / Qwen3
              the query heads x head_dim (Qwen3-0.6B: 16 x 128 = 2048 against hidden_size 1024).
    backward = 2 x the forward FLOPs of the blocks from the lowest trainable one upwards, plus the
              final LayerNorm and head: every block trainable gives 2 x forward; only the last block
              gives 2 x (one block + LayerNorm + head). Frozen blocks below need no backward.
    """

    n_layer: int
    n_embd: int
    block_params: int
    top_params: int  # final LayerNorm + classifier head
    first_trainable_block: int  # n_layer when no block trains

    @classmethod
    def of(cls, model: GPTClassifier) -> FlopCounter:
        """Count before DeepSpeed partitions the parameters (ZeRO-3 leaves them empty)."""
        blocks = model.backbone.blocks
        trains = [any(p.requires_grad for p in b.parameters()) for b in blocks]
        top = sum(p.numel() for m in (model.backbone.ln_f, model.head) for p in m.parameters())
        return cls(
            n_layer=len(blocks),
            n_embd=getattr(model.config, "num_attention_heads", 0) * getattr(model.config, "head_dim", 0)
            or model.config.n_embd,  # GPT-2's config has no head_dim: its width is n_embd
            block_params=sum(p.numel() for p in blocks[0].parameters()),
            top_params=top,
            first_trainable_block=trains.index(True) if any(trains) else len(blocks),
        )

    def _forward(self, layers: int, seq: int) -> float:
        return 2.0 * (layers * self.block_params + self.top_params) + 4.0 * layers * seq * self.n_embd

    def forward_per_token(self, seq: int) -> float:
        return self._forward(self.n_layer, seq)

    def backward_per_token(self, seq: int) -> float:
        return 2.0 * self._forward(self.n_layer - self.first_trainable_block, seq)

    def batch(self, batch_size: int, seq: int) -> float:
        """FLOPs of one training step on a batch_size x seq batch (padded tokens)."""
        return batch_size * seq * (self.forward_per_token(seq) + self.backward_per_token(seq))


# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s; the first pattern found in the name wins.
PEAK_TFLOPS = ((r"H100.*PCIe", 756.0), (r"\bG?H[12]00\b", 989.0), (r"\bA100\b", 312.0),
               (r"\bL40S\b", 362.0), (r"\bL4\b", 121.0), (r"\bA10\b", 125.0))


def peak_tflops(device_name: str, given: float | None) -> float | None:
    if given is not None:
        return given
    for pattern, tflops in PEAK_TFLOPS:
        if re.search(pattern, device_name):
            return tflops
    return None


# ---------------------------------------------------------------- batches


@dataclass(frozen=True)
class BatchStats:
    real_tokens: int
    batch_size: int
    width: int

    @property
    def padded_tokens(self) -> int:
        return self.batch_size * self.width


def cut(ds: ClassificationDataset, seq: int) -> ClassificationDataset:
    return ClassificationDataset([ids[:seq] for ids in ds.token_ids], ds.labels, ds.texts)


def make_batches(data: DataBundle, setting: Setting, seed: int, device: torch.device,
                 vocab_size: int) -> tuple[list[Batch], list[BatchStats]]:
    if setting.padding == "fixed":
        loader = train_loader(cut(data.train, setting.seq), setting.micro_batch,
                              make_collate("fixed", setting.seq), 0, 1, seed)
    else:
        loader = train_loader(data.train, setting.micro_batch, make_collate("longest", data.max_length), 0, 1,
                              seed, group_by_length=True)
    host = [{**b, "input_ids": b["input_ids"] % vocab_size} for b in itertools.islice(loader, DISTINCT_BATCHES)]
    stats = [BatchStats(int(b["lengths"].sum()), *b["input_ids"].shape) for b in host]
    return [to_device(b, device) for b in host], stats


# ---------------------------------------------------------------- timing


@dataclass(frozen=True)
class Timing:
    warmup_seconds: float
    seconds: float
    losses: list[float]


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def time_steps(step: Step, batches: list[Batch], warmup: int, steps: int, device: torch.device) -> Timing:
    losses = []
    sync(device)
    start = time.perf_counter()
    for i in range(warmup):
        losses.append(step(batches[i % len(batches)]))
    sync(device)
    warm = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(warmup, warmup + steps):
        losses.append(step(batches[i % len(batches)]))
    sync(device)
    seconds = time.perf_counter() - start
    return Timing(warm, seconds, torch.stack(losses).float().cpu().tolist())


def engine_step(engine: Any) -> Step:
    def step(batch: Batch) -> torch.Tensor:
        logits = engine(batch["input_ids"], batch["lengths"]).float()
        loss = F.cross_entropy(logits, batch["labels"])
        engine.backward(loss)
        engine.step()
        return loss.detach()

    return step


# ---------------------------------------------------------------- one setting


@dataclass
class Result:
    name: str
    engine: bool
    model: str
    precision: str
    zero_stage: int | None
    trainable: str
    micro_batch: int
    padding: str
    seq: int | None
    steps: int
    warmup: int
    warmup_seconds: float
    step_ms: float
    samples_per_second: float
    real_tokens_per_second: float
    padded_tokens_per_second: float
    flops_per_step: float
    model_tflops_per_second: float
    mfu: float | None
    peak_memory_bytes: int
    first_loss: float
    last_loss: float
    trainable_parameters: int
    total_parameters: int
    overrides: list[str]
    plain_twin: str | None = None
    threads: int = 1
    busy_neighbour: bool = False
    ratio_vs_baseline: float | None = None
    ratio_step_time_vs_twin: float | None = None
    ratio_busy_shared_vs_all_threads: float | None = None


def describe_model(cfg: Config) -> str:
    arch = backbone_config(cfg.model)
    return f"{cfg.model.name} ({arch.n_layer} layers x {arch.n_embd})"


def run_setting(matrix: Matrix, setting: Setting, env: DistEnv, data: DataBundle, steps: int, warmup: int,
                peak: float | None) -> Result:
    cfg = setting_config(matrix, setting)
    release(env.device)
    batches, stats = make_batches(data, setting, cfg.seed, env.device, backbone_config(cfg.model).vocab_size)
    # On the device (fast for gpt2-xl); a setting and its twin share the seed, so the same weights. A decoder's
    # are random too (its model.weights is never read).
    model = build_plain_model(cfg, NUM_CLASSES, env.device, load_weights=not cfg.model.is_decoder,
                              init_on_device=True)
    flops = FlopCounter.of(model)
    trainable, total = count_parameters(model)
    engine = None
    try:
        if setting.engine:
            engine, precision = build_engine(model, cfg, env, plan_batches(cfg, 1), total_steps=warmup + steps)
            engine.train()
            step = engine_step(engine)
        else:
            autocast = cfg.precision in ("bf16", "bf16_autocast")
            precision = "bf16 autocast" if autocast else "fp32"
            # The baseline keeps the chapter's default AdamW; a twin uses the engine's implementation.
            kind = None if setting.name == BASELINE.name else optimizer_kind(cfg, env.device)
            optimizer = make_optimizer(model, kind=kind if kind in ("torch_fused", "torch_foreach") else None)
            step = make_step(model.train(), optimizer, env.device, autocast, cfg.train.grad_clip)
        timing = time_steps(step, batches, warmup, steps, env.device)
        memory = peak_memory_bytes(env.device)
    finally:
        if engine is not None:
            engine.destroy()
        if cfg.train.compile:
            from torch import _dynamo  # a plain `import torch._dynamo` would make `torch` local here

            _dynamo.reset()
    timed = [stats[i % len(stats)] for i in range(warmup, warmup + steps)]
    work = sum(flops.batch(s.batch_size, s.width) for s in timed)
    tflops = work / timing.seconds / 1e12
    return Result(
        name=setting.name,
        engine=setting.engine,
        model=describe_model(cfg),
        precision=precision,
        zero_stage=cfg.zero.stage if setting.engine else None,
        trainable=cfg.model.trainable,
        micro_batch=setting.micro_batch,
        padding=setting.padding,
        seq=setting.seq if setting.padding == "fixed" else None,
        steps=steps,
        warmup=warmup,
        warmup_seconds=timing.warmup_seconds,
        step_ms=timing.seconds / steps * 1e3,
        samples_per_second=sum(s.batch_size for s in timed) / timing.seconds,
        real_tokens_per_second=sum(s.real_tokens for s in timed) / timing.seconds,
        padded_tokens_per_second=sum(s.padded_tokens for s in timed) / timing.seconds,
        flops_per_step=work / steps,
        model_tflops_per_second=tflops,
        mfu=tflops / peak if peak else None,
        peak_memory_bytes=memory,
        first_loss=timing.losses[0],
        last_loss=timing.losses[-1],
        trainable_parameters=trainable,
        total_parameters=total,
        overrides=list(setting.overrides),
        plain_twin=setting.plain_twin,
        threads=torch.get_num_threads(),
        busy_neighbour=setting.busy_neighbour,
    )


@contextmanager
def threads_and_neighbour(setting: Setting) -> Iterator[None]:
    before = torch.get_num_threads()
    neighbour = None
    if setting.busy_neighbour:
        neighbour = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    torch.set_num_threads(setting.threads or before)
    try:
        yield
    finally:
        torch.set_num_threads(before)
        if neighbour is not None:
            neighbour.kill()
            neighbour.wait()


def error_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:500]


def run_matrix(matrix: Matrix, settings: list[Setting], env: DistEnv, args: argparse.Namespace,
               peak: float | None, save: Callable[[list[dict[str, Any]]], None]) -> list[dict[str, Any]]:
    """`save` gets the results so far after every setting: a run cut short keeps what it measured."""
    context = setting_config(matrix, BASELINE).model.arch()["context_length"]
    data = load_data(setting_config(matrix, BASELINE).data, context)
    results: list[dict[str, Any]] = []
    for setting in settings:
        steps = args.steps or matrix.steps
        steps = min(steps, setting.steps) if setting.steps else steps
        warmup = args.warmup if args.warmup is not None else matrix.warmup
        warmup = min(warmup, setting.warmup) if setting.warmup is not None else warmup
        print(f"[{setting.name}] {steps} timed steps after {warmup} warm-up", file=sys.stderr, flush=True)
        try:
            with threads_and_neighbour(setting):
                results.append(asdict(run_setting(matrix, setting, env, data, steps, warmup, peak)))
        except Exception as exc:  # noqa: BLE001 - a failing setting (OOM, compile error) is a result too
            traceback.print_exc()
            results.append({"name": setting.name, "error": error_line(exc)})
        release(env.device)
        add_ratios(results)
        save(results)
    return results


def add_ratios(results: list[dict[str, Any]]) -> None:
    ok = {r["name"]: r for r in results if "error" not in r}
    baseline = ok.get(BASELINE.name)
    for r in ok.values():
        if baseline is not None:
            r["ratio_vs_baseline"] = r["samples_per_second"] / baseline["samples_per_second"]
        twin = ok.get(r["plain_twin"]) if r["plain_twin"] else None
        if twin is not None:
            r["ratio_step_time_vs_twin"] = r["step_ms"] / twin["step_ms"]
    if BUSY_ALL in ok and BUSY_SHARED in ok:
        ok[BUSY_SHARED]["ratio_busy_shared_vs_all_threads"] = (
            ok[BUSY_SHARED]["samples_per_second"] / ok[BUSY_ALL]["samples_per_second"])


# ---------------------------------------------------------------- output


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or not math.isfinite(value) else format(value, spec)


def table(results: list[dict[str, Any]]) -> str:
    width = max([len("name"), *(len(r["name"]) for r in results)])
    lines = [f"{'name':<{width}} {'ms/step':>9} {'samples/s':>10} {'real tok/s':>11} {'padded tok/s':>12} "
             f"{'MFU %':>6} {'peak MiB':>9} {'vs baseline':>11}  loss first->last"]
    for r in results:
        if "error" in r:
            lines.append(f"{r['name']:<{width}} error: {r['error']}")
            continue
        mfu = None if r["mfu"] is None else 100 * r["mfu"]
        lines.append(
            f"{r['name']:<{width}} {r['step_ms']:>9.2f} {r['samples_per_second']:>10.1f} "
            f"{r['real_tokens_per_second']:>11.0f} {r['padded_tokens_per_second']:>12.0f} {fmt(mfu, '.1f'):>6} "
            f"{r['peak_memory_bytes'] / 2**20:>9.0f} {fmt(r['ratio_vs_baseline'], '.2f'):>10}x  "
            f"{r['first_loss']:.4f}->{r['last_loss']:.4f}"
        )
    for r in results:
        if r.get("ratio_step_time_vs_twin") is not None:
            lines.append(f"step time {r['name']} / {r['plain_twin']}: {r['ratio_step_time_vs_twin']:.3f}x")
        if r.get("ratio_busy_shared_vs_all_threads") is not None:
            lines.append(f"busy neighbour: samples/s with {r['threads']} thread(s) / with all cores' threads: "
                         f"{r['ratio_busy_shared_vs_all_threads']:.2f}x")
    return "\n".join(lines)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python benchmarks/throughput.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--matrix", required=True, choices=sorted(MATRICES))
    p.add_argument("--only", nargs="+", metavar="NAME", help="these settings (plus the baseline and their twins)")
    p.add_argument("--steps", type=int, help="timed optimizer steps (default: the matrix's)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default: the matrix's)")
    p.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak for MFU (default: by GPU name)")
    p.add_argument("--with-compile", action="store_true",
                   help="add torch.compile settings to the tiny and cpu matrices (about 30 s each on a CPU; "
                        "the gpu matrix always has them)")
    p.add_argument("--json", type=Path, help="write the figures to this JSON file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if (args.steps is not None and args.steps < 1) or (args.warmup is not None and args.warmup < 0):
            raise ConfigError("--steps must be >= 1 and --warmup >= 0")
        if args.peak_tflops is not None and args.peak_tflops <= 0:
            raise ConfigError("--peak-tflops must be > 0")
        matrix = MATRICES[args.matrix](args.with_compile)
        settings = select(matrix, args.only)
        check_matrix(matrix, settings)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    env = init_distributed()
    try:
        if env.world_size != 1:
            print("error: the benchmark runs one rank; launch it as a plain process", file=sys.stderr)
            return 2
        name = device_name(env.device)
        peak = peak_tflops(name, args.peak_tflops) if env.device.type == "cuda" else args.peak_tflops
        results = run_matrix(matrix, settings, env, args, peak, lambda r: write_json(args.json, name, peak, matrix, r))
    finally:
        shutdown()
    print(f"{matrix.name} matrix on {name}; peak {fmt(peak, 'g')} TFLOP/s bf16")
    print(table(results))
    if env.device.type != "cuda":
        print("peak MiB on a CPU: the process's peak resident set so far (ru_maxrss), which only grows")
    return 0


def write_json(path: Path | None, name: str, peak: float | None, matrix: Matrix,
               results: list[dict[str, Any]]) -> None:
    if path is None:
        return
    import deepspeed

    figures = {"device": name, "torch": torch.__version__, "deepspeed": deepspeed.__version__,
               "peak_tflops": peak, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
               "matrix": matrix.name, "results": results}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
