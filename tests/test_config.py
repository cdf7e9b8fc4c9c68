"""The run config: YAML + dotted overrides -> one typed, validated, frozen Config; every error message."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from dist_finetune.config import (
    MODEL_PRESETS,
    Config,
    ConfigError,
    from_dict,
    load_config,
    merge_override,
    parse_override,
    replace,
    to_dict,
    to_yaml,
)

REPO = Path(__file__).parents[1]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
TINY_MODEL = {"name": "custom", "n_layer": 2, "n_head": 4, "n_embd": 64, "context_length": 64}
TINY_OVERRIDES = [f"model.{k}={v}" for k, v in TINY_MODEL.items()]


def write_yaml(tmp_path: Path, data: dict[str, Any], name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def error_of(raw: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        from_dict(raw)
    return str(info.value)


def override_error(*overrides: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    return str(info.value)


# ---------------------------------------------------------------- YAML + overrides


def test_defaults_without_a_file() -> None:
    cfg = load_config()
    assert cfg == Config()
    assert cfg.model.name == "gpt2" and cfg.model.arch() == MODEL_PRESETS["gpt2"]
    assert cfg.train.betas == (0.9, 0.999)


def test_yaml_file_is_read(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, {"seed": 7, "model": TINY_MODEL, "train": {"lr": 3.0e-4, "epochs": 2}})
    cfg = load_config(path)
    assert cfg.seed == 7
    assert cfg.train.lr == pytest.approx(3e-4) and cfg.train.epochs == 2
    assert cfg.model.arch() == {k: v for k, v in TINY_MODEL.items() if k != "name"}


def test_overrides_apply_on_top_of_the_yaml(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, {"model": TINY_MODEL, "train": {"lr": 3.0e-4}})
    cfg = load_config(path, ["train.lr=1e-4", "model.trainable=last_2_blocks"])
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.model.trainable == "last_2_blocks"
    assert cfg.model.n_layer == 2  # untouched keys keep the file's values


def test_later_override_wins() -> None:
    assert load_config(None, ["seed=1", "seed=2"]).seed == 2


@pytest.mark.parametrize(("text", "expected"), [("true", True), ("false", False), ("yes", True), ("no", False), ("'0'", False)])
def test_bool_overrides(text: str, expected: bool) -> None:
    assert load_config(None, [f"report.plots={text}"]).report.plots is expected


def test_bool_rejects_other_words() -> None:
    assert override_error("report.plots=maybe") == "report.plots: expected true or false, got 'maybe'"


@pytest.mark.parametrize("text", ["null", "none", "None"])
def test_null_clears_an_optional_int(tmp_path: Path, text: str) -> None:
    path = write_yaml(tmp_path, {"data": {"max_length": 100}, "train": {"max_steps": 5}})
    cfg = load_config(path, [f"data.max_length={text}", f"train.max_steps={text}"])
    assert cfg.data.max_length is None and cfg.train.max_steps is None


def test_null_for_a_required_key_fails() -> None:
    assert override_error("seed=null") == "seed: a value is required here, got null"


def test_betas_as_a_list() -> None:
    cfg = load_config(None, ["train.betas=[0.8, 0.95]"])
    assert cfg.train.betas == (0.8, 0.95)
    assert isinstance(cfg.train.betas, tuple)


def test_betas_wrong_length_and_type() -> None:
    assert override_error("train.betas=[0.9]") == "train.betas: expected 2 values, got [0.9]"
    assert override_error("train.betas=0.9") == "train.betas: expected a list, got 0.9"
    assert override_error("train.betas=[0.9, x]") == "train.betas[1]: expected a number, got 'x'"


def test_deepspeed_section_takes_free_form_keys() -> None:
    cfg = load_config(None, ["deepspeed.steps_per_print=5", "deepspeed.zero_optimization.reduce_bucket_size=1000"])
    assert cfg.deepspeed == {"steps_per_print": 5, "zero_optimization": {"reduce_bucket_size": 1000}}


def test_override_needs_an_equals_sign() -> None:
    assert "expected key.sub=value" in override_error("train.lr")


def test_override_with_an_empty_key_part() -> None:
    assert "empty key part in 'train..lr'" in override_error("train..lr=1")


def test_override_into_a_scalar_is_refused() -> None:
    assert override_error("train.lr=1e-4", "train.lr.x=1") == "override train.lr.x: 'train.lr' is not a section"
    assert override_error("train.lr.x=1") == "train.lr: expected a number, got {'x': 1}"


def test_parse_override_reads_yaml_scalars() -> None:
    assert parse_override("train.warmup_steps=3") == (["train", "warmup_steps"], 3)
    assert parse_override("output_dir=runs/a=b") == (["output_dir"], "runs/a=b")
    assert parse_override("resume=") == (["resume"], "")


def test_merge_override_creates_missing_sections() -> None:
    raw: dict[str, Any] = {"seed": 1}
    merge_override(raw, ["train", "lr"], 0.1)
    assert raw == {"seed": 1, "train": {"lr": 0.1}}


def test_replace_revalidates() -> None:
    cfg = load_config(None, TINY_OVERRIDES)
    assert replace(cfg, ["train.lr=0.01"]).train.lr == pytest.approx(0.01)
    with pytest.raises(ConfigError, match="model.n_layer"):
        replace(cfg, ["model.trainable=last_3_blocks"])


# ---------------------------------------------------------------- type coercion


def test_int_from_a_cli_string() -> None:
    cfg = from_dict({"train": {"epochs": "3", "micro_batch_size": "16"}, "zero": {"stage": "2"}})
    assert cfg.train.epochs == 3 and isinstance(cfg.train.epochs, int)
    assert cfg.zero.stage == 2 and isinstance(cfg.zero.stage, int)


def test_int_from_a_whole_float() -> None:
    cfg = from_dict({"train": {"epochs": 3.0}})
    assert cfg.train.epochs == 3 and isinstance(cfg.train.epochs, int)


@pytest.mark.parametrize("value", [1.5, "1.5", "three", True, [3]])
def test_int_rejects_non_integers(value: Any) -> None:
    assert error_of({"train": {"epochs": value}}) == f"train.epochs: expected an integer, got {value!r}"


def test_float_from_strings_pyyaml_leaves_alone() -> None:
    # PyYAML (YAML 1.1) reads `1e-4` without a dot as a string; the config still takes it as a number.
    assert yaml.safe_load("1e-4") == "1e-4"
    assert from_dict({"train": {"lr": "1e-4"}}).train.lr == pytest.approx(1e-4)


@pytest.mark.parametrize("value", ["fast", True])
def test_float_rejects_non_numbers(value: Any) -> None:
    assert error_of({"train": {"lr": value}}) == f"train.lr: expected a number, got {value!r}"


def test_string_rejects_mappings() -> None:
    assert error_of({"output_dir": {"a": 1}}) == "output_dir: expected a string, got {'a': 1}"


def test_section_must_be_a_mapping() -> None:
    assert error_of({"train": 5}) == "train: expected a mapping of keys, got 5"


def test_deepspeed_must_be_a_mapping() -> None:
    assert error_of({"deepspeed": [1]}) == "deepspeed: expected a mapping, got [1]"


def test_large_int_keeps_every_digit() -> None:
    assert from_dict({"zero": {"reduce_bucket_size": 1234567890123456789}}).zero.reduce_bucket_size == 1234567890123456789


# ---------------------------------------------------------------- unknown keys


def test_unknown_nested_key_names_the_path_and_the_nearest_key() -> None:
    message = override_error("train.lrr=1e-4")
    assert message.startswith("unknown config key 'train.lrr'. Did you mean 'train.lr'?")
    assert "Valid keys here: betas, compile, compile_mode, decay, epochs," in message


def test_unknown_top_level_key() -> None:
    message = error_of({"outptu_dir": "runs/x"})
    assert message.startswith("unknown config key 'outptu_dir'. Did you mean 'output_dir'?")
    assert "deepspeed" in message and "zero" in message


def test_unknown_key_in_a_section_from_yaml(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, {"model": {"poolng": "mean"}})
    with pytest.raises(ConfigError, match=r"unknown config key 'model.poolng'\. Did you mean 'model.pooling'\?"):
        load_config(path)


def test_unknown_key_far_from_anything_has_no_suggestion() -> None:
    message = error_of({"zero": {"xyzzy": 1}})
    assert message.startswith("unknown config key 'zero.xyzzy'. Valid keys here: ")
    assert "Did you mean" not in message


def test_unknown_section_under_a_section() -> None:
    assert override_error("model.arch.n_layer=2").startswith("unknown config key 'model.arch'.")


# ---------------------------------------------------------------- choices


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.padding=left", "data.padding: 'left' is not allowed; choose one of: fixed | longest | none"),
        ("model.pooling=max", "model.pooling: 'max' is not allowed; choose one of: last | last_token | first | mean"),
        ("zero.stage=4", "zero.stage: 4 is not allowed; choose one of: 0 | 1 | 2 | 3"),
        ("precision=fp8", "precision: 'fp8' is not allowed; choose one of: bf16 | bf16_autocast | fp16 | fp32"),
        ("train.schedule=step", "train.schedule: 'step' is not allowed; choose one of: constant | linear | cosine"),
        ("model.name=gpt3", "model.name: 'gpt3' is not allowed; choose one of: custom | gpt2 | gpt2-medium | "
                            "gpt2-large | gpt2-xl | auto | smollm2-135m | smollm2-360m | llama-3.2-1b | "
                            "llama-3.2-3b | qwen3-0.6b | qwen3-1.7b"),
    ],
)
def test_bad_choice_lists_the_allowed_values(override: str, message: str) -> None:
    assert override_error(override) == message


@pytest.mark.parametrize("policy", ["blocks", "last_blocks", "last_2_block", "head_only"])
def test_bad_trainable_policy(policy: str) -> None:
    assert override_error(f"model.trainable={policy}") == (
        f"model.trainable: {policy!r} is not allowed; choose one of: "
        "all | last_block | last_N_blocks (e.g. last_2_blocks) | head | last_layer | lora"
    )


@pytest.mark.parametrize("policy", ["all", "last_block", "head", "last_1_blocks", "last_12_blocks"])
def test_good_trainable_policies(policy: str) -> None:
    assert load_config(None, [f"model.trainable={policy}"]).model.trainable == policy


# ---------------------------------------------------------------- model and data consistency


def test_custom_model_names_the_missing_arch_keys() -> None:
    assert override_error("model.name=custom", "model.n_layer=2") == (
        "model.name is 'custom': set model.n_head, model.n_embd, model.context_length"
    )


def test_preset_contradiction() -> None:
    assert override_error("model.name=gpt2-medium", "model.n_layer=12") == (
        "model.n_layer: 12 contradicts model.name='gpt2-medium' (n_layer=24); remove it or use model.name=custom"
    )


def test_preset_with_its_own_values_is_fine() -> None:
    assert load_config(None, ["model.name=gpt2-xl", "model.n_head=25"]).model.arch()["n_head"] == 25


def test_n_embd_divisible_by_n_head() -> None:
    assert override_error(*TINY_OVERRIDES, "model.n_head=3") == (
        "model.n_embd (64) must be divisible by model.n_head (3)"
    )


def test_arch_keys_must_be_positive() -> None:
    assert override_error(*TINY_OVERRIDES, "model.n_head=0") == "model.n_head: must be >= 1, got 0"


def test_last_n_blocks_over_n_layer() -> None:
    assert override_error(*TINY_OVERRIDES, "model.trainable=last_3_blocks") == (
        "model.trainable: 'last_3_blocks' asks for 3 blocks but the model has 2 (model.n_layer)"
    )


def test_last_zero_blocks() -> None:
    assert "asks for 0 blocks" in override_error("model.trainable=last_0_blocks")


@pytest.mark.parametrize("given, fractions", [
    (["train_file"], (0.8, 0.1, 0.1)),
    (["train_file", "split=[0.7, 0.1, 0.2]"], (0.7, 0.1, 0.2)),
    (["train_file", "split=[0.75, 0.25]"], (0.75, 0.25)),
    (["train_file", "test_file"], (0.9, 0.1)),
    (["train_file", "test_file", "split=[0.8, 0.2]"], (0.8, 0.2)),
    (["train_file", "val_file"], None),
    (["train_file", "val_file", "test_file"], None),
])
def test_what_data_train_file_is_split_into(given: list[str], fractions) -> None:
    cfg = load_config(None, [f"data.{key}" if "=" in key else f"data.{key}=x.csv" for key in given])
    assert cfg.data.split_fractions() == fractions
    assert from_dict(yaml.safe_load(to_yaml(cfg))) == cfg  # as config.yaml in the run folder reads back


def test_data_split_as_written_in_yaml(tmp_path) -> None:
    (tmp_path / "c.yaml").write_text("data:\n  train_file: mine.csv\n  split: [0.7, 0.1, 0.2]\n")
    cfg = load_config(tmp_path / "c.yaml")
    assert cfg.data.split == (0.7, 0.1, 0.2) and "split:\n  - 0.7\n  - 0.1\n  - 0.2" in to_yaml(cfg)


@pytest.mark.parametrize("overrides, parts", [
    (["data.val_file=v.csv"], ["data.val_file set without data.train_file", "set data.train_file too"]),
    (["data.val_file=v.csv", "data.test_file=t.csv"], ["data.val_file and data.test_file set without"]),
    (["data.split=[0.7, 0.1, 0.2]"], ["data.split", "data.train_file, which is not set", "remove data.split"]),
    (["data.train_file=a.csv", "data.val_file=v.csv", "data.test_file=t.csv", "data.split=[0.8, 0.2]"],
     ["data.split: [0.8, 0.2] has nothing to split", "data.val_file is given (and data.test_file)",
      "remove data.split"]),
    (["data.train_file=a.csv", "data.val_file=v.csv", "data.split=[0.8, 0.2]"],
     ["data.split", "nothing to split", "remove data.split, or remove data.val_file"]),
    (["data.train_file=a.csv", "data.test_file=t.csv", "data.split=[0.7, 0.1, 0.2]"],
     ["data.split", "three fractions but data.test_file is given", "give two fractions"]),
    (["data.train_file=a.csv", "data.split=[0.7, 0.2, 0.2]"], ["data.split", "sums to 1.1, not 1", "add up to 1"]),
    (["data.train_file=a.csv", "data.split=[1.0, 0.0]"], ["data.split", "between 0 and 1", "two fractions"]),
    (["data.train_file=a.csv", "data.split=[0.5, 0.2, 0.2, 0.1]"], ["data.split", "[train, val, test]"]),
    (["data.train_file=a.csv", "data.split=0.1"], ["data.split: 0.1 is not allowed", "[train, val]"]),
    (["data.train_file=a.csv", "data.split=[0.9, x]"], ["data.split[1]: expected a number"]),
    (["data.split_seed=-1"], ["data.split_seed", "0..4294967295"]),
])
def test_bad_data_split_settings(overrides: list[str], parts: list[str]) -> None:
    message = override_error(*overrides)
    for part in parts:
        assert part in message, (part, message)


def test_all_three_data_files() -> None:
    cfg = load_config(None, ["data.train_file=a.csv", "data.val_file=b.csv", "data.test_file=c.csv"])
    assert (cfg.data.train_file, cfg.data.val_file, cfg.data.test_file) == ("a.csv", "b.csv", "c.csv")


def test_max_length_over_the_context() -> None:
    assert override_error(*TINY_OVERRIDES, "data.max_length=65") == (
        "data.max_length: 65 must be between 1 and the model's context length (64)"
    )
    assert load_config(None, [*TINY_OVERRIDES, "data.max_length=64"]).data.max_length == 64


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lr=0", "train.lr: must be in (0, 10] (AdamW's step overflows far beyond), got 0.0"),
        ("train.epochs=0", "train.epochs: must be >= 1, got 0"),
        ("train.min_lr_ratio=1.5", "train.min_lr_ratio: must be in [0, 1], got 1.5"),
        ("model.dropout=1.0", "model.dropout: must be in [0, 1), got 1.0"),
        ("early_stopping.patience=0", "early_stopping.patience: must be >= 1, got 0"),
        ("output_dir=", "output_dir: must not be empty"),
    ],
)
def test_range_checks(override: str, message: str) -> None:
    assert override_error(override) == message


def test_eval_max_batches_must_be_positive() -> None:
    assert override_error("eval.max_batches=0") == "eval.max_batches: must be >= 1, got 0"


# ---------------------------------------------------------------- frozen, round trips


def test_config_is_frozen() -> None:
    cfg = load_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.lr = 1.0  # type: ignore[misc]


def test_dict_round_trip() -> None:
    cfg = load_config(QUICKSTART, ["train.betas=[0.8, 0.95]", "deepspeed.steps_per_print=3", "data.max_length=50"])
    assert from_dict(to_dict(cfg)) == cfg


def test_to_dict_is_plain_yaml() -> None:
    raw = to_dict(load_config())
    assert raw["train"]["betas"] == [0.9, 0.999]
    assert yaml.safe_load(yaml.safe_dump(raw)) == raw


def test_yaml_round_trip(tmp_path: Path) -> None:
    cfg = load_config(QUICKSTART, ["train.lr=1e-4", "zero.stage=2"])
    path = tmp_path / "resolved.yaml"
    path.write_text(to_yaml(cfg), encoding="utf-8")
    assert load_config(path) == cfg


def test_print_config_reads_back(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "dist_finetune.train", "--config", "configs/quickstart.yaml", "--print-config",
         "train.lr=2e-4"],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stderr
    path = tmp_path / "printed.yaml"
    path.write_text(result.stdout, encoding="utf-8")
    assert load_config(path) == load_config(QUICKSTART, ["train.lr=2e-4"])


def test_cli_reports_a_config_error(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "dist_finetune.train", "--config", "configs/quickstart.yaml", "--print-config",
         "train.lrr=1"],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 2
    assert "Did you mean 'train.lr'" in result.stderr
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------- files


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_invalid_yaml(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("train: [1, 2\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(path)


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="the top level must be a mapping"):
        load_config(path)


def test_empty_file_is_all_defaults(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing\n", encoding="utf-8")
    assert load_config(path) == Config()


SHIPPED = sorted((REPO / "configs").rglob("*.yaml"))


def test_configs_are_shipped() -> None:
    assert QUICKSTART in SHIPPED


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_config_loads(path: Path) -> None:
    cfg = load_config(path)
    assert from_dict(to_dict(cfg)) == cfg


def test_bare_on_off_from_yaml_is_taken_as_meant(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("report:\n  progress_bar: off\n", encoding="utf-8")
    assert load_config(path).report.progress_bar == "off"
    assert load_config(None, ["report.progress_bar=on"]).report.progress_bar == "on"
