"""The Trainer: one run's state, its set-up, the epoch/step loop and the one decision after each step.

Every rank trains on its shard and evaluates its shard; sums are all-reduced; rank 0 alone decides
{continue, new best, stop}; the decision is broadcast and every rank acts on it at the same step.
"""
from __future__ import annotations

import json
import logging
import random
import re
import signal
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import checkpoint, faults, logs
from .config import Config, ConfigError, to_dict
from .data import make_collate
from .distributed import DistEnv, all_reduce_sum, broadcast_decision, broadcast_object, set_activity
from .encoding import default_stride, describe
from .multilabel import METRICS as MULTI_LABEL_METRICS, tune_thresholds
from .regression import METRICS as REGRESSION_METRICS

from .engine import (build_engine, deepspeed_config, param_group_names, plan_batches, resolve_precision,
                     skip_shm_comm_op)
from .exporter import EXPORT_SUBDIRS, export_checkpoint
from .hf_export import export_notes
from .loaders import train_loader
from .loss import class_weights, weight_tensor
from .metrics import from_confusion
from .families import load_tokenizer, saved_arch_differs
from .model import build_model, configure_kernels, count_parameters, set_trainable
from .nonfinite import NonFiniteError, StepGuard
from .preemption import PreemptionFlag
from .report import Reporter, peak_memory_bytes, process_age_seconds
from .errors import UserError
from .runs import RunError, best_valid_tag, claim_run_dir, load_run_data
from .trackers import RunInfo, check_installed as check_trackers_installed, read_ids as read_tracker_ids
from .step import (CORRECT, EXAMPLES, LOSS_SUM, NONFINITE, TOKENS, RunningSums, batch_sums, evaluate, forward,
                   loss_of, mean_loss_accuracy)
from .weights import load_pretrained

# What the console shows of an evaluation, per task (the first: the done line's)
HEADLINE = {"single_label": ("accuracy",), "multi_label": ("micro_f1", "subset_accuracy"), "regression": ("rmse", "r2")}

CONTINUE, NEW_BEST, STOP = 0, 1, 2


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
    """Everything the loop needs to continue exactly where it stopped; saved in every checkpoint."""

    global_step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    examples_seen: int = 0
    tokens_seen: int = 0
    best_step: int | None = None
    stopped_early: bool = False
    preempted: bool = False
    micro_steps: int = 0  # micro-batches fed to the engine
    nonfinite_skipped: int = 0  # micro-batches (or windows, for gradients) dropped as non-finite
    overflow_steps: int = 0  # fp16: steps DeepSpeed skipped on a loss-scale overflow (not counted as steps)
    last_eval_step: int = -1
    train_seconds: float = 0.0
    eval_seconds: float = 0.0  # evaluations inside the loop
    checkpoint_seconds: float = 0.0
    stopper: dict[str, Any] = field(default_factory=dict)
    # Training sums [loss x n, correct, n] not yet reported: since the last evaluation / the last log line.
    pending: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    log_pending: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0])  # + micro-batches

    def absorb(self, totals: list[float], micro_batches: int) -> None:
        self.tokens_seen += int(totals[TOKENS])
        part = [totals[LOSS_SUM], totals[CORRECT], totals[EXAMPLES]]
        self.pending = [a + b for a, b in zip(self.pending, part)]
        self.log_pending = [a + b for a, b in zip(self.log_pending, part + [micro_batches])]


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


# How torch.save reports a write that failed (its zip writer raises RuntimeError, not OSError).
WRITE_FAILURE = re.compile(r"iostream error|failed writing|file write failed|unexpected pos|no space left|"
                           r"disk quota", re.I)


class CheckpointWriteError(UserError):
    """A checkpoint could not be written (disk full, quota): training stops, the last complete one stays."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def nonfinite_on_any_rank(loss: torch.Tensor, env: DistEnv) -> bool:
    """Agreed by all-reduce, so every rank skips or stops on the same micro-batch."""
    bad = 0.0 if bool(torch.isfinite(loss.detach())) else 1.0
    return all_reduce_sum([bad], env)[0].item() > 0


class Trainer:
    def __init__(self, cfg: Config, env: DistEnv, overwrite: bool = False) -> None:
        self.cfg, self.env, self.overwrite = cfg, env, overwrite
        self.wall_start = time.perf_counter()
        self.phases: dict[str, float | None] = {"startup_seconds": process_age_seconds()}
        self.signals = PreemptionFlag()
        self.folder = None
        self.state = TrainState()
        self.reporter: Reporter | None = None
        self.done = False

    # ------------------------------------------------------------ the run

    def fit(self) -> dict[str, Any] | None:
        """The whole run; returns the summary, or None when a signal stopped it (checkpoint saved)."""
        self.signals.install()
        try:
            self.setup()
            self.train()
            if self.state.preempted:
                return self.stopped_by_signal()
            return self.finish()
        except Exception as exc:  # the command prints it; the log file keeps it too
            logs.echo(f"error: {exc}" if isinstance(exc, UserError) else traceback.format_exc(), logging.ERROR)
            raise
        finally:
            self.signals.ignore_from_now()
            if self.reporter is not None:
                self.reporter.close_progress()  # a failed run's error line starts on a line of its own
                self.reporter.end_trackers("stopped" if self.state.preempted else "failed")  # after finish: none
            if self.folder is not None:
                self.folder.release()

    @property
    def interrupted(self) -> bool:
        """Ctrl-C stopped the run (a Ctrl-C during the final evaluation changes nothing: the run is done)."""
        return self.state.preempted and self.signals.received == signal.SIGINT

    def train(self) -> None:
        s = self.state
        self.engine.train()
        self.tick = time.perf_counter()
        self.reporter.open_progress(s.global_step)
        while not self.done and s.epoch < self.cfg.train.epochs:
            self.loader.sampler.set_epoch(s.epoch)  # every rank reshuffles the same way
            self.train_epoch()
            if self.done:
                break
            self.decide(epoch_end=True)  # a run resumed at an epoch's very end still evaluates it
            if self.done:
                break
            s.epoch, s.batches_in_epoch = s.epoch + 1, 0
        self.reporter.close_progress("early stop" if s.stopped_early else "stopped by a signal" if s.preempted else "")

    def train_epoch(self) -> None:
        s = self.state
        sample_log = self.sample_log()
        for i, batch in enumerate(self.loader):
            if i >= self.micro_per_epoch:
                break
            if i < s.batches_in_epoch:  # resuming inside an epoch: skip what was trained
                continue
            if sample_log is not None:
                sample_log.write(i, s.global_step)
            self.micro_step(batch, i)
            if s.batches_in_epoch % self.plan.grad_accum_steps == 0 and self.after_window():
                self.decide(epoch_end=s.batches_in_epoch >= self.micro_per_epoch)
                if self.done:
                    return
                self.tick = time.perf_counter()

    def micro_step(self, batch: dict[str, torch.Tensor], index: int) -> None:
        """Forward, loss, backward and the engine's step (an optimizer step at a window's end)."""
        s, env = self.state, self.env
        next_step = s.global_step + 1
        faults.crash_or_stall(next_step, env.rank)
        set_activity(f"training step {next_step}")
        logits, labels = forward(self.engine, batch, env.device)
        loss = faults.perturb_loss(loss_of(logits, labels, self.loss_weight, self.cfg.task,
                                           self.cfg.loss.regression == "huber"), next_step, env.rank)
        bad = not self.deferred and nonfinite_on_any_rank(loss, env)
        if bad:
            self.on_nonfinite_loss(next_step, index)  # stops, or drops this whole window
        s.batches_in_epoch += 1
        s.micro_steps += 1
        self.engine.backward(loss)  # also for a dropped window: DeepSpeed's counters stay aligned
        self.engine.step()
        if not bad:
            self.sums.add(batch_sums(loss, logits, labels, int(batch["lengths"].sum()), self.cfg.task))
            s.examples_seen += labels.shape[0] * env.world_size  # texts (multi_label, regression: rows of labels)

    def after_window(self) -> bool:
        """The window's optimizer step is done; False when it did not count (fp16 overflow)."""
        s = self.state
        if self.engine.skipped_steps > self.ds_skipped:  # fp16 loss-scale overflow: no update, no schedule
            self.ds_skipped = self.engine.skipped_steps
            s.overflow_steps += 1
            self.reporter.event("overflow", step=s.global_step + 1, epoch=s.epoch, total=s.overflow_steps)
            return False
        s.global_step += 1
        self.reporter.advance(s.global_step)
        now = time.perf_counter()
        s.train_seconds += now - self.tick
        self.tick = now
        faults.poison_parameters(self.guard.params(), s.global_step, self.env.rank)
        if self.deferred:
            self.sums.sums[NONFINITE] += self.guard.take_pending()
        else:
            self.check_update()
        return True

    def decide(self, epoch_end: bool) -> None:
        """After each optimizer step (and once more at an epoch's end): log, evaluate, choose the best,
        save, stop. Every rank calls it at the same point; rank 0's verdict is broadcast."""
        s, cfg, step = self.state, self.cfg, self.state.global_step
        end_of_run = step >= self.total_steps
        every = cfg.eval.every_steps
        due = epoch_end or end_of_run or bool(every and step % every == 0)
        periodic = bool(cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0)
        log_due = step % cfg.train.log_every_steps == 0 and step != self.last_log_step
        acts = due or periodic or log_due
        signalled = (acts or step % cfg.train.sync_every_steps == 0) and self.agree(check_params=acts)
        if signalled and not acts:
            self.agree(check_params=True)  # about to save for the signal: the parameters first
        if log_due:
            self.log_line()
        decision = self.evaluate_and_decide() if due and s.last_eval_step != step else CONTINUE
        s.stopped_early = s.stopped_early or decision == STOP
        finished = end_of_run or s.stopped_early
        s.preempted = signalled and not finished
        if decision == NEW_BEST or (self.last_saved_step != step and
                                    (periodic or epoch_end or finished or s.preempted)):
            self.save(is_best=decision == NEW_BEST)
        self.done = finished or s.preempted

    # ------------------------------------------------------------ set-up

    def agree(self, check_params: bool) -> bool:
        """One all-reduce at a sync point: did any rank get a signal, and is every number finite (the
        parameters when something is about to be logged, evaluated or saved; under deferred checks also the
        losses and gradients since the last check)?"""
        zero = torch.zeros((), dtype=torch.float64, device=self.env.device)
        bad = self.guard.params_nonfinite() if check_params else zero
        if self.deferred:
            bad = bad + self.sums.sums[NONFINITE]
        flags = torch.stack([zero + self.signals.flag(), bad])
        signalled, nonfinite = all_reduce_sum(flags, self.env).tolist()
        if self.deferred:
            self.verify(nonfinite)
        elif nonfinite > 0:  # an applied update cannot be dropped: stop
            self.reporter.event("nonfinite", step=self.state.global_step, epoch=self.state.epoch,
                                what="parameters", action="stop")
            raise NonFiniteError(
                f"the parameters became non-finite at step {self.state.global_step} (the update overflowed); last "
                f"good state: {self.last_good()}. Lower train.lr (now {self.cfg.train.lr:g}) or check the data")
        return signalled > 0

    def setup(self) -> None:
        cfg, env = self.cfg, self.env
        check_trackers_installed(cfg.report.tracker_names)
        self.folder = claim_run_dir(cfg, env, self.overwrite)  # checks and locks; deletes nothing
        self.run_dir = self.folder.path
        seed_everything(cfg.seed)
        lap = time.perf_counter()
        self.setup_data()
        self.phases["data_seconds"] = time.perf_counter() - lap
        lap = time.perf_counter()
        self.model = self.build_classifier()
        self.phases["model_seconds"] = time.perf_counter() - lap
        lap = time.perf_counter()
        self.engine, self.precision = build_engine(self.model, cfg, env, self.plan, self.total_steps)
        self.phases["engine_init_seconds"] = time.perf_counter() - lap
        self.deferred = cfg.train.nonfinite_check == "deferred"
        self.guard = StepGuard(self.engine.basic_optimizer, env, agree_each_step=not self.deferred)
        self.folder.commit(self.data.split)  # everything that can fail before training passed: only now replace an old run
        logs.open_file(logs.log_file(self.run_dir, env.rank))
        self.reporter = self.open_reporter()
        self.warn_truncated()
        self.restore()
        self.reporter.say(self.headline())
        self.reporter.say(self.plan_line())

    def open_reporter(self) -> Reporter:
        """Rank 0 reads the run's reports back (a resume); what it finds wrong stops every rank."""
        cfg, env, problem = self.cfg, self.env, None
        try:
            reporter = Reporter(self.run_dir, env.is_main, cfg.report.progress_bar, self.total_steps,
                                cfg.report.tracker_names, self.tracking_info() if env.is_main else None)
        except UserError as exc:
            reporter, problem = None, str(exc)
        problem = broadcast_object(problem, env)
        if problem is not None:
            raise RunError(problem)
        return reporter

    def tracking_info(self) -> RunInfo:
        report = self.cfg.report
        return RunInfo(self.run_dir, report.run_name or self.run_dir.resolve().name, report.experiment,
                       to_dict(self.cfg), read_tracker_ids(self.run_dir))

    def setup_data(self) -> None:
        cfg, env = self.cfg, self.env
        self.data = load_run_data(cfg, self.run_dir, saved=self.folder.resume_tag is not None)  # a resume: its split
        self.loss_weight = weight_tensor(
            class_weights(cfg.loss.class_weights, self.data.train.labels, self.data.label_map.labels,
                          cfg.task == "multi_label"), env.device)
        # task=multi_label: each label's decision threshold (tuned on the validation split at the end, if asked)
        self.thresholds = [cfg.eval.threshold] * len(self.data.label_map) if cfg.task == "multi_label" else None
        self.plan = plan_batches(cfg, env.world_size)
        self.collate = make_collate(cfg.data.padding, self.data.max_length,
                                    load_tokenizer(cfg.model, self.saved_run).pad_id)
        self.loader = train_loader(self.data.train, self.plan.micro_batch_size, self.collate, env.rank,
                                   env.world_size, cfg.seed, cfg.data.num_workers, cfg.data.group_by_length,
                                   pin_memory=cfg.data.pin_memory and env.device.type == "cuda")
        self.steps_per_epoch = len(self.loader) // self.plan.grad_accum_steps
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"the training split ({len(self.data.train)} examples) is smaller than one optimizer step "
                f"(global batch {self.plan.global_batch_size}); lower train.micro_batch_size or "
                "train.grad_accum_steps")
        self.micro_per_epoch = self.steps_per_epoch * self.plan.grad_accum_steps
        self.total_steps = self.steps_per_epoch * cfg.train.epochs
        if cfg.train.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.train.max_steps)

    def build_classifier(self) -> torch.nn.Module:
        cfg, device = self.cfg, self.env.device
        backend = cfg.model.attention_backend
        if device.type != "cuda" and backend not in ("auto", "math"):
            raise ConfigError(f"model.attention_backend={backend} needs a CUDA GPU; use auto or math on a CPU")
        ds_config = self.partitioned_build_config()
        if ds_config is not None:
            skip_shm_comm_op(self.env)  # before zero.Init sets up DeepSpeed's communication
        model = build_model(cfg.model, len(self.data.label_map), run_dir=self.saved_run, ds_config=ds_config)
        self.loaded_weights = None
        # A decoder resumed: the checkpoint holds every weight, frozen ones too (ZeRO 0-2: the module state, loaded
        # strictly; ZeRO-3: each rank's share of the frozen ones beside the optimizer's), so model.weights is not
        # read and may be gone.
        whole = self.saved_run is not None and cfg.model.is_decoder
        if cfg.model.weights.lower() != "none" and not whole:
            self.loaded_weights = load_pretrained(model, cfg.model.weights, download=cfg.model.download,
                                                  head_policy=cfg.model.head, labels=self.data.label_map.labels)
        set_trainable(model, cfg.model.trainable, cfg.lora)
        configure_kernels(model, cfg.model.fused_qkv, backend)
        self.trainable, self.total_params = count_parameters(model)
        return model

    def partitioned_build_config(self) -> dict[str, Any] | None:
        """A Llama / Qwen3 run under ZeRO-3 builds its backbone partitioned across the ranks (zero3.py): the
        DeepSpeed config it is built under. GPT-2 (at most 1.5B parameters) is built whole, as before."""
        cfg = self.cfg
        if cfg.zero.stage < 3 or not cfg.model.is_decoder:
            return None
        return deepspeed_config(cfg, self.plan, resolve_precision(cfg.precision, self.env.device))

    @property
    def saved_run(self) -> Path | None:
        """A resume reads the run's own architecture and tokenizer (families.save_run_files), not model.weights'."""
        return self.run_dir if self.folder.resume_tag is not None else None

    def warn_truncated(self) -> None:
        data = self.data
        changed = saved_arch_differs(self.cfg.model, self.saved_run) if self.saved_run is not None else None
        if changed is not None:
            self.reporter.warn(changed)
        if self.loaded_weights is not None:
            w = self.loaded_weights
            self.reporter.say(f"weights: loaded {len(w.loaded)} tensors ({w.format}) from {w.source}")
        windows = data.windows()
        if windows is not None:
            counts = ", ".join(f"{split} {getattr(data, split).documents} texts -> {n} windows"
                               for split, n in windows.items())
            stride = self.cfg.data.chunk_stride or default_stride(data.max_length)
            self.reporter.say(f"long texts: windows of {data.max_length} tokens, {stride} apart: {counts}")
        if any(data.truncated.values()):
            counts = ", ".join(f"{n} of {len(getattr(data, split))} {split}"
                               for split, n in data.truncated.items() if n)
            cut = describe(data.max_length, self.cfg.data.long_texts, self.cfg.data.head_tokens,
                           pairs=self.cfg.data.text_pair_column is not None)
            self.reporter.warn(f"texts longer than data.max_length={data.max_length} tokens were truncated to {cut}: "
                               f"{counts}")

    def restore(self) -> None:
        """A fresh state, or the checkpoint's: model, optimizer, schedule, RNG, position, early stopping."""
        es = self.cfg.early_stopping
        self.stopper = EarlyStopper(es.resolved_mode(), es.patience, es.min_delta, es.enabled)
        self.sums = RunningSums(self.env.device)
        self.last_saved_step = self.last_log_step = -1
        tag = self.folder.resume_tag
        if tag is not None:
            client = checkpoint.load(self.engine, self.run_dir, self.env, tag)
            self.state, self.stopper = self.restored_state(client, tag)
            self.engine.micro_steps = self.state.micro_steps
            self.last_saved_step = self.state.global_step
            self.reporter.truncate_after(self.state.global_step)
            self.reporter.say(f"resumed from {tag} (step {self.state.global_step}, epoch {self.state.epoch + 1})")
        self.ds_skipped = self.engine.skipped_steps
        self.checked_step = self.state.global_step
        self.flushed_micro = self.state.micro_steps
        self.guard_skipped = self.guard.skipped
        self.done = self.state.global_step >= self.total_steps or self.state.stopped_early

    def restored_state(self, client: dict[str, Any], tag: str) -> tuple[TrainState, EarlyStopper]:
        """The loop's state as the checkpoint recorded it (the same on every rank: a shared file)."""
        try:
            state = TrainState(**client["train_state"])
            return state, EarlyStopper(**state.stopper)
        except (KeyError, TypeError) as exc:
            raise RunError(
                f"checkpoint {self.run_dir / 'checkpoints' / tag} records no usable training state ({exc}); resume "
                "from another one with resume=RUN/checkpoints/step_N, or start again with --overwrite") from None

    def headline(self) -> str:
        cfg, plan = self.cfg, self.plan
        return (f"world_size={self.env.world_size} device={self.env.device} precision={self.precision} "
                f"zero={cfg.zero.stage} micro={plan.micro_batch_size} accum={plan.grad_accum_steps} "
                f"global={plan.global_batch_size} steps={self.total_steps} "
                f"trainable={self.trainable:,}/{self.total_params:,}")

    def plan_line(self) -> str:
        """What the headline's step count means: at most, with the evaluations and the early stop."""
        cfg, es = self.cfg, self.cfg.early_stopping
        full = self.steps_per_epoch * cfg.train.epochs
        epochs = _count(cfg.train.epochs, "epoch")
        length = (f"{epochs} of {self.steps_per_epoch} steps" if self.total_steps == full
                  else f"train.max_steps; an epoch is {self.steps_per_epoch} steps")
        every = f"every {cfg.eval.every_steps} steps and " if cfg.eval.every_steps else ""
        stop = (f"stops early after {_count(es.patience, 'evaluation')} without a better {es.metric}" if es.enabled
                else "early stopping is off")
        return f"plan: up to {self.total_steps} steps ({length}); evaluates {every}at each epoch's end; {stop}"

    def sample_log(self) -> SampleLog | None:
        if not self.cfg.report.sample_log:
            return None
        return SampleLog(self.run_dir, self.env.rank, self.loader, self.state.epoch)

    # ------------------------------------------------------------ the stages of a decision

    def flush(self) -> None:
        """The running sums of every rank into the state; every rank calls it at the same point."""
        totals = self.sums.flush(self.env)
        if self.deferred:
            self.verify(totals[NONFINITE])
        self.state.absorb(totals, self.state.micro_steps - self.flushed_micro)
        self.flushed_micro = self.state.micro_steps

    def log_line(self) -> None:
        s = self.state
        self.flush()
        self.last_log_step = s.global_step
        loss_sum, correct, count, micro = s.log_pending
        if count == 0:  # only dropped (non-finite) windows since the last line: nothing to report yet
            return
        s.log_pending = [0.0, 0.0, 0.0, 0.0]
        loss_avg, acc_avg = mean_loss_accuracy([loss_sum, correct, count])
        lr = self.engine.get_lr()[0]
        speed = s.examples_seen / max(s.train_seconds, 1e-9)
        self.reporter.step(s.global_step, f"epoch {s.epoch + 1} loss {loss_avg:.4f} lr {lr:.2e}")
        self.reporter.event("train", step=s.global_step, epoch=round(s.global_step / self.steps_per_epoch, 4),
                            examples_seen=s.examples_seen, train_loss=loss_avg,
                            train_accuracy=None if self.cfg.task == "regression" else acc_avg, lr=lr,
                            samples_per_second=speed, micro_batches=int(micro))

    def evaluate_and_decide(self) -> int:
        s, env = self.state, self.env
        set_activity(f"evaluation at step {s.global_step}")
        lap = time.perf_counter()
        val = self.evaluate_split("val", self.cfg.eval.max_batches)
        val.pop("points", None)
        self.flush()
        s.eval_seconds += time.perf_counter() - lap
        train_loss, train_acc = mean_loss_accuracy(s.pending)
        s.pending = [0.0, 0.0, 0.0]
        metric = val[self.cfg.early_stopping.metric.removeprefix("val_")]
        decision = broadcast_decision(self.stopper.update(metric) if env.is_main else CONTINUE, env)
        s.last_eval_step = s.global_step
        if decision == NEW_BEST:
            s.best_step = s.global_step
        self.reporter.eval_point({
            "step": s.global_step, "epoch": round(s.global_step / self.steps_per_epoch, 4),
            "examples_seen": s.examples_seen, "train_loss": train_loss,
            "train_accuracy": None if self.cfg.task == "regression" else train_acc,
            "val_loss": val["loss"], "val_accuracy": val.get("accuracy"), "lr": self.engine.get_lr()[0],
            **{f"val_{key}": val[key] for key in REGRESSION_METRICS + MULTI_LABEL_METRICS if key in val},
            "decision": ("continue", "new_best", "stop")[decision],
        })
        best = " (new best)" if decision == NEW_BEST else ""
        decides = self.cfg.early_stopping.metric.removeprefix("val_")
        shown = HEADLINE[self.cfg.task] + ((decides,) if decides not in HEADLINE[self.cfg.task] + ("loss",) else ())
        scores = " ".join(f"val_{key} {val[key]:.4f}" for key in shown)
        self.reporter.say(f"eval step {s.global_step}: val_loss {val['loss']:.4f} {scores}{best}")
        if decision == STOP and env.is_main:  # the stopper's record lives on rank 0
            self.reporter.say(self.stop_reason())
        return decision

    def stop_reason(self) -> str:
        es, stopper = self.cfg.early_stopping, self.stopper
        by = f" by more than {es.min_delta:g}" if es.min_delta else ""
        return (f"early stop at step {self.state.global_step}: no improvement in {es.metric}{by} for "
                f"{_count(stopper.bad_evals, 'evaluation')} (best {stopper.best:.4f} at step {self.state.best_step})")

    def save(self, is_best: bool) -> None:
        s = self.state
        set_activity(f"checkpoint save at step {s.global_step}")
        self.flush()  # under deferred checks this verifies first: a bad update is never saved
        s.stopper = asdict(self.stopper)
        client = {"train_state": asdict(s), "world_size": self.env.world_size,
                  "labels": self.data.label_map.to_json(), "max_length": self.data.max_length,
                  "param_group_names": param_group_names(self.engine.module, self.cfg.train.decay)}
        lap = time.perf_counter()
        try:
            checkpoint.save(self.engine, self.run_dir, self.env, s.global_step, client, is_best,
                            self.cfg.checkpoint.keep_last, self.cfg.checkpoint.checksums)
        except (OSError, RuntimeError) as exc:  # disk full, quota, a size limit: the half-written one is unused
            if not isinstance(exc, OSError) and not WRITE_FAILURE.search(str(exc)):
                raise  # torch.save reports a failed write as a RuntimeError; anything else is not ours
            detail = getattr(exc, "strerror", None) or " ".join(str(exc).split())[:160]
            raise CheckpointWriteError(
                f"cannot write checkpoint {checkpoint.tag_for(s.global_step)} in {self.run_dir / 'checkpoints'} "
                f"({detail}); the last complete checkpoint is {self.last_good()}. Free some space "
                "(or lower checkpoint.keep_last), then run again with resume=auto") from None
        s.checkpoint_seconds += time.perf_counter() - lap
        self.last_saved_step = s.global_step

    # ------------------------------------------------------------ non-finite numbers

    def last_good(self) -> str:
        tag = checkpoint.read_pointer(self.run_dir, "latest")
        return f"checkpoint {self.run_dir / 'checkpoints' / tag}" if tag else "none (no checkpoint was saved yet)"

    def fix_advice(self) -> str:
        t = self.cfg.train
        if t.on_nonfinite == "skip":
            return (f"lower train.lr, check the data, or raise train.max_nonfinite_skips "
                    f"(now {t.max_nonfinite_skips})")
        return "lower train.lr, check the data, or set train.on_nonfinite=skip to drop such steps"

    def on_nonfinite_loss(self, step: int, index: int) -> None:
        """Every rank calls this for the same micro-batch (the flag was all-reduced)."""
        s = self.state
        s.nonfinite_skipped += 1
        stop = self.cfg.train.on_nonfinite == "stop" or s.nonfinite_skipped > self.cfg.train.max_nonfinite_skips
        window_start = s.batches_in_epoch % self.plan.grad_accum_steps == 0
        self.reporter.event("nonfinite", step=step, epoch=s.epoch, batch=index, what="loss",
                            skipped_so_far=s.nonfinite_skipped, action="stop" if stop else "skip")
        if not stop:
            self.guard.poisoned = True  # this window's update is dropped as a whole
            self.reporter.say(f"non-finite loss at step {step} (epoch {s.epoch + 1}, batch {index}): its "
                              f"accumulation window is dropped ({s.nonfinite_skipped} so far)")
            return
        if window_start and self.last_saved_step != s.global_step and s.global_step > 0:
            self.save(is_best=False)  # the state before this micro-batch is whole and finite
        raise NonFiniteError(
            f"non-finite loss at step {step} (epoch {s.epoch + 1}, batch {index}; {s.nonfinite_skipped} "
            f"non-finite micro-batches in this run); last good state: {self.last_good()}. {self.fix_advice()}")

    def check_update(self) -> None:
        """After an optimizer step: the guard's verdict on its gradients (the parameters are checked at the
        next sync point, before anything is logged, evaluated or saved)."""
        s, guard = self.state, self.guard
        if guard.skipped == self.guard_skipped:  # (windows dropped for a non-finite loss are counted already)
            return
        s.nonfinite_skipped += guard.skipped - self.guard_skipped
        self.guard_skipped = guard.skipped
        stop = self.cfg.train.on_nonfinite == "stop" or s.nonfinite_skipped > self.cfg.train.max_nonfinite_skips
        self.reporter.event("nonfinite", step=s.global_step, epoch=s.epoch, what="gradient",
                            skipped_so_far=s.nonfinite_skipped, action="stop" if stop else "skip")
        if stop:
            raise NonFiniteError(
                f"non-finite gradients at step {s.global_step} (the update was not applied); last good state: "
                f"{self.last_good()}. {self.fix_advice()}")

    def verify(self, nonfinite: float) -> None:
        """Deferred checks: every rank gets the same all-reduced count, before anything is saved.
        A clean count covers every update so far (an earlier non-finite number would have stopped the run)."""
        s = self.state
        if nonfinite > 0:
            s.nonfinite_skipped += int(nonfinite)
            last = s.global_step + (s.batches_in_epoch % self.plan.grad_accum_steps > 0)
            self.reporter.event("nonfinite", step=last, epoch=s.epoch, count=int(nonfinite), action="stop",
                                check="deferred")
            raise NonFiniteError(
                f"non-finite numbers (losses, gradients or parameters: {int(nonfinite)} tensor(s)) between steps "
                f"{self.checked_step + 1} and "
                f"{last} (train.nonfinite_check=deferred: found after the update); last good state: "
                f"{self.last_good()}. Lower train.lr, check the data, or use train.nonfinite_check=micro_batch "
                "with train.on_nonfinite=skip to drop such steps")
        self.checked_step = s.global_step

    # ------------------------------------------------------------ the end

    def stopped_by_signal(self) -> None:
        s, received = self.state, self.signals.received
        name = signal.Signals(received).name if received else "signal"
        self.reporter.event("preempted", step=s.global_step, epoch=s.epoch, signal=name)
        cause = ("interrupted (Ctrl-C, signal 2)" if received == signal.SIGINT else f"preempted (signal {received})"
                 if received else "preempted (a signal reached another rank)")  # the ranks agree on a flag only
        self.reporter.say(f"{cause} at step {s.global_step}: checkpoint "
                          f"{checkpoint.tag_for(s.global_step)} saved; run again with resume=auto to continue")
        return None

    def finish(self) -> dict[str, Any]:
        env, run_dir = self.env, self.run_dir
        lap = time.perf_counter()
        best_tag = broadcast_object(best_valid_tag(run_dir) if env.is_main else None, env)
        if best_tag is not None:
            with logs.captured_output("deepspeed.checkpoint"):  # ZeRO-3 consolidation prints as it goes
                checkpoint.load(self.engine, run_dir, env, best_tag, weights_only=True)
        if self.thresholds is not None and self.cfg.eval.tune_thresholds:  # on the best model's validation outputs
            self.thresholds = tune_thresholds(*self.evaluate_split("val")["points"])
        results = {split: self.evaluate_split(split) for split in self.data.splits()}  # no test split: none
        points = {split: r.pop("points", None) for split, r in results.items()}  # regression: for the scatter plot
        self.phases["final_eval_seconds"] = time.perf_counter() - lap
        lap = time.perf_counter()
        exported = env.is_main and self.cfg.checkpoint.export and best_tag is not None
        if exported:
            with logs.captured_output("deepspeed.checkpoint"):  # the ZeRO consolidation's prints
                export_checkpoint(self.cfg, run_dir, best_tag, self.data.label_map.to_json(), self.data.max_length,
                                  self.data.scale, self.thresholds)
        self.phases["export_seconds"] = time.perf_counter() - lap
        summary = self.summary(results, best_tag)
        scatter = points.get("test") if self.cfg.task == "regression" else None
        self.reporter.finish(summary, plots=self.cfg.report.plots, points=scatter)
        self.reporter.say(self.outcome(best_tag, exported))
        if exported and "hf" in self.cfg.checkpoint.export_formats:
            for note in export_notes(self.cfg.data.long_texts):
                self.reporter.say(note)
        key = HEADLINE[self.cfg.task][0]
        test = f"test {key} {summary['test'][key]:.4f}, " if "test" in summary else "no test split, "
        self.reporter.say(
            f"done: {test}val {summary['val'][key]:.4f}, "
            f"best step {self.state.best_step}, {summary['wall_seconds']:.1f} s -> {run_dir}")
        return summary

    def outcome(self, best_tag: str | None, exported: bool) -> str:
        """How the run ended and where its model is."""
        s, total = self.state, self.total_steps
        ended = f"stopped early at step {s.global_step} of {total}" if s.stopped_early else f"ran all {total} steps"
        if best_tag is None:
            return f"{ended}; no checkpoint was saved"
        where = f"{ended}; best checkpoint: {self.run_dir / 'checkpoints' / best_tag}"
        if exported:
            folders = (self.run_dir / EXPORT_SUBDIRS[f] for f in self.cfg.checkpoint.export_formats)
            return f"{where}; exported model: {', '.join(map(str, folders))}"
        return f"{where}; not exported (checkpoint.export=false)"

    def evaluate_split(self, split: str, max_batches: int | None = None) -> dict[str, Any]:
        """Every rank calls it: the split's metrics for the run's task ("points" only where a caller needs them)."""
        return evaluate(self.engine, getattr(self.data, split), self.cfg, self.env, self.collate, max_batches,
                        scale=self.data.scale, thresholds=self.thresholds, label_names=self.data.label_map.to_json())

    def split_result(self, r: dict[str, Any], labels: list) -> dict[str, Any]:
        """A split's entry of summary.json: regression metrics as evaluated, or the classification scores."""
        if self.cfg.task != "single_label":
            return r
        return {"accuracy": r["accuracy"], "loss": r["loss"], "examples": r["examples"],
                **from_confusion(r["confusion_matrix"]).to_dict(labels)}

    def summary(self, results: dict[str, dict[str, Any]], best_tag: str | None) -> dict[str, Any]:
        s, cfg, labels = self.state, self.cfg, self.data.label_map.to_json()
        seconds = max(s.train_seconds, 1e-9)
        return {
            **{split: self.split_result(r, labels) for split, r in results.items()},
            "best_step": s.best_step,
            "global_step": s.global_step,
            "epochs_completed": _whole(s.global_step / self.steps_per_epoch),
            "stopped_early": s.stopped_early,
            "world_size": self.env.world_size,
            "zero_stage": cfg.zero.stage,
            "precision": self.precision,
            "wall_seconds": round(time.perf_counter() - self.wall_start, 3),
            "train_seconds": round(s.train_seconds, 3),
            "samples_per_second": s.examples_seen / seconds,
            "tokens_per_second": s.tokens_seen / seconds,
            "peak_memory_bytes": peak_memory_bytes(self.env.device),
            # Where the wall time went (this launch; a resumed run's loop figures include earlier launches).
            "timings": _round({**self.phases, "loop_train_seconds": s.train_seconds,
                               "loop_eval_seconds": s.eval_seconds, "checkpoint_seconds": s.checkpoint_seconds}),
            "nonfinite_skipped": s.nonfinite_skipped,
            "overflow_steps": s.overflow_steps,
            "trainable_parameters": self.trainable,
            "total_parameters": self.total_params,
            "labels": labels,
            "best_checkpoint": best_tag,
            "max_length": self.data.max_length,
            "class_weights": class_weights(cfg.loss.class_weights, self.data.train.labels, labels,
                                           cfg.task == "multi_label"),
            **({"thresholds": self.thresholds} if self.thresholds is not None else {}),
            **({"windows": windows} if (windows := self.data.windows()) is not None else {}),  # long_texts=chunk
        }


def _round(timings: dict[str, float | None]) -> dict[str, float | None]:
    return {k: None if v is None else round(v, 3) for k, v in timings.items()}


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _whole(x: float) -> float | int:
    return int(x) if float(x).is_integer() else round(x, 4)
