"""`python -m dist_finetune.train --config CONFIG [key.sub=value ...]`: the training loop.

Every rank trains on its shard and evaluates its shard; sums are all-reduced; rank 0 alone decides
{continue, new best, stop}; the decision is broadcast and every rank acts on it at the same step.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from . import checkpoint
from .config import Config, ConfigError, load_config, read_yaml, to_yaml
from .data import DataError, DataBundle, load_data, make_collate
from .loaders import train_loader
from .distributed import DistEnv, LaunchError, leave, collective_failure, set_activity, all_reduce_sum, broadcast_decision, broadcast_object, init_distributed, shutdown
from .engine import build_engine, param_group_names, plan_batches
from . import faults
from .preemption import PreemptionFlag
from .model import GPTConfig, build_model, configure_kernels, count_parameters, set_trainable
from .report import Reporter, peak_memory_bytes, process_age_seconds
from .evaluate import evaluate, forward
from .export import export_checkpoint
from .loss import class_weights, weight_tensor
from .metrics import from_confusion
from .weights import WeightsError, load_pretrained

log = logging.getLogger("dist_finetune")

CONTINUE, NEW_BEST, STOP = 0, 1, 2
USER_ERRORS = (ConfigError, DataError, WeightsError)


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite and the config says to stop."""


def nonfinite_on_any_rank(loss: torch.Tensor, env: DistEnv) -> bool:
    """Agreed by all-reduce, so every rank skips or stops on the same micro-batch."""
    bad = 0.0 if bool(torch.isfinite(loss.detach())) else 1.0
    return all_reduce_sum([bad], env)[0].item() > 0


class RunDirError(ConfigError):
    """The output folder cannot be used as asked."""


@dataclass
class EarlyStopper:
    """Rank 0's early-stopping state. Only rank 0 calls `update`; the result is broadcast."""

    mode: str
    patience: int
    min_delta: float
    enabled: bool = True
    best: float | None = None
    bad_evals: int = 0

    def update(self, value: float) -> int:
        better = self.best is None or (
            value < self.best - self.min_delta if self.mode == "min" else value > self.best + self.min_delta
        )
        if better:
            self.best, self.bad_evals = value, 0
            return NEW_BEST
        self.bad_evals += 1
        return STOP if self.enabled and self.bad_evals >= self.patience else CONTINUE


@dataclass
class TrainState:
    global_step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    examples_seen: int = 0
    tokens_seen: int = 0
    best_step: int | None = None
    stopped_early: bool = False
    preempted: bool = False
    micro_steps: int = 0  # micro-batches fed to the engine (skipped non-finite ones not counted)
    nonfinite_skipped: int = 0
    train_seconds: float = 0.0
    eval_seconds: float = 0.0  # evaluations inside the loop
    checkpoint_seconds: float = 0.0
    stopper: dict[str, Any] = field(default_factory=dict)
    # Training sums (loss, correct, count) flushed at a checkpoint, not yet reported at an evaluation.
    pending: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])

    def absorb(self, totals: list[float]) -> None:
        self.tokens_seen += int(totals[3])
        self.pending = [a + b for a, b in zip(self.pending, totals[:3])]


def batch_sums(loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, tokens: int) -> torch.Tensor:
    """[loss x examples, correct, examples, real tokens, non-finite losses] of one micro-batch, on the
    device (nothing is read back: no host synchronisation). A non-finite loss counts only as such."""
    finite = torch.isfinite(loss.detach()).double()
    n = labels.numel()
    loss_sum = torch.nan_to_num(loss.detach().double() * n, nan=0.0, posinf=0.0, neginf=0.0) * finite
    correct = (logits.detach().argmax(-1) == labels).sum().double() * finite
    return torch.stack([loss_sum, correct, finite * n, finite * tokens, 1.0 - finite])


class RunningTrain:
    """`batch_sums` added up on this rank since the last flush, kept on the device."""

    def __init__(self, device: torch.device) -> None:
        self.sums = torch.zeros(5, dtype=torch.float64, device=device)

    def add(self, sums: torch.Tensor) -> None:
        self.sums += sums

    def flush(self, env: DistEnv) -> list[float]:
        """The sums over all ranks since the last flush; every rank calls it at the same point."""
        totals = all_reduce_sum(self.sums, env).tolist()
        self.sums.zero_()
        return totals

    def nonfinite(self, env: DistEnv) -> float:
        """Non-finite losses on all ranks since the last flush, without flushing."""
        return all_reduce_sum(self.sums[4:], env)[0].item()


def mean_loss_accuracy(totals: list[float]) -> tuple[float, float]:
    loss_sum, correct, count = totals[:3]
    return (loss_sum / count, correct / count) if count else (float("nan"), float("nan"))


class SampleLog:
    """Which dataset indices this rank trained on, batch by batch (a debugging aid)."""

    def __init__(self, run_dir: Path, rank: int, loader, epoch: int) -> None:
        self.path = run_dir / "samples" / f"rank{rank}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.batches = list(loader.batch_sampler)  # same seed and epoch: the order the loader yields
        self.epoch = epoch

    def write(self, batch_index: int, step: int) -> None:
        record = {"epoch": self.epoch, "batch": batch_index, "step": step,
                  "indices": [int(i) for i in self.batches[batch_index]]}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


# ---------------------------------------------------------------- set-up


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dist_finetune.train", description=__doc__)
    p.add_argument("--config", help="YAML run config (default: all defaults)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.lr=1e-4")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    p.add_argument("--debug", action="store_true", help="CPU + gloo even where CUDA exists")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # older launchers
    return p.parse_args(argv)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare_run_dir(cfg: Config, env: DistEnv, overwrite: bool) -> str | None:
    """Rank 0 checks the folder and decides; every rank gets the resume tag (or the error)."""
    run_dir = Path(cfg.output_dir)
    outcome: tuple[str, str | None] = ("ok", None)
    if env.is_main:
        try:
            outcome = ("ok", _check_run_dir(cfg, run_dir, overwrite, env.world_size))
        except ConfigError as exc:
            outcome = ("error", str(exc))
        except OSError as exc:
            outcome = ("error", f"output_dir {run_dir} cannot be used: {exc}; choose another output_dir")
    outcome = broadcast_object(outcome, env)
    if outcome[0] == "error":
        raise RunDirError(outcome[1])
    return outcome[1]


def _check_run_dir(cfg: Config, run_dir: Path, overwrite: bool, world_size: int) -> str | None:
    tag = checkpoint.find_resume_tag(cfg, run_dir)
    saved = run_dir / "config.yaml"
    diffs = checkpoint.result_changing_differences(read_yaml(saved), cfg) if saved.exists() else []
    if tag is not None:
        if diffs:
            raise RunDirError(
                f"resume: {run_dir} was trained with a different config; these keys change the result:\n  "
                + "\n  ".join(diffs) + "\nUse the original values, or a new output_dir."
            )
        saved_world = checkpoint.saved_world_size(run_dir, tag)
        if saved_world is not None and saved_world != world_size:
            raise RunDirError(
                f"resume: checkpoint {run_dir}/checkpoints/{tag} was written by {saved_world} ranks and this "
                f"launch has {world_size}; its optimizer state is sharded for {saved_world} ranks. Either "
                f"relaunch with {saved_world} ranks, or continue from its weights with a fresh optimizer: "
                f"python -m dist_finetune.export --run {run_dir} --checkpoint latest --out WEIGHTS, then train "
                "in a new output_dir with model.weights=WEIGHTS"
            )
        return tag
    # resume=auto on a run that stopped before its first checkpoint: start it again from scratch.
    restart = cfg.resume == "auto" and saved.exists() and not diffs
    if run_dir.exists() and any(run_dir.iterdir()):
        if not (overwrite or restart):
            raise RunDirError(
                f"output_dir {run_dir} already exists and is not empty; pass --overwrite to replace it, "
                "resume=auto to continue it, or choose another output_dir"
            )
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    probe = run_dir / ".write_probe"
    try:
        probe.write_bytes(b"\0" * 65536)
        probe.unlink()
    except OSError as exc:
        raise RunDirError(f"output_dir {run_dir} is not writable: {exc}") from None
    checkpoint.check_free_space(cfg, run_dir)
    (run_dir / "config.yaml").write_text(to_yaml(cfg), encoding="utf-8")
    return None


def build_classifier(cfg: Config, data: DataBundle, reporter: Reporter, device: torch.device):
    backend = cfg.model.attention_backend
    if device.type != "cuda" and backend not in ("auto", "math"):
        raise ConfigError(f"model.attention_backend={backend} needs a CUDA GPU; use auto or math on a CPU")
    model = build_model(cfg.model, len(data.label_map))
    if cfg.model.weights.lower() != "none":
        report = load_pretrained(model, cfg.model.weights, download=cfg.model.download,
                                 head_policy=cfg.model.head)
        reporter.say(f"weights: loaded {len(report.loaded)} tensors ({report.format}) from {report.source}")
    set_trainable(model, cfg.model.trainable, cfg.lora)
    configure_kernels(model, cfg.model.fused_qkv, backend)
    return model


# ---------------------------------------------------------------- the loop


def train(cfg: Config, env: DistEnv, overwrite: bool = False) -> dict[str, Any] | None:
    """The whole run; returns the summary, or None when a preemption signal stopped it early."""
    wall_start = time.perf_counter()
    phases = {"startup_seconds": process_age_seconds()}  # process start -> here: imports, launcher, init
    preemption = PreemptionFlag().install()
    try:
        return _train(cfg, env, overwrite, preemption, wall_start, phases)
    finally:
        preemption.ignore_from_now()


def _train(cfg: Config, env: DistEnv, overwrite: bool, preemption: PreemptionFlag,
           wall_start: float, phases: dict[str, float | None]) -> dict[str, Any] | None:
    run_dir = Path(cfg.output_dir)
    resume_tag = prepare_run_dir(cfg, env, overwrite)
    seed_everything(cfg.seed)
    lap = time.perf_counter()
    data = load_data(cfg.data, GPTConfig.from_model_config(cfg.model).context_length)
    phases["data_seconds"] = time.perf_counter() - lap
    loss_weight = weight_tensor(class_weights(cfg.loss.class_weights, data.train.labels, data.label_map.labels),
                                env.device)
    plan = plan_batches(cfg, env.world_size)
    collate = make_collate(cfg.data.padding, data.max_length)
    loader = train_loader(data.train, plan.micro_batch_size, collate, env.rank, env.world_size, cfg.seed,
                          cfg.data.num_workers, cfg.data.group_by_length,
                          pin_memory=cfg.data.pin_memory and env.device.type == "cuda")
    steps_per_epoch = len(loader) // plan.grad_accum_steps
    if steps_per_epoch == 0:
        raise ConfigError(
            f"the training split ({len(data.train)} examples) is smaller than one optimizer step "
            f"(global batch {plan.global_batch_size}); lower train.micro_batch_size or train.grad_accum_steps"
        )
    total_steps = steps_per_epoch * cfg.train.epochs
    if cfg.train.max_steps is not None:
        total_steps = min(total_steps, cfg.train.max_steps)
    reporter = Reporter(run_dir, env.is_main, cfg.report.tensorboard, cfg.report.progress_bar, total_steps)
    if any(data.truncated.values()):
        counts = ", ".join(f"{n} of {len(getattr(data, split))} {split}" for split, n in data.truncated.items() if n)
        reporter.warn(f"texts longer than data.max_length={data.max_length} tokens were truncated: {counts}")
    lap = time.perf_counter()
    model = build_classifier(cfg, data, reporter, env.device)
    trainable, total = count_parameters(model)
    phases["model_seconds"] = time.perf_counter() - lap
    lap = time.perf_counter()
    engine, precision = build_engine(model, cfg, env, plan, total_steps)
    phases["engine_init_seconds"] = time.perf_counter() - lap
    es = cfg.early_stopping
    stopper = EarlyStopper(es.resolved_mode(), es.patience, es.min_delta, es.enabled)
    state = TrainState()
    if resume_tag is not None:
        client = checkpoint.load(engine, run_dir, env, resume_tag)
        state = TrainState(**client["train_state"])
        stopper = EarlyStopper(**state.stopper)
        reporter.truncate_after(state.global_step)
        reporter.say(f"resumed from {resume_tag} (step {state.global_step}, epoch {state.epoch})")
    reporter.say(
        f"world_size={env.world_size} device={env.device} precision={precision} zero={cfg.zero.stage} "
        f"micro={plan.micro_batch_size} accum={plan.grad_accum_steps} global={plan.global_batch_size} "
        f"steps={total_steps} trainable={trainable:,}/{total:,}"
    )
    state = run_loop(cfg, env, engine, data, loader, collate, plan, steps_per_epoch, total_steps,
                     stopper, state, reporter, preemption, loss_weight=loss_weight)
    if state.preempted:
        reporter.event("preempted", step=state.global_step, epoch=state.epoch)
        reporter.say(f"preempted (signal {preemption.received}) at step {state.global_step}: checkpoint "
                     f"{checkpoint.tag_for(state.global_step)} saved; run again with resume=auto to continue")
        return None
    return finish(cfg, env, engine, data, collate, state, reporter, precision, wall_start, phases,
                  trainable, total, steps_per_epoch)


def run_loop(cfg, env, engine, data, loader, collate, plan, steps_per_epoch, total_steps,
             stopper: EarlyStopper, state: TrainState, reporter: Reporter,
             preemption: PreemptionFlag, loss_weight: torch.Tensor | None = None) -> TrainState:
    micro_per_epoch = steps_per_epoch * plan.grad_accum_steps
    running, window = RunningTrain(env.device), RunningTrain(env.device)  # since the last evaluation / log line
    deferred = cfg.train.nonfinite_check == "deferred"
    checked_step = state.global_step  # deferred checks: every update up to this step had a finite loss
    last_eval_step = state.global_step if state.global_step else -1
    tick = time.perf_counter()
    engine.train()

    def eval_and_decide() -> int:
        nonlocal last_eval_step
        set_activity(f"evaluation at step {state.global_step}")
        lap = time.perf_counter()
        val = evaluate(engine, data.val, cfg, env, collate, cfg.eval.max_batches)
        state.absorb(checked(running.flush(env)))
        state.eval_seconds += time.perf_counter() - lap
        train_loss, train_acc = mean_loss_accuracy(state.pending)
        state.pending = [0.0, 0.0, 0.0]
        metric = val["loss"] if cfg.early_stopping.metric == "val_loss" else val["accuracy"]
        decision = stopper.update(metric) if env.is_main else CONTINUE
        decision = broadcast_decision(decision, env)
        last_eval_step = state.global_step
        if decision == NEW_BEST:
            state.best_step = state.global_step
        reporter.eval_point({
            "step": state.global_step, "epoch": round(state.global_step / steps_per_epoch, 4),
            "examples_seen": state.examples_seen, "train_loss": train_loss, "train_accuracy": train_acc,
            "val_loss": val["loss"], "val_accuracy": val["accuracy"], "lr": engine.get_lr()[0],
            "decision": ("continue", "new_best", "stop")[decision],
        })
        return decision

    def save(is_best: bool) -> None:
        set_activity(f"checkpoint save at step {state.global_step}")
        state.absorb(checked(running.flush(env)))
        state.stopper = asdict(stopper)
        client = {"train_state": asdict(state), "world_size": env.world_size,
                  "labels": data.label_map.to_json(), "max_length": data.max_length,
                  "param_group_names": param_group_names(engine.module)}
        lap = time.perf_counter()
        checkpoint.save(engine, Path(cfg.output_dir), env, state.global_step, client, is_best,
                        cfg.checkpoint.keep_last, cfg.checkpoint.checksums)
        state.checkpoint_seconds += time.perf_counter() - lap

    def verify(nonfinite: float) -> None:
        """Deferred checks: every rank gets the same all-reduced count, before anything is saved.
        A clean count covers every update so far (an earlier non-finite loss would have stopped the run)."""
        nonlocal checked_step
        if nonfinite > 0:
            stop_deferred(nonfinite)
        checked_step = state.global_step

    def checked(totals: list[float]) -> list[float]:
        verify(totals[4])
        return totals

    def stop_deferred(count: float) -> None:
        """Every rank gets here at the same point (the count was all-reduced)."""
        state.nonfinite_skipped += int(count)
        first, last = checked_step + 1, state.global_step + (state.micro_steps % plan.grad_accum_steps > 0)
        reporter.event("nonfinite", step=last, epoch=state.epoch, count=int(count), action="stop",
                       check="deferred")
        raise NonFiniteLoss(
            f"{int(count)} non-finite loss(es) between steps {first} and {last} (train.nonfinite_check="
            f"deferred: found after the update); last good state: checkpoint "
            f"{checkpoint.read_pointer(Path(cfg.output_dir), 'latest')}. Lower train.lr, check the data, or "
            "use train.nonfinite_check=micro_batch with train.on_nonfinite=skip to skip such micro-batches"
        )

    def on_nonfinite(step: int, batch_index: int) -> None:
        """Every rank calls this for the same micro-batch (the flag was all-reduced)."""
        state.nonfinite_skipped += 1
        stop = cfg.train.on_nonfinite == "stop" or state.nonfinite_skipped > cfg.train.max_nonfinite_skips
        reporter.event("nonfinite", step=step, epoch=state.epoch, batch=batch_index,
                       skipped_so_far=state.nonfinite_skipped, action="stop" if stop else "skip")
        reporter.say(f"non-finite loss at step {step} (epoch {state.epoch + 1}, batch {batch_index}): "
                     + ("stopping" if stop else f"micro-batch skipped ({state.nonfinite_skipped} so far)"))
        if not stop:
            return
        at_boundary = state.micro_steps % plan.grad_accum_steps == 0
        if at_boundary:
            save(False)
        last_good = checkpoint.tag_for(state.global_step) if at_boundary else \
            checkpoint.read_pointer(Path(cfg.output_dir), "latest")
        raise NonFiniteLoss(
            f"non-finite loss at step {step} (epoch {state.epoch + 1}, batch {batch_index}; "
            f"{state.nonfinite_skipped} non-finite micro-batches in this run); last good state: "
            f"checkpoint {last_good}. Lower train.lr, check the data, or set train.on_nonfinite=skip"
        )

    done = state.global_step >= total_steps or state.stopped_early
    while not done and state.epoch < cfg.train.epochs:
        loader.sampler.set_epoch(state.epoch)
        sample_log = SampleLog(Path(cfg.output_dir), env.rank, loader, state.epoch) if cfg.report.sample_log else None
        for i, batch in enumerate(loader):
            if i >= micro_per_epoch:
                break
            if i < state.batches_in_epoch:  # resuming inside an epoch: skip what was trained
                continue
            if sample_log is not None:
                sample_log.write(i, state.global_step)
            next_step = state.global_step + 1
            faults.crash_or_stall(next_step, env.rank)
            set_activity(f"training step {next_step}")
            logits, labels = forward(engine, batch, env)
            loss = F.cross_entropy(logits, labels, weight=loss_weight)
            if faults.nan_loss(next_step, env.rank):
                loss = loss * float("nan")
            state.batches_in_epoch += 1
            if not deferred and nonfinite_on_any_rank(loss, env):
                on_nonfinite(next_step, i)
                continue
            engine.backward(loss)
            engine.step()
            sums = batch_sums(loss, logits, labels, int(batch["lengths"].sum()))
            running.add(sums)
            window.add(sums)
            state.micro_steps += 1
            state.examples_seen += labels.numel() * env.world_size
            if state.micro_steps % plan.grad_accum_steps:
                continue
            state.global_step += 1
            now = time.perf_counter()
            state.train_seconds += now - tick
            tick = now
            sync_point = state.global_step % cfg.train.sync_every_steps == 0
            if deferred and sync_point:
                verify(running.nonfinite(env))
            if state.global_step % cfg.train.log_every_steps == 0:
                # Only deferred checks let a non-finite loss into the sums.
                loss_avg, acc_avg = mean_loss_accuracy(checked(window.flush(env)))
                lr = engine.get_lr()[0]
                speed = state.examples_seen / max(state.train_seconds, 1e-9)
                reporter.step(state.global_step, f"epoch {state.epoch + 1} loss {loss_avg:.4f} lr {lr:.2e}")
                reporter.event("train", step=state.global_step, epoch=round(state.global_step / steps_per_epoch, 4),
                               examples_seen=state.examples_seen, train_loss=loss_avg,
                               train_accuracy=acc_avg, lr=lr, samples_per_second=speed)
            every = cfg.eval.every_steps
            decision = eval_and_decide() if every and state.global_step % every == 0 else CONTINUE
            end_of_run = state.global_step >= total_steps or decision == STOP
            periodic = cfg.checkpoint.every_steps and state.global_step % cfg.checkpoint.every_steps == 0
            if end_of_run:
                if last_eval_step != state.global_step:
                    decision = eval_and_decide()
                state.stopped_early = decision == STOP
                save(decision == NEW_BEST)
                done = True
                break
            if decision == NEW_BEST or periodic:
                save(decision == NEW_BEST)
            if sync_point and preemption.agreed(env):
                if not (decision == NEW_BEST or periodic):
                    save(False)
                state.preempted = True
                done = True
                break
            tick = time.perf_counter()
        if done:
            break
        state.epoch += 1
        state.batches_in_epoch = 0
        if last_eval_step != state.global_step:
            decision = eval_and_decide()
            state.stopped_early = decision == STOP
            save(decision == NEW_BEST)
            done = state.stopped_early
        tick = time.perf_counter()
    return state


def finish(cfg, env, engine, data, collate, state: TrainState, reporter: Reporter, precision: str,
           wall_start: float, phases: dict[str, float | None], trainable: int, total: int,
           steps_per_epoch: int) -> dict[str, Any]:
    run_dir = Path(cfg.output_dir)
    lap = time.perf_counter()
    best_tag = checkpoint.best_valid_tag(run_dir) if env.is_main else None
    best_tag = broadcast_object(best_tag, env)
    if best_tag is not None:
        checkpoint.load(engine, run_dir, env, best_tag, weights_only=True)
    results = {split: evaluate(engine, getattr(data, split), cfg, env, collate)
               for split in ("train", "val", "test")}
    phases["final_eval_seconds"] = time.perf_counter() - lap
    labels = data.label_map.to_json()
    lap = time.perf_counter()
    if env.is_main and cfg.checkpoint.export and best_tag is not None:
        export_checkpoint(cfg, run_dir, best_tag, run_dir / "export", labels, data.max_length)
    phases["export_seconds"] = time.perf_counter() - lap
    summary = {
        **{split: {"accuracy": r["accuracy"], "loss": r["loss"], "examples": r["examples"],
                   **from_confusion(r["confusion_matrix"]).to_dict(labels)}
           for split, r in results.items()},
        "best_step": state.best_step,
        "global_step": state.global_step,
        "epochs_completed": _whole(state.global_step / steps_per_epoch),
        "stopped_early": state.stopped_early,
        "world_size": env.world_size,
        "zero_stage": cfg.zero.stage,
        "precision": precision,
        "wall_seconds": round(time.perf_counter() - wall_start, 3),
        "train_seconds": round(state.train_seconds, 3),
        "samples_per_second": state.examples_seen / max(state.train_seconds, 1e-9),
        "tokens_per_second": state.tokens_seen / max(state.train_seconds, 1e-9),
        "peak_memory_bytes": peak_memory_bytes(env.device),
        # Where the wall time went (this launch; a resumed run's loop figures include earlier launches).
        "timings": _round({**phases, "loop_train_seconds": state.train_seconds, "loop_eval_seconds":
                           state.eval_seconds, "checkpoint_seconds": state.checkpoint_seconds}),
        "trainable_parameters": trainable,
        "total_parameters": total,
        "labels": labels,
        "best_checkpoint": best_tag,
        "max_length": data.max_length,
        "class_weights": class_weights(cfg.loss.class_weights, data.train.labels, labels),
    }
    reporter.finish(summary, plots=cfg.report.plots)
    reporter.say(
        f"done: test accuracy {summary['test']['accuracy']:.4f}, val {summary['val']['accuracy']:.4f}, "
        f"best step {state.best_step}, {summary['wall_seconds']:.1f} s -> {run_dir}"
    )
    return summary


def _round(timings: dict[str, float | None]) -> dict[str, float | None]:
    return {k: None if v is None else round(v, 3) for k, v in timings.items()}


def _whole(x: float) -> float | int:
    return int(x) if float(x).is_integer() else round(x, 4)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    try:
        env = init_distributed(cfg.distributed.timeout_seconds, debug=args.debug or cfg.distributed.debug)
    except LaunchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        train(cfg, env, overwrite=args.overwrite)
    except USER_ERRORS as exc:  # raised by every rank at the same point
        print(f"error (rank {env.rank}): {exc}", file=sys.stderr)
        shutdown()
        return 2
    except NonFiniteLoss as exc:  # every rank agreed on it
        print(f"error (rank {env.rank}): {exc}", file=sys.stderr)
        shutdown()
        return 3
    except Exception as exc:
        message = collective_failure(exc, env, cfg.distributed.timeout_seconds)
        if message is None:
            raise
        # The group is broken: leave at once, without the collectives a clean shutdown would need.
        print(f"error: {message}", file=sys.stderr, flush=True)
        os._exit(4)
    shutdown()
    return 0


if __name__ == "__main__":
    leave(main())
