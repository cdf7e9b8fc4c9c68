"""GPU numerics: bf16 against fp32, compiled against eager, fused attention kernels against the math path.

Skipped without CUDA. `DIST_FINETUNE_TEST_DEVICE=cpu` runs the device-independent ones on a CPU
(to debug the tests themselves; the flash / memory-efficient kernels exist only on a GPU).
"""
from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from dist_finetune.config import Config, load_config
from dist_finetune.distributed import DistEnv, init_distributed, shutdown
from dist_finetune.engine import build_engine, plan_batches
from dist_finetune.model import GPTClassifier, build_model, configure_kernels, set_trainable

DEVICE = torch.device(os.environ.get("DIST_FINETUNE_TEST_DEVICE", "cuda"))
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
needs_cuda = pytest.mark.skipif(DEVICE.type != "cuda", reason="fused attention kernels exist only on a GPU")

SMALL = ["model.name=custom", "model.n_layer=4", "model.n_head=4", "model.n_embd=256", "model.context_length=128",
         "model.weights=none", "model.pooling=last_token", "model.trainable=all", "zero.stage=0",
         "train.micro_batch_size=16", "train.lr=3e-4", "train.weight_decay=0.0"]


def config(*overrides: str) -> Config:
    return load_config(None, [*SMALL, *overrides])


def small_model(cfg: Config, seed: int = 0) -> GPTClassifier:
    torch.manual_seed(seed)
    model = build_model(cfg.model, num_classes=2)
    set_trainable(model, cfg.model.trainable)
    return model


def right_padded_batch(seed: int = 0, batch: int = 16, width: int = 120) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(8, width + 1, (batch,), generator=g)
    lengths[0] = width
    ids = torch.randint(0, 50257, (batch, width), generator=g)
    ids[torch.arange(width)[None, :] >= lengths[:, None]] = 50256
    labels = torch.randint(0, 2, (batch,), generator=g)
    return {"input_ids": ids.to(DEVICE), "lengths": lengths.to(DEVICE), "labels": labels.to(DEVICE)}


@pytest.fixture(scope="module")
def dist_env() -> Iterator[DistEnv]:
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    saved = {name: os.environ.pop(name, None) for name in names}
    try:
        yield init_distributed(timeout_seconds=300, debug=DEVICE.type != "cuda")
    finally:
        shutdown()
        import deepspeed.utils.groups

        deepspeed.utils.groups._WORLD_GROUP = None
        for name, value in saved.items():
            if value is not None:
                os.environ[name] = value


def train_losses(engine, batch: dict[str, torch.Tensor], steps: int) -> list[float]:
    engine.train()
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(engine(batch["input_ids"], batch["lengths"]).float(), batch["labels"])
        engine.backward(loss)
        engine.step()
        losses.append(loss.detach())
    return [float(x) for x in losses]


def engine_losses(dist_env: DistEnv, steps: int, *overrides: str) -> list[float]:
    cfg = config(*overrides)
    engine, _ = build_engine(small_model(cfg, seed=1), cfg, dist_env, plan_batches(cfg, 1), total_steps=steps)
    losses = train_losses(engine, right_padded_batch(), steps)
    del engine
    torch.cuda.empty_cache() if DEVICE.type == "cuda" else None
    return losses


@pytest.mark.parametrize("precision", ["bf16", "bf16_autocast"])
def test_bf16_training_tracks_fp32(dist_env: DistEnv, precision: str) -> None:
    """The same forward to bf16 rounding; then both learn the batch (trajectories drift apart slowly)."""
    reference = engine_losses(dist_env, 6, "precision=fp32", "train.lr=1e-4")
    losses = engine_losses(dist_env, 6, f"precision={precision}", "train.lr=1e-4")
    assert abs(losses[0] - reference[0]) <= 0.02 * reference[0], (reference, losses)
    for step in (1, 2):
        assert abs(losses[step] - reference[step]) <= 0.1 * reference[step] + 0.02, (reference, losses)
    assert losses[-1] < 0.7 * losses[0] and reference[-1] < 0.7 * reference[0], (reference, losses)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_compiled_engine_matches_eager(dist_env: DistEnv, precision: str) -> None:
    eager = engine_losses(dist_env, 4, f"precision={precision}")
    compiled = engine_losses(dist_env, 4, f"precision={precision}", "train.compile=true")
    tolerance = 1e-3 if precision == "fp32" else 3e-2
    for a, b in zip(eager, compiled):
        assert abs(a - b) <= tolerance * abs(a), (eager, compiled)


def test_compiled_model_logits_match_eager() -> None:
    model = small_model(config()).to(DEVICE).eval()
    batch = right_padded_batch(seed=2)
    with torch.no_grad():
        eager = model(batch["input_ids"], batch["lengths"])
        compiled = torch.compile(model)(batch["input_ids"], batch["lengths"])
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)


@needs_cuda
@pytest.mark.parametrize("backend", ["flash", "efficient"])
def test_fused_attention_kernels_match_the_math_path(backend: str) -> None:
    """Causal attention over right padding needs no mask: the fused kernels give the math path's logits."""
    model = small_model(config()).to(DEVICE).eval()
    batch = right_padded_batch(seed=3)
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        configure_kernels(model, attention_backend="math")
        expected = model(batch["input_ids"], batch["lengths"]).float()
        configure_kernels(model, attention_backend=backend)
        got = model(batch["input_ids"], batch["lengths"]).float()
    torch.testing.assert_close(got, expected, atol=3e-2, rtol=3e-2)


def test_padding_to_the_longest_gives_the_logits_of_fixed_padding() -> None:
    model = small_model(config()).to(DEVICE).eval()
    batch = right_padded_batch(seed=4)
    longest = int(batch["lengths"][1:].max())
    ids, lengths = batch["input_ids"][1:], batch["lengths"][1:]  # drop the full-width example
    with torch.no_grad(), torch.autocast(DEVICE.type, torch.bfloat16):
        fixed = model(ids, lengths).float()
        trimmed = model(ids[:, :longest].contiguous(), lengths).float()
    torch.testing.assert_close(trimmed, fixed, atol=3e-2, rtol=3e-2)


@needs_cuda
def test_fp16_overflow_steps_do_not_count_as_steps(tmp_path):
    """fp16: DeepSpeed skips the optimizer and the schedule on a loss-scale overflow; global_step must
    not advance either, so max_steps and the schedule stay those of the real steps."""
    import runner

    run = runner.train(tmp_path, "fp16", ["precision=fp16", "train.max_steps=6", "eval.every_steps=3",
                                          "early_stopping.enabled=false"],
                       env={"DIST_FINETUNE_FAULTS": "nan_grad@step=2"})
    assert run.ok, run.output()
    summary = run.summary()
    assert summary["global_step"] == 6 and summary["overflow_steps"] >= 1
    assert [e["step"] for e in run.events("overflow")][:1] == [2]
