"""Run configuration: a YAML file plus `key.sub=value` overrides -> one frozen, validated `Config`.

Every setting has exactly one home here. Unknown keys and bad values fail at once with the key's
full path, the value, and what is allowed (or the nearest valid key).
"""
from __future__ import annotations

import dataclasses
import difflib
import io
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from .encoding import MIN_PAIR_LENGTH
from .errors import UserError


class ConfigError(UserError, ValueError):
    """A user error in the run configuration; the message names the key and the fix."""


def _choices(*values: str, default: str) -> Any:
    return field(default=default, metadata={"choices": values})


def _path(default: str | None) -> Any:
    """A file or folder setting: a leading `~` is the user's home (from the YAML file and overrides)."""
    return field(default=default, metadata={"path": True})


SEED_MAX = 2**32 - 1  # numpy's seed range
TIMEOUT_MAX_SECONDS = 7 * 24 * 3600.0


MODEL_PRESETS: dict[str, dict[str, int]] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, context_length=1024),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024, context_length=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280, context_length=1024),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600, context_length=1024),
}
# Llama 3.x / SmolLM2 / Qwen3 (decoder.py): the architecture keys of each published config.json, read by
# DecoderConfig.from_hf; the weights and the tokenizer come from model.weights (a folder or the hub cache).
_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
_SMOLLM2 = dict(model_type="llama", vocab_size=49152, max_position_embeddings=8192, rms_norm_eps=1e-5,
                rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)
_LLAMA_3_2 = dict(model_type="llama", vocab_size=128256, max_position_embeddings=131072,
                  rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE, tie_word_embeddings=True,
                  bos_token_id=128000, eos_token_id=128001)
_QWEN3 = dict(model_type="qwen3", vocab_size=151936, head_dim=128, max_position_embeddings=40960, rms_norm_eps=1e-6,
              rope_theta=1000000.0, tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645)
DECODER_PRESETS: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(_SMOLLM2, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3),
    "smollm2-360m": dict(_SMOLLM2, hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                         num_attention_heads=15, num_key_value_heads=5),
    "llama-3.2-1b": dict(_LLAMA_3_2, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64),
    "llama-3.2-3b": dict(_LLAMA_3_2, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                         num_attention_heads=24, num_key_value_heads=8, head_dim=128),
    "qwen3-0.6b": dict(_QWEN3, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8),
    "qwen3-1.7b": dict(_QWEN3, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8),
}
# The architecture read from model.weights' config.json (a Llama / Qwen3 checkpoint folder).
AUTO_MODEL = "auto"
DECODER_NAMES = (AUTO_MODEL, *DECODER_PRESETS)
TRAINABLE_PATTERN = re.compile(r"^(all|last_block|head|last_layer|lora|last_(\d+)_blocks)$")
TRAINABLE_CHOICES = "all | last_block | last_N_blocks (e.g. last_2_blocks) | head | last_layer | lora"


@dataclass(frozen=True)
class Trainable:
    """`model.trainable` parsed once: which blocks train (besides the head), and whether adapters do."""

    blocks: int | None  # the last N transformer blocks (+ final norm); None: every parameter
    lora: bool = False

    @classmethod
    def parse(cls, text: str) -> "Trainable":
        m = TRAINABLE_PATTERN.match(text)
        if m is None:
            raise ConfigError(f"model.trainable: {text!r} is not allowed; choose one of: {TRAINABLE_CHOICES}")
        if text == "all":
            return cls(None)
        if text in ("head", "last_layer", "lora"):
            return cls(0, lora=text == "lora")
        blocks = 1 if text == "last_block" else int(m.group(2))
        if blocks == 0:
            raise ConfigError(f"model.trainable: {text!r} asks for 0 blocks; use head for the head alone")
        return cls(blocks)

    def block_count(self, n_layer: int) -> int:
        return n_layer if self.blocks is None else self.blocks
LORA_TARGETS = ("attn", "mlp", "head", "q", "k", "v", "o", "gate", "up", "down")  # see lora.TARGET_LAYERS


def _split_fractions(path: str, value: Any) -> tuple[float, ...] | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null")):
        return None
    if isinstance(value, (list, tuple)) and len(value) in (2, 3):
        fractions = tuple(_coerce(f"{path}[{i}]", float, v) for i, v in enumerate(value))
        _check(all(0 < f < 1 for f in fractions),
               f"{path}: {list(value)!r}: each fraction must be between 0 and 1 (exclusive); drop a split you do "
               "not want (two fractions [train, val]: no test split)")
        _check(abs(sum(fractions) - 1) <= 1e-6,
               f"{path}: {list(value)!r} sums to {sum(fractions):g}, not 1; give fractions that add up to 1, "
               "e.g. [0.8, 0.1, 0.1]")
        return fractions
    raise ConfigError(
        f"{path}: {value!r} is not allowed; give [train, val, test] fractions of data.train_file (e.g. "
        "[0.8, 0.1, 0.1]) or [train, val] (no test split, e.g. [0.9, 0.1]), or null for the defaults"
    )


SPLIT_DEFAULT = (0.8, 0.1, 0.1)  # data.train_file alone: train / val / test
SPLIT_DEFAULT_VAL = (0.9, 0.1)  # data.train_file and data.test_file: train / val


def _label_columns(path: str, value: Any) -> str | tuple[str, ...]:
    if isinstance(value, (list, tuple)):
        if value and all(isinstance(v, str) and v for v in value) and len(set(value)) == len(value):
            return value[0] if len(value) == 1 else tuple(value)
        raise ConfigError(f"{path}: {value!r} is not a list of distinct column names")
    if isinstance(value, (dict, bool)) or value is None or value == "":
        raise ConfigError(f"{path}: expected a column name (or, for task=regression, a list of them), got {value!r}")
    return str(value)


@dataclass(frozen=True)
class DataConfig:
    # None for all three files: the bundled SMS Spam Collection (balanced, split 70/10/20).
    # train_file alone: split into train / val / test by data.split; train_file + test_file: val is split
    # off train_file; train_file + val_file: no test split; all three: each split its own file.
    train_file: str | None = _path(None)
    val_file: str | None = _path(None)
    test_file: str | None = _path(None)
    # A folder written by datasets' save_to_disk (instead of the three files): splits train, validation
    # (or val / valid / dev) and test by name; a single Dataset, or no validation split: split by data.split.
    dataset_dir: str | None = _path(None)
    # Fractions of data.train_file: [train, val, test], or [train, val] (no test split, or the test split
    # from data.test_file). Unset: [0.8, 0.1, 0.1] for train_file alone, [0.9, 0.1] with a test_file.
    # Stratified by label, seeded by split_seed, written to RUN/data_split.json (evaluate reuses it).
    split: tuple[float, ...] | None = field(default=None, metadata={"coerce": _split_fractions})
    # Which rows go where; apart from `seed`, so a sweep over seeds keeps the same val and test rows.
    split_seed: int = 123
    text_column: str = "text"
    # The label column; with task=regression, the column of the numeric target, or a list of target columns.
    label_column: str | tuple[str, ...] = field(default="label", metadata={"coerce": _label_columns})
    # task=multi_label: what joins a text's labels in a label cell (a JSONL cell may be a list instead)
    label_separator: str = "|"
    # Text pairs (premise / hypothesis, question / passage): the column of each row's second text; the model
    # reads text + a blank line + pair, cut longest-first to max_length (encoding.py).
    text_pair_column: str | None = None
    # None: the longest training example, capped at the model's context length.
    max_length: int | None = None
    # A text longer than max_length: truncate (its first tokens), head_tail (its first head_tokens and its
    # last max_length - head_tokens tokens) or chunk (all of it, in overlapping windows of max_length tokens);
    # the same in evaluation and prediction (encoding.py).
    long_texts: str = _choices("truncate", "head_tail", "chunk", default="truncate")
    # head_tail: tokens kept from the start (None: a quarter of max_length).
    head_tokens: int | None = None
    # chunk: tokens between the starts of consecutive windows (None: three quarters of max_length), and how a
    # text's windows make one prediction: the mean of their logits, or their maximum.
    chunk_stride: int | None = None
    chunk_aggregate: str = _choices("mean", "max", default="mean")
    # fixed: every batch to max_length (null: the longest training example; the context length for
    # "the full context"); longest: to the longest example of each batch; none: no padding at all,
    # one example per micro-batch (needs train.micro_batch_size=1; eval also runs one example at a time).
    padding: str = _choices("fixed", "longest", "none", default="fixed")
    num_workers: int = 0
    # undersample: every label of the training split down to the rarest label's count (the bundled SMS
    # set: the chapter's balanced split; user files: the train split only). none: keep every row.
    # auto: undersample the bundled set (the chapter's split), keep every row of user files.
    balance: str = _choices("auto", "undersample", "none", default="auto")
    # Training batches of similar lengths (with padding=longest: far fewer padded tokens). Seeded and
    # sharded by rank like the plain sampler; the order of the batches is still shuffled.
    group_by_length: bool = False
    # Page-locked host batches and non-blocking copies to the GPU (ignored on a CPU).
    pin_memory: bool = True
    # false: a label cell spelled NA / NaN / None / null / N/A ... (what pandas reads as missing) is
    # refused with its file and row; true: those spellings are ordinary labels.
    na_labels: bool = False

    def split_fractions(self) -> tuple[float, ...] | None:
        """The fractions data.train_file is split into (train, val[, test]); None: nothing is split."""
        if self.train_file is None or self.val_file is not None:
            return None
        if self.split is not None:
            return self.split
        return SPLIT_DEFAULT_VAL if self.test_file is not None else SPLIT_DEFAULT


@dataclass(frozen=True)
class ModelConfig:
    # A GPT-2 preset, custom, a Llama / Qwen3 preset, or auto (the architecture in model.weights' config.json).
    name: str = _choices("custom", *MODEL_PRESETS, *DECODER_NAMES, default="gpt2")
    # For `custom`: required. For a preset: leave unset (or equal to the preset).
    n_layer: int | None = None
    n_head: int | None = None
    n_embd: int | None = None
    context_length: int | None = None
    vocab_size: int = 50257
    dropout: float = 0.0
    qkv_bias: bool = True
    # A folder, a file, a hub id such as `gpt2`, or `none` for random initialisation.
    weights: str = _path("none")
    download: bool = False
    # auto: load a classifier head from model.weights when it has one (it must fit the classes);
    # new: always start a fresh head.
    head: str = _choices("auto", "new", default="auto")
    # last: the last position (padding included, as in the chapter); last_token: the last non-padding
    # token; first: position 0; mean: the mean over the real tokens.
    pooling: str = _choices("last", "last_token", "first", "mean", default="last")
    # all | last_block | last_N_blocks | head | last_layer (= head) | lora (adapters + head; see `lora`)
    trainable: str = "last_block"
    # false: every token attends to every real (non-padding) token of its text.
    causal_mask: bool = True
    # One matmul for Q, K and V (false: three, from slices of the same weight; the weights are the same).
    fused_qkv: bool = True
    # The fused attention kernel F.scaled_dot_product_attention may use; auto: PyTorch picks
    # (flash or memory-efficient on a GPU: causal attention over right padding needs no mask).
    attention_backend: str = _choices("auto", "flash", "efficient", "cudnn", "math", default="auto")
    # A new classifier head's init. gpt2: normal(0, 0.02), zero bias (as every other Linear here);
    # torch: nn.Linear's own default (uniform +-1/sqrt(n_embd)), as the chapter's new out_head.
    head_init: str = _choices("gpt2", "torch", default="gpt2")
    # The classifier head's bias. false: logits = W·h alone, as transformers' *ForSequenceClassification score
    # layer; a Llama / Qwen3 run exported with checkpoint.export_formats: [hf] needs it (their final RMSNorm has no
    # bias to fold a head bias into, as GPT-2's LayerNorm has).
    head_bias: bool = True

    @property
    def is_decoder(self) -> bool:
        """A Llama / Qwen3 model (decoder.py) rather than GPT-2."""
        return self.name in DECODER_NAMES

    def arch(self) -> dict[str, int] | None:
        """n_layer/n_head/n_embd/context_length, from the preset or the custom keys; None for auto (the
        architecture is in model.weights' config.json: families.backbone_config reads it)."""
        keys = ("n_layer", "n_head", "n_embd", "context_length")
        if self.name == "custom":
            return {k: getattr(self, k) for k in keys}
        if self.name == AUTO_MODEL:
            return None
        if self.name in DECODER_PRESETS:
            hf = DECODER_PRESETS[self.name]
            return dict(n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"], n_embd=hf["hidden_size"],
                        context_length=hf["max_position_embeddings"])
        return dict(MODEL_PRESETS[self.name])


def _lora_targets(path: str, value: Any) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if isinstance(items, (list, tuple)) and items and all(v in LORA_TARGETS for v in items):
        return tuple(dict.fromkeys(items))
    raise ConfigError(f"{path}: {value!r} is not allowed; choose a non-empty list of: {' | '.join(LORA_TARGETS)} "
                      "(e.g. [attn, mlp])")


@dataclass(frozen=True)
class LoraConfig:
    """Used when model.trainable=lora: low-rank adapters on frozen linear layers."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    # attn: qkv + attention output projection; mlp: fc + proj; head: the classifier head (its base
    # weights then stay frozen too; without `head` the head trains fully).
    targets: tuple[str, ...] = field(default=("attn",), metadata={"coerce": _lora_targets})
    # merge: the export holds plain weights (W + alpha/rank x B A), loadable without LoRA;
    # separate: the export keeps base weights and adapters apart (load_export rebuilds them).
    export: str = _choices("merge", "separate", default="merge")
    # alpha_over_rank: the adapter adds alpha/rank x B(A(x)) (Hu et al.; PEFT): the update's size does
    # not grow with the rank. alpha: alpha x B(A(x)), the chapter's LoRALayer.
    scaling: str = _choices("alpha_over_rank", "alpha", default="alpha_over_rank")
    # The fan-in of A's kaiming_uniform(a=sqrt(5)) init. in_features: nn.Linear's default (PEFT);
    # rank: the chapter's, whose A is an (in, rank) Parameter, so torch takes rank as the fan-in
    # (A's entries ~ U(+-1/sqrt(rank)), far larger than U(+-1/sqrt(in_features))).
    a_init: str = _choices("in_features", "rank", default="in_features")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 5
    micro_batch_size: int = 8
    # Set either grad_accum_steps, or global_batch_size (accumulation is then derived), or both
    # (then micro x accum x world must equal global).
    grad_accum_steps: int | None = None
    global_batch_size: int | None = None
    lr: float = 5e-5
    weight_decay: float = 0.1
    warmup_steps: int = 0
    schedule: str = _choices("constant", "linear", "cosine", default="constant")
    min_lr_ratio: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    # Clip the global gradient norm to this (0: no clipping, as in the chapter).
    grad_clip: float = 1.0
    # Stop after this many optimizer steps (None: run all epochs).
    max_steps: int | None = None
    log_every_steps: int = 10
    # A non-finite loss on any rank: skip that micro-batch on every rank (counted), or save and stop.
    on_nonfinite: str = _choices("skip", "stop", default="skip")
    # More skipped micro-batches than this in one run stops it as `stop` would.
    max_nonfinite_skips: int = 20
    # micro_batch: every micro-batch's loss is checked (and agreed across ranks) before its backward:
    # a host synchronisation per micro-batch. deferred: checked on the device and read with the logged
    # losses (every log_every_steps, evaluation and checkpoint); a non-finite loss then stops the run
    # before any checkpoint holds its update (skipping is only possible with micro_batch).
    nonfinite_check: str = _choices("micro_batch", "deferred", default="micro_batch")
    # Every N optimizer steps the ranks agree on a preemption signal (and, with deferred checks, on
    # non-finite losses): one host synchronisation each time.
    sync_every_steps: int = 1
    # auto: torch's fused AdamW on a GPU (no build step), torch's foreach AdamW on a CPU,
    # DeepSpeed's CPU Adam with zero.offload_optimizer. deepspeed_fused: DeepSpeed's FusedAdam
    # (compiled on first use).
    optimizer: str = _choices("auto", "torch_fused", "torch_foreach", "deepspeed_fused", default="auto")
    # torch.compile the model inside the DeepSpeed engine (the first steps pay the compilation).
    compile: bool = False
    compile_mode: str = _choices("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs",
                                 default="default")
    # Which trainable parameters AdamW decays by train.weight_decay. linear_weights: the weight
    # matrices of Linear layers (not biases, norms, embeddings: the usual GPT recipe); all: every
    # trainable parameter (the chapter's AdamW(model.parameters(), weight_decay=0.1)).
    decay: str = _choices("linear_weights", "all", default="linear_weights")


def _class_weights(path: str, value: Any) -> str | tuple[float, ...]:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null")):
        return "none"
    if isinstance(value, str) and value.strip() == "balanced":
        return "balanced"
    if isinstance(value, (list, tuple)) and value:
        weights = tuple(_coerce(f"{path}[{i}]", float, v) for i, v in enumerate(value))
        if all(math.isfinite(w) and w > 0 for w in weights):
            return weights
    raise ConfigError(
        f"{path}: {value!r} is not allowed; choose none | balanced | a list of positive weights, one per class "
        "in label order (e.g. [1.0, 6.5])"
    )


@dataclass(frozen=True)
class LossConfig:
    # none | balanced (n_examples / (n_classes x count of the class), from the training split) |
    # [w0, w1, ...], one weight per class in label order. The length is checked against the data.
    class_weights: str | tuple[float, ...] = field(default="none", metadata={"coerce": _class_weights})
    # task=regression: mse, or huber (less pulled by outliers), on standardized targets
    regression: str = _choices("mse", "huber", default="mse")


@dataclass(frozen=True)
class EvalConfig:
    # Evaluate every N optimizer steps (None: only at each epoch end).
    every_steps: int | None = None
    batch_size: int | None = None  # None: 2 x micro_batch_size
    # Cap evaluation batches during training (None: the whole validation split).
    max_batches: int | None = None
    # task=multi_label: a label is predicted when its probability reaches the threshold; tune_thresholds: each
    # label's own threshold, the best-F1 one on the validation split at the end of training (saved with the export)
    threshold: float = 0.5
    tune_thresholds: bool = False


TASK_METRICS = {  # what early_stopping.metric may name, besides val_loss, per task
    "single_label": ("val_accuracy",),
    "multi_label": ("val_micro_f1", "val_macro_f1", "val_subset_accuracy", "val_hamming_loss"),
    "regression": ("val_mse", "val_rmse", "val_mae", "val_r2", "val_pearson", "val_spearman"),
}


@dataclass(frozen=True)
class EarlyStoppingConfig:
    enabled: bool = True
    # val_loss; val_accuracy (single_label); val_micro_f1, val_macro_f1, val_subset_accuracy, val_hamming_loss
    # (multi_label); val_mse, val_rmse, val_mae, val_r2, val_pearson, val_spearman (regression)
    metric: str = _choices(*("val_loss",) + TASK_METRICS["single_label"] + TASK_METRICS["multi_label"]
                           + TASK_METRICS["regression"], default="val_loss")
    mode: str = _choices("auto", "min", "max", default="auto")
    patience: int = 3
    min_delta: float = 0.0

    def resolved_mode(self) -> str:
        if self.mode != "auto":
            return self.mode
        return "min" if self.metric in ("val_loss", "val_mse", "val_rmse", "val_mae", "val_hamming_loss") else "max"


EXPORT_FORMATS = ("native", "hf", "onnx")


def _export_formats(path: str, value: Any) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if isinstance(items, (list, tuple)) and items and all(v in EXPORT_FORMATS for v in items):
        return tuple(dict.fromkeys(items))
    raise ConfigError(f"{path}: {value!r} is not allowed; choose a non-empty list of: {' | '.join(EXPORT_FORMATS)} "
                      "(e.g. [native, hf])")


@dataclass(frozen=True)
class CheckpointConfig:
    # Save every N optimizer steps (None: only at each new best and at the end).
    every_steps: int | None = None
    keep_last: int = 2
    export: bool = True
    # What the end-of-run export writes: native -> RUN/export (predict, Classifier), hf -> RUN/export_hf
    # (a transformers GPT2ForSequenceClassification folder; needs model.pooling=last_token), onnx -> RUN/export_onnx
    # (model.onnx for onnxruntime; needs the onnx extra).
    export_formats: tuple[str, ...] = field(default=("native",), metadata={"coerce": _export_formats})
    # SHA-256 of every checkpoint file in its manifest (sizes only when false: faster for huge models).
    checksums: bool = True


@dataclass(frozen=True)
class ZeroConfig:
    stage: int = _choices(0, 1, 2, 3, default=0)  # type: ignore[arg-type]
    offload_optimizer: bool = False
    overlap_comm: bool = False
    contiguous_gradients: bool = True
    # Elements per gradient-reduction / parameter-gather bucket (None: DeepSpeed's default, 5e8).
    reduce_bucket_size: int | None = None
    allgather_bucket_size: int | None = None


@dataclass(frozen=True)
class DistributedConfig:
    timeout_seconds: float = 1800.0
    # Force CPU + gloo even where CUDA exists (the laptop / single-GPU-machine debug mode).
    debug: bool = False


def _on_off(path: str, value: Any) -> str:
    """YAML reads a bare on / off as true / false: take those as meant."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return _coerce(path, str, value)


TRACKERS = ("tensorboard", "mlflow", "wandb")


def _trackers(path: str, value: Any) -> tuple[str, ...]:
    items = [] if value is None else [value] if isinstance(value, str) else value
    if isinstance(items, (list, tuple)) and all(v in TRACKERS for v in items):
        return tuple(dict.fromkeys(items))
    raise ConfigError(f"{path}: {value!r} is not allowed; choose a list of: {' | '.join(TRACKERS)} "
                      "(e.g. [mlflow], or [] for none)")


@dataclass(frozen=True)
class ReportConfig:
    # Experiment trackers fed by rank 0 (optional extras): tensorboard -> RUN/tensorboard; mlflow ->
    # MLFLOW_TRACKING_URI or RUN/mlruns; wandb -> offline files in RUN/wandb unless WANDB_MODE is set.
    trackers: tuple[str, ...] = field(default=(), metadata={"coerce": _trackers})
    # The MLflow experiment / W&B project (None: MLFLOW_EXPERIMENT_NAME / WANDB_PROJECT, else dist_finetune).
    experiment: str | None = None
    # The tracker run's name (None: the run folder's name).
    run_name: str | None = None
    tensorboard: bool = False  # the same as listing tensorboard in report.trackers
    progress_bar: str = field(default="auto", metadata={"choices": ("auto", "on", "off"), "coerce": _on_off})
    plots: bool = True
    # Every rank writes the dataset indices of each training batch to samples/rank{R}.jsonl.
    sample_log: bool = False

    @property
    def tracker_names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.trackers + (("tensorboard",) if self.tensorboard else ())))


@dataclass(frozen=True)
class Config:
    output_dir: str = _path("runs/default")
    seed: int = 123
    # single_label: one class per text (softmax, cross-entropy); multi_label: zero or more labels per text
    # (sigmoid per label, binary cross-entropy: multilabel.py); regression: numeric targets (regression.py)
    task: str = _choices("single_label", "multi_label", "regression", default="single_label")
    # bf16: DeepSpeed's bf16 (bf16 weights, fp32 master copy in the optimizer); bf16_autocast: fp32
    # weights, forward under torch.autocast(bf16) (DeepSpeed's torch_autocast); fp16: loss-scaled fp16.
    precision: str = _choices("bf16", "bf16_autocast", "fp16", "fp32", default="bf16")
    # none | auto | a checkpoint folder
    resume: str = _path("none")
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    # Expert DeepSpeed settings merged into the generated DeepSpeed config (validated there).
    deepspeed: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- reading YAML


@dataclass(frozen=True)
class _Scalar:
    """A plain YAML scalar read as a bool / int / float, with its text: a string key takes the text
    verbatim (`output_dir: yes` is the folder `yes`, `007` stays `007`), every other key the value."""

    value: Any
    text: str


class _UniqueKeyLoader(yaml.SafeLoader):
    """Safe loading; a key given twice in one mapping is an error naming both lines."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = _plain(self.construct_object(key_node, deep=True))
            line = key_node.start_mark.line + 1
            if isinstance(key, typing.Hashable) and key in seen:
                raise ConfigError(f"{key_node.start_mark.name}: key {key!r} is given twice (lines {seen[key]} "
                                  f"and {line}); keep one")
            seen[key] = line
        return {_plain(k): v for k, v in super().construct_mapping(node, deep=deep).items()}


class _TextKeepingLoader(_UniqueKeyLoader):
    """The loader of config files and overrides: plain bool / int / float scalars keep their text."""


def _keep_text(construct: typing.Callable) -> typing.Callable:
    def construct_keeping_text(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> Any:
        value = construct(loader, node)
        return _Scalar(value, node.value) if node.style is None else value
    return construct_keeping_text


for _tag, _construct in (("bool", yaml.SafeLoader.construct_yaml_bool), ("int", yaml.SafeLoader.construct_yaml_int),
                         ("float", yaml.SafeLoader.construct_yaml_float)):
    _TextKeepingLoader.add_constructor(f"tag:yaml.org,2002:{_tag}", _keep_text(_construct))


def _plain(value: Any) -> Any:
    """The value with every `_Scalar` replaced by what YAML made of it."""
    if isinstance(value, _Scalar):
        return value.value
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def safe_load_unique(text: str, name: str = "<string>") -> Any:
    """yaml.safe_load that refuses a key given twice in one mapping (ConfigError with both lines)."""
    return _plain(_load(text, name, _UniqueKeyLoader))


def _load(text: str, name: str, loader: type) -> Any:
    stream = io.StringIO(text)
    stream.name = name  # type: ignore[attr-defined]  # yaml's marks (and so our messages) name it
    return yaml.load(stream, Loader=loader)  # noqa: S506 - both loaders are SafeLoader subclasses


# ---------------------------------------------------------------- building from dicts


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(path: str, tp: Any, value: Any) -> Any:
    inner, optional = _unwrap_optional(tp)
    if inner is str and isinstance(value, _Scalar):
        value = value.text
    elif not dataclasses.is_dataclass(inner):
        value = _plain(value)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise ConfigError(f"{path}: a value is required here, got null")
    origin = typing.get_origin(inner)
    if inner is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{path}: expected true or false, got {value!r}")
    if inner is int:
        return _as_int(path, value)
    if inner is float:
        if isinstance(value, bool):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{path}: expected a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ConfigError(f"{path}: must be a finite number, got {value!r}")
        return number
    if inner is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return str(value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        args = typing.get_args(inner)
        if len(args) != len(value):
            raise ConfigError(f"{path}: expected {len(args)} values, got {list(value)!r}")
        return tuple(_coerce(f"{path}[{i}]", a, v) for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(inner):
        return _build(inner, value, path)
    raise ConfigError(f"{path}: unsupported type {inner!r}")  # pragma: no cover


INT_LIMIT = 2**63  # every integer setting must fit in 64 bits (torch tensors, DeepSpeed's JSON)


def _as_int(path: str, value: Any) -> int:
    number = _int_of(path, value)
    if not -INT_LIMIT < number < INT_LIMIT:
        raise ConfigError(f"{path}: {number} is out of range (at most {INT_LIMIT - 1} in size)")
    return number


def _int_of(path: str, value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    if isinstance(value, (str, float)) and not isinstance(value, bool):
        try:
            as_float = float(value)
        except ValueError:
            as_float = float("nan")
        if as_float.is_integer():
            return int(as_float)
    raise ConfigError(f"{path}: expected an integer, got {value!r}")


def _build(cls: type, raw: Any, prefix: str = "") -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of keys, got {_plain(raw)!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            near = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            hint = f" Did you mean '{prefix + '.' if prefix else ''}{near[0]}'?" if near else ""
            raise ConfigError(
                f"unknown config key '{path}'.{hint} Valid keys here: {', '.join(sorted(fields))}"
            )
        meta = fields[key].metadata
        value = meta["coerce"](path, _plain(value)) if "coerce" in meta else _coerce(path, hints[key], value)
        if meta.get("path") and isinstance(value, str):
            value = os.path.expanduser(value)
        choices = meta.get("choices")
        if choices is not None and value not in choices:
            allowed = " | ".join(str(c) for c in choices)
            raise ConfigError(f"{path}: {value!r} is not allowed; choose one of: {allowed}")
        kwargs[key] = value
    return cls(**kwargs)


# ---------------------------------------------------------------- validation


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _validate(cfg: Config) -> None:
    _validate_model(cfg.model)
    _validate_data(cfg)
    _validate_train(cfg.train)
    _validate_rest(cfg)
    if cfg.model.is_decoder:
        _validate_decoder_run(cfg)
    decoder_groups = [t for t in cfg.lora.targets if t not in ("attn", "mlp", "head")]
    _check(cfg.model.is_decoder or cfg.model.trainable != "lora" or not decoder_groups,
           f"lora.targets: {', '.join(decoder_groups)} name Llama / Qwen3 layers; GPT-2 (model.name={cfg.model.name}) "
           "has attn, mlp, head")


def _validate_decoder_run(cfg: Config) -> None:
    """What is GPT-2 only so far, refused by key for the Llama / Qwen3 families."""
    family = f"model.name={cfg.model.name} (a Llama / Qwen3 decoder)"
    _check(not (cfg.checkpoint.export and "hf" in cfg.checkpoint.export_formats and cfg.model.head_bias),
           f"checkpoint.export_formats: hf: {family} with a head bias, which transformers' score layer lacks and "
           "the final RMSNorm cannot absorb; set model.head_bias: false (or remove hf: native and onnx export it)")
    _check(not (cfg.checkpoint.export and "hf" in cfg.checkpoint.export_formats and cfg.task == "regression"),
           f"checkpoint.export_formats: hf: {family} with task=regression: the targets' mean would need a head "
           "bias; remove hf (native and onnx export it)")


def _validate_decoder(m: ModelConfig) -> None:
    """Llama / Qwen3: the architecture is the checkpoint's, the GPT-2-only keys are refused by name."""
    family = f"model.name={m.name} (a Llama / Qwen3 decoder)"
    _check(m.weights.lower() != "none", f"model.weights: {family} reads its tokenizer (and, for auto, its "
                                        "architecture) from the checkpoint: set model.weights to its folder or hub id")
    given = [f"model.{k}" for k in ("n_layer", "n_head", "n_embd", "context_length") if getattr(m, k) is not None]
    _check(not given, f"{', '.join(given)}: {family} takes its architecture from config.json; remove them")
    _check(m.causal_mask, f"model.causal_mask: false is GPT-2 only; {family} is causal (remove the key)")
    _check(m.qkv_bias, f"model.qkv_bias: GPT-2 only; {family} takes attention biases from config.json "
                       "(attention_bias): remove the key")
    _check(m.dropout == 0.0, f"model.dropout: GPT-2 only; {family} uses config.json's attention_dropout: remove "
                             "the key")
    _check(m.vocab_size == 50257, f"model.vocab_size: GPT-2 only; {family} takes it from config.json: remove "
                                  "the key")


def _validate_model(m: ModelConfig) -> None:
    trainable = Trainable.parse(m.trainable)
    arch_keys = ("n_layer", "n_head", "n_embd", "context_length")
    if m.is_decoder:
        _validate_decoder(m)
        arch = m.arch()
        if trainable.blocks and arch is not None:  # auto: checked when the model is built
            _check(trainable.blocks <= arch["n_layer"],
                   f"model.trainable: {m.trainable!r} asks for {trainable.blocks} blocks but {m.name} has "
                   f"{arch['n_layer']}")
        return
    if m.name == "custom":
        missing = [f"model.{k}" for k in arch_keys if getattr(m, k) is None]
        _check(not missing, f"model.name is 'custom': set {', '.join(missing)}")
    else:
        preset = MODEL_PRESETS[m.name]
        for k in arch_keys:
            v = getattr(m, k)
            _check(v is None or v == preset[k],
                   f"model.{k}: {v} contradicts model.name={m.name!r} ({k}={preset[k]}); "
                   "remove it or use model.name=custom")
    arch = m.arch()
    for k in arch_keys:
        _check(arch[k] >= 1, f"model.{k}: must be >= 1, got {arch[k]}")
    _check(arch["n_embd"] % arch["n_head"] == 0,
           f"model.n_embd ({arch['n_embd']}) must be divisible by model.n_head ({arch['n_head']})")
    if trainable.blocks:
        _check(trainable.blocks <= arch["n_layer"],
               f"model.trainable: {m.trainable!r} asks for {trainable.blocks} blocks but the model has "
               f"{arch['n_layer']} (model.n_layer)")
    _check(0.0 <= m.dropout < 1.0, f"model.dropout: must be in [0, 1), got {m.dropout}")
    _check(m.vocab_size >= 50257, f"model.vocab_size: must be >= 50257 (GPT-2 BPE), got {m.vocab_size}")


def _validate_task(cfg: Config) -> None:
    d, regression = cfg.data, cfg.task == "regression"
    _check(regression or isinstance(d.label_column, str),
           f"data.label_column: a list of columns ({list(d.label_column)}) is for task=regression (several numeric "
           "targets); give one column, or set task: regression")
    allowed = ("val_loss",) + TASK_METRICS[cfg.task]
    _check(cfg.early_stopping.metric in allowed,
           f"early_stopping.metric: {cfg.early_stopping.metric} is not a metric of task={cfg.task}; use one of "
           f"{' | '.join(allowed)}")
    _check(0.0 < cfg.eval.threshold < 1.0, f"eval.threshold: must be between 0 and 1 (a probability), got "
                                          f"{cfg.eval.threshold}")
    _check(cfg.task == "multi_label" or (cfg.eval.threshold == 0.5 and not cfg.eval.tune_thresholds),
           f"eval.threshold / eval.tune_thresholds: only task=multi_label decides labels by thresholds (task is "
           f"{cfg.task}); remove them")
    if cfg.task == "multi_label":
        _check(d.label_separator.strip() != "",
               f"data.label_separator: {d.label_separator!r} cannot join labels; use a visible character such as |")
        _check(d.train_file is not None or d.dataset_dir is not None,
               "task=multi_label: the bundled SMS Spam Collection has one label per text; set data.train_file (or "
               "data.dataset_dir) to your own data")
        _check(d.balance != "undersample", "data.balance=undersample balances single labels; with "
                                           "task=multi_label use auto or none (or loss.class_weights: balanced)")
    if regression:
        _check(d.train_file is not None or d.dataset_dir is not None,
               "task=regression: the bundled SMS Spam Collection has no numeric target; set data.train_file (or "
               "data.dataset_dir) to your own data")
        _check(cfg.loss.class_weights == "none", "loss.class_weights: class weights are for classification; "
                                                  "remove them with task=regression")
        _check(d.balance != "undersample", "data.balance=undersample balances classes; with task=regression use "
                                           "auto or none")


def _validate_data(cfg: Config) -> None:
    d, t, arch = cfg.data, cfg.train, cfg.model.arch()
    _validate_split(d)
    _validate_task(cfg)
    if d.max_length is not None and arch is not None:  # auto: data.load_data checks it against config.json
        _check(1 <= d.max_length <= arch["context_length"],
               f"data.max_length: {d.max_length} must be between 1 and the model's context length "
               f"({arch['context_length']})")
    if d.text_pair_column is not None:
        _check(d.train_file is not None or d.dataset_dir is not None,
               "data.text_pair_column: the bundled SMS Spam Collection has no text pairs; set data.train_file (or "
               "data.dataset_dir) to your own data, or remove data.text_pair_column")
        _check(d.text_pair_column not in (d.text_column, d.label_column),
               f"data.text_pair_column: {d.text_pair_column!r} is also data.text_column or data.label_column; name "
               "the column that holds each row's second text")
        _check(d.head_tokens is None, "data.head_tokens: with text pairs each text keeps a quarter of its own share "
                                      "at the head; remove data.head_tokens")
        _check(d.max_length is None or d.max_length >= MIN_PAIR_LENGTH,
               f"data.max_length: {d.max_length} leaves no room for a text pair (a token of each text and the "
               f"separator); give at least {MIN_PAIR_LENGTH}")
    if d.long_texts == "chunk":
        _check(d.text_pair_column is None, "data.long_texts=chunk: windows of text pairs are not supported; use "
                                           "truncate or head_tail with data.text_pair_column")
    if d.chunk_stride is not None:
        _check(d.long_texts == "chunk", f"data.chunk_stride: only used with data.long_texts=chunk (now "
                                        f"{d.long_texts}); set that, or remove data.chunk_stride")
        _check(d.chunk_stride >= 1 and (d.max_length is None or d.chunk_stride <= d.max_length),
               f"data.chunk_stride: {d.chunk_stride} must be at least 1 and at most data.max_length "
               f"({d.max_length}), or windows would skip tokens")
    if d.head_tokens is not None:
        _check(d.long_texts == "head_tail", f"data.head_tokens: only used with data.long_texts=head_tail (now "
                                            f"{d.long_texts}); set that, or remove data.head_tokens")
        _check(d.head_tokens >= 1 and (d.max_length is None or d.head_tokens < d.max_length),
               f"data.head_tokens: {d.head_tokens} must be at least 1 and below data.max_length "
               f"({d.max_length}), so that the tail keeps some tokens")
    if d.padding == "none":
        _check(t.micro_batch_size == 1 and cfg.eval.batch_size in (None, 1),
               f"data.padding=none trains and evaluates one example per micro-batch: set "
               f"train.micro_batch_size=1 (got {t.micro_batch_size}) and leave eval.batch_size unset or 1 "
               "(use train.grad_accum_steps for a larger batch)")
    _check(not (d.padding == "longest" and cfg.model.pooling == "last"),
           "model.pooling=last with data.padding=longest pools a padding position, whose state depends on "
           "which texts share the batch (results change with batch size and world size): use "
           "model.pooling=last_token (the last real token), or data.padding=fixed as in the chapter")
    lo = cfg.lora
    _check(lo.rank >= 1, f"lora.rank: must be >= 1, got {lo.rank}")
    _check(lo.alpha > 0, f"lora.alpha: must be > 0, got {lo.alpha}")
    _check(0.0 <= lo.dropout < 1.0, f"lora.dropout: must be in [0, 1), got {lo.dropout}")
    _check(d.num_workers >= 0, f"data.num_workers: must be >= 0, got {d.num_workers}")


def _validate_split(d: DataConfig) -> None:
    _check(0 <= d.split_seed <= SEED_MAX,
           f"data.split_seed: must be in 0..{SEED_MAX} (numpy's seed range), got {d.split_seed}")
    if d.dataset_dir is not None:
        given = [f"data.{k}" for k in ("train_file", "val_file", "test_file") if getattr(d, k) is not None]
        _check(not given, f"data.dataset_dir and {' and '.join(given)} are both set: the splits come from the "
                          "folder or from files, not both; remove one of them")
        return
    if d.train_file is None:
        given = [f"data.{k}" for k in ("val_file", "test_file") if getattr(d, k) is not None]
        _check(not given, f"{' and '.join(given)} set without data.train_file: set data.train_file too (alone it "
                          "is split by data.split), or none of the three for the bundled SMS Spam Collection")
        _check(d.split is None, f"data.split: {list(d.split or ())} splits data.train_file, which is not set; set "
                                "data.train_file, or remove data.split (the bundled SMS Spam Collection has its "
                                "fixed 70/10/20 split)")
        return
    if d.split is None:
        return
    split = list(d.split)
    _check(d.val_file is None,
           f"data.split: {split} has nothing to split: data.val_file is given"
           f"{' (and data.test_file)' if d.test_file else ''}; remove data.split, or remove data.val_file to "
           "split the validation rows off data.train_file")
    _check(d.test_file is None or len(split) == 2,
           f"data.split: {split} has three fractions but data.test_file is given, so data.train_file is split "
           "into [train, val] only: give two fractions (e.g. [0.9, 0.1]), or remove data.test_file")


def _validate_train(t: TrainConfig) -> None:
    _check(t.epochs >= 1, f"train.epochs: must be >= 1, got {t.epochs}")
    _check(t.micro_batch_size >= 1, f"train.micro_batch_size: must be >= 1, got {t.micro_batch_size}")
    _check(t.grad_accum_steps is None or t.grad_accum_steps >= 1,
           f"train.grad_accum_steps: must be >= 1, got {t.grad_accum_steps}")
    _check(t.global_batch_size is None or t.global_batch_size >= 1,
           f"train.global_batch_size: must be >= 1, got {t.global_batch_size}")
    _check(0 < t.lr <= 10, f"train.lr: must be in (0, 10] (AdamW's step overflows far beyond), got {t.lr}")
    _check(t.weight_decay >= 0, f"train.weight_decay: must be >= 0, got {t.weight_decay}")
    _check(t.warmup_steps >= 0, f"train.warmup_steps: must be >= 0, got {t.warmup_steps}")
    _check(0 <= t.min_lr_ratio <= 1, f"train.min_lr_ratio: must be in [0, 1], got {t.min_lr_ratio}")
    _check(t.grad_clip >= 0, f"train.grad_clip: must be >= 0 (0 disables), got {t.grad_clip}")
    _check(t.max_steps is None or t.max_steps >= 1, f"train.max_steps: must be >= 1, got {t.max_steps}")
    _check(t.log_every_steps >= 1, f"train.log_every_steps: must be >= 1, got {t.log_every_steps}")
    _check(t.nonfinite_check == "micro_batch" or t.on_nonfinite == "stop",
           "train.nonfinite_check=deferred finds a non-finite loss after its update, so it cannot skip that "
           "micro-batch: set train.on_nonfinite=stop, or train.nonfinite_check=micro_batch to skip")
    _check(t.sync_every_steps >= 1, f"train.sync_every_steps: must be >= 1, got {t.sync_every_steps}")
    _check(t.max_nonfinite_skips >= 0, f"train.max_nonfinite_skips: must be >= 0, got {t.max_nonfinite_skips}")
    _check(all(0 <= b < 1 for b in t.betas), f"train.betas: each must be in [0, 1), got {list(t.betas)}")
    _check(t.eps >= 0, f"train.eps: must be >= 0, got {t.eps}")


def _validate_rest(cfg: Config) -> None:
    _check(0 <= cfg.seed <= SEED_MAX, f"seed: must be in 0..{SEED_MAX} (numpy's seed range), got {cfg.seed}")
    for key in ("reduce_bucket_size", "allgather_bucket_size"):
        size = getattr(cfg.zero, key)
        _check(size is None or size >= 1, f"zero.{key}: must be >= 1 (elements), got {size}")
    _check(cfg.eval.every_steps is None or cfg.eval.every_steps >= 1,
           f"eval.every_steps: must be >= 1, got {cfg.eval.every_steps}")
    _check(cfg.eval.max_batches is None or cfg.eval.max_batches >= 1,
           f"eval.max_batches: must be >= 1, got {cfg.eval.max_batches}")
    _check(cfg.eval.batch_size is None or cfg.eval.batch_size >= 1,
           f"eval.batch_size: must be >= 1, got {cfg.eval.batch_size}")
    _check(cfg.early_stopping.patience >= 1,
           f"early_stopping.patience: must be >= 1, got {cfg.early_stopping.patience}")
    _check(cfg.early_stopping.min_delta >= 0,
           f"early_stopping.min_delta: must be >= 0, got {cfg.early_stopping.min_delta}")
    _check(cfg.checkpoint.every_steps is None or cfg.checkpoint.every_steps >= 1,
           f"checkpoint.every_steps: must be >= 1, got {cfg.checkpoint.every_steps}")
    if cfg.checkpoint.export and "hf" in cfg.checkpoint.export_formats:
        from .hf_export import unsupported

        reason = unsupported(cfg.model.pooling, cfg.model.causal_mask, cfg.data.text_pair_column)
        _check(reason is None, f"checkpoint.export_formats: hf: {reason}, or remove hf from "
                                  "checkpoint.export_formats")
    if cfg.checkpoint.export and "onnx" in cfg.checkpoint.export_formats:
        from .onnx_export import check_installed

        check_installed("checkpoint.export_formats: onnx")
    _check(cfg.checkpoint.keep_last >= 1, f"checkpoint.keep_last: must be >= 1, got {cfg.checkpoint.keep_last}")
    _check(0 < cfg.distributed.timeout_seconds <= TIMEOUT_MAX_SECONDS,
           f"distributed.timeout_seconds: must be > 0 and at most {TIMEOUT_MAX_SECONDS:.0f} (7 days), "
           f"got {cfg.distributed.timeout_seconds}")
    _check(bool(cfg.output_dir), "output_dir: must not be empty")


# ---------------------------------------------------------------- public API


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=1e-4` -> (['train', 'lr'], 0.0001). Values are read as YAML scalars."""
    parts, value = _parse_override(text)
    return parts, _plain(value)


def _parse_override(text: str) -> tuple[list[str], Any]:
    """As parse_override, with the text of plain scalars kept for string keys (`output_dir=yes`)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key.sub=value (e.g. train.lr=1e-4)")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r}: empty key part in {key!r}")
    try:
        value = _load(raw, f"override {key}", _TextKeepingLoader) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def merge_override(raw: dict, parts: list[str], value: Any) -> None:
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            section = ".".join(parts[: i + 1])
            raise ConfigError(f"override {'.'.join(parts)}: '{section}' is not a section")
        node = child
    node[parts[-1]] = value


def read_yaml(path: str | Path) -> dict:
    """A config file as plain YAML values (a key given twice is refused)."""
    return _plain(_read_tree(path))


def _read_tree(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        raw = _load(path.read_text(encoding="utf-8"), str(path), _TextKeepingLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path}: the top level must be a mapping of keys")
    return raw


def _default_pooling(raw: dict) -> dict:
    """model.pooling defaults to last_token for the Llama / Qwen3 families: they are causal, so the last real
    token is the only one that has read the whole text (and padding is on the right)."""
    model = raw.get("model")
    if isinstance(model, dict) and model.get("name") in DECODER_NAMES and "pooling" not in model:
        return {**raw, "model": {**model, "pooling": "last_token"}}
    return raw


def from_dict(raw: dict) -> Config:
    cfg = _build(Config, _default_pooling(raw))
    _validate(cfg)
    return cfg


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    raw = _read_tree(path) if path is not None else {}
    for text in overrides:
        merge_override(raw, *_parse_override(text))
    return from_dict(raw)


def to_dict(cfg: Any) -> dict:
    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return list(v)
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return {k: plain(v) for k, v in dataclasses.asdict(cfg).items()}


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def replace(cfg: Config, overrides: typing.Sequence[str]) -> Config:
    """A copy of `cfg` with dotted overrides applied and re-validated."""
    raw = to_dict(cfg)
    for text in overrides:
        merge_override(raw, *_parse_override(text))
    return from_dict(raw)
