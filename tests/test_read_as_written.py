"""Data and config are read exactly as the user wrote them: labels are the text in the file, a column or
a YAML key given twice is refused, string settings keep their text, paths expand `~`, numbers are finite
and in range. Each error is one `error:` line and exit code 2 from the real command."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from dist_finetune.config import SEED_MAX, ConfigError, load_config, read_yaml, safe_load_unique
from dist_finetune.data import DataError, LabelMap, load_data, load_eval_file, read_table
from dist_finetune.config import DataConfig
from runner import child_env, write_config

GOOD_CSV = "text,label\nwin a prize now,spam\nsee you at lunch,ham\ncall me later,ham\nfree money,spam\n"


def write(directory: Path, name: str, content: str) -> Path:
    path = directory / name
    path.write_text(content, encoding="utf-8")
    return path


def files_cfg(tmp_path: Path, train: tuple[str, str] = ("train.csv", GOOD_CSV), val: tuple[str, str] = ("val.csv", GOOD_CSV),
              test: tuple[str, str] = ("test.csv", GOOD_CSV), **keys) -> DataConfig:
    paths = {split: str(write(tmp_path, *spec)) for split, spec in (("train", train), ("val", val), ("test", test))}
    return DataConfig(train_file=paths["train"], val_file=paths["val"], test_file=paths["test"], **keys)


def data_error(tmp_path: Path, **files_and_keys) -> str:
    with pytest.raises(DataError) as info:
        load_data(files_cfg(tmp_path, **files_and_keys), context_length=1024)
    return str(info.value)


def run_train(tmp_path: Path, config: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dist_finetune.train", "--config", str(config), *overrides],
                          cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=300, check=False)


def assert_one_error_line(result: subprocess.CompletedProcess, *parts: str) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if re.match(r"error\b", line)]
    assert len(errors) == 1, result.stderr[-3000:]
    for part in parts:
        assert part in errors[0], errors[0]
    return errors[0]


# ---------------------------------------------------------------- labels as written


@pytest.mark.parametrize("spelling", ["NA", "NaN", "None", "null", "N/A", "nan"])
def test_na_label_is_refused_by_default_naming_file_row_line_and_fix(tmp_path: Path, spelling: str) -> None:
    train = f"text,label\nwin a prize,spam\nhello there,{spelling}\nsee you,ham\n"
    message = data_error(tmp_path, train=("train.csv", train))
    assert "train.csv, row 2 (line 3), column 'label'" in message
    assert repr(spelling) in message and "data.na_labels=true" in message


def test_na_labels_true_keeps_them_as_labels(tmp_path: Path) -> None:
    csv = "text,label\nwin a prize,spam\nhello there,NA\nsee you,None\n"
    bundle = load_data(files_cfg(tmp_path, train=("t.csv", csv), val=("v.csv", csv), test=("s.csv", csv),
                                 na_labels=True), context_length=1024)
    assert bundle.label_map.labels == ("NA", "None", "spam")


def test_empty_label_is_refused_even_with_na_labels(tmp_path: Path) -> None:
    message = data_error(tmp_path, train=("train.csv", "text,label\nwin,spam\nhi,\n"), na_labels=True)
    assert "train.csv, row 2 (line 3), column 'label': the label is missing" in message


def test_seven_and_007_are_two_labels(tmp_path: Path) -> None:
    csv = "text,label\na,7\nb,007\nc,10\nd,2\n"
    bundle = load_data(files_cfg(tmp_path, train=("t.csv", csv), val=("v.csv", csv), test=("s.csv", csv),
                                 balance="none"), context_length=1024)
    assert bundle.label_map.labels == ("2", "007", "7", "10")
    assert bundle.train.labels == [2, 1, 3, 0]


def test_jsonl_numbers_stay_numbers_and_a_mix_with_strings_is_refused(tmp_path: Path) -> None:
    ints = '{"text": "a", "label": 7}\n{"text": "b", "label": 1}\n'
    bundle = load_data(files_cfg(tmp_path, train=("t.jsonl", ints), val=("v.jsonl", ints), test=("s.jsonl", ints)),
                       context_length=1024)
    assert bundle.label_map.labels == (1, 7)
    mixed = '{"text": "a", "label": 7}\n{"text": "b", "label": "7"}\n'
    message = data_error(tmp_path, train=("m.jsonl", mixed))
    assert "m.jsonl, row 2 (line 2), column 'label'" in message and "only integers or only strings" in message


def test_labels_differing_in_case_or_spaces_are_an_error_naming_both(tmp_path: Path) -> None:
    train = "text,label\nwin,spam\nhi,ham\nfree money,Spam \n"
    message = data_error(tmp_path, train=("train.csv", train))
    assert "'spam' (" in message and "train.csv, row 1 (line 2)" in message
    assert "'Spam ' (" in message and "train.csv, row 3 (line 4)" in message
    across = data_error(tmp_path, train=("train.csv", GOOD_CSV), test=("test.csv", "text,label\nx,SPAM\n"))
    assert "'spam'" in across and "'SPAM'" in across and "test.csv, row 1 (line 2)" in across


def test_row_line_counts_quoted_newlines(tmp_path: Path) -> None:
    train = 'text,label\n"two\nlines",spam\nhi,NA\n'
    assert "train.csv, row 2 (line 4)" in data_error(tmp_path, train=("train.csv", train))


def test_eval_file_matches_exact_spellings_of_the_run_labels(tmp_path: Path) -> None:
    ints = LabelMap((0, 1))
    dataset, _ = load_eval_file(write(tmp_path, "e.csv", "text,label\na,1\nb,0\n"), "text", "label", ints, 16)
    assert dataset.labels == [1, 0]
    with pytest.raises(DataError, match=r"label '01' does not occur"):
        load_eval_file(write(tmp_path, "f.csv", "text,label\na,01\n"), "text", "label", ints, 16)
    with_na = LabelMap(("NA", "spam"))
    dataset, _ = load_eval_file(write(tmp_path, "g.csv", "text,label\na,NA\n"), "text", "label", with_na, 16)
    assert dataset.labels == [0]


# ---------------------------------------------------------------- a name given twice


def test_csv_with_a_repeated_column_is_refused(tmp_path: Path) -> None:
    message = data_error(tmp_path, train=("train.csv", "text,label,text\na,spam,b\nc,ham,d\n"))
    assert "train.csv" in message and "column 'text' twice" in message


def test_tsv_with_a_repeated_label_column_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="column 'label' twice"):
        read_table(write(tmp_path, "d.tsv", "label\ttext\tlabel\nham\thi\tspam\n"), "text", "label")


def test_jsonl_with_a_repeated_key_is_refused(tmp_path: Path) -> None:
    jsonl = '{"text": "a", "label": "ham"}\n{"text": "b", "label": "ham", "label": "spam"}\n'
    message = data_error(tmp_path, train=("train.jsonl", jsonl))
    assert "train.jsonl, line 2" in message and "'label' is given twice" in message


def test_yaml_key_given_twice_is_refused_with_both_lines(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1.0e-4\nseed: 3\ntrain:\n  epochs: 2\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"c.yaml: key 'train' is given twice \(lines 1 and 4\)"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"lines 2 and 3"):
        read_yaml(write(tmp_path, "n.yaml", "model:\n  pooling: last\n  pooling: first\n"))
    assert safe_load_unique("a: &x {b: 1}\nc:\n  <<: *x\n  b: 2\n") == {"a": {"b": 1}, "c": {"b": 2}}


# ---------------------------------------------------------------- settings as written


@pytest.mark.parametrize("word", ["yes", "no", "on", "off", "true", "007", "1e3", "1.50"])
def test_string_keys_take_the_text_verbatim(tmp_path: Path, word: str) -> None:
    assert load_config(None, [f"output_dir={word}"]).output_dir == word
    path = write(tmp_path, "c.yaml", f"output_dir: {word}\nmodel:\n  weights: {word}\n")
    cfg = load_config(path)
    assert (cfg.output_dir, cfg.model.weights) == (word, word)


def test_non_string_keys_still_read_yaml_values() -> None:
    cfg = load_config(None, ["report.plots=no", "train.epochs=007", "train.lr=1e-4"])
    assert cfg.report.plots is False and cfg.train.epochs == 7 and cfg.train.lr == pytest.approx(1e-4)


def test_tilde_is_the_home_folder_in_path_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    keys = ["output_dir", "data.train_file", "data.val_file", "data.test_file", "model.weights", "resume"]
    cfg = load_config(None, [f"{key}=~/x/{i}" for i, key in enumerate(keys)])
    got = [cfg.output_dir, cfg.data.train_file, cfg.data.val_file, cfg.data.test_file, cfg.model.weights, cfg.resume]
    assert got == [f"{tmp_path}/x/{i}" for i in range(len(keys))]
    assert load_config(write(tmp_path, "c.yaml", "output_dir: ~/runs/a\n")).output_dir == f"{tmp_path}/runs/a"


@pytest.mark.parametrize("key", ["train.lr", "train.weight_decay", "train.grad_clip", "train.min_lr_ratio",
                                 "early_stopping.min_delta", "model.dropout", "lora.alpha", "lora.dropout",
                                 "train.eps", "distributed.timeout_seconds"])
@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "nan", "inf"])
def test_floats_must_be_finite(key: str, value: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: must be a finite number"):
        load_config(None, [f"{key}={value}"])


def test_non_finite_class_weight_and_beta_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"^loss.class_weights"):
        load_config(None, ["loss.class_weights=[1.0, .inf]"])
    with pytest.raises(ConfigError, match=r"^train.betas\[1\]: must be a finite number"):
        load_config(None, ["train.betas=[0.9, .nan]"])


@pytest.mark.parametrize(("override", "expected"), [
    ("seed=-1", f"seed: must be in 0..{SEED_MAX}"),
    (f"seed={SEED_MAX + 1}", f"seed: must be in 0..{SEED_MAX}"),
    ("distributed.timeout_seconds=1e12", "distributed.timeout_seconds: must be > 0 and at most 604800"),
    ("distributed.timeout_seconds=0", "distributed.timeout_seconds: must be > 0"),
    ("train.betas=[1.0, 0.999]", "train.betas: each must be in [0, 1)"),
    ("train.eps=-1e-8", "train.eps: must be >= 0"),
    ("train.micro_batch_size=1e30", "train.micro_batch_size: 1000000000000000019884624838656 is out of range"),
    ("train.epochs=-2", "train.epochs: must be >= 1"),
])
def test_numbers_out_of_range_are_refused(override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert str(info.value).startswith(expected), str(info.value)


def test_seed_at_the_range_ends_loads() -> None:
    assert load_config(None, [f"seed={SEED_MAX}"]).seed == SEED_MAX
    assert load_config(None, ["seed=0"]).seed == 0


# ---------------------------------------------------------------- the real command: one line, exit 2


def test_train_command_refuses_a_repeated_yaml_key(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("seed: 1\ntrain:\n  lr: 1.0e-4\ntrain:\n  epochs: 2\n", encoding="utf-8")
    assert_one_error_line(run_train(tmp_path, config), "key 'train' is given twice (lines 2 and 4)")


def test_train_command_refuses_an_infinite_lr_and_a_huge_timeout(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml")
    assert_one_error_line(run_train(tmp_path, config, "train.lr=.inf"), "train.lr: must be a finite number")
    assert_one_error_line(run_train(tmp_path, config, "distributed.timeout_seconds=1e15"),
                          "distributed.timeout_seconds")


def test_train_command_refuses_an_na_label_and_a_repeated_column(tmp_path: Path) -> None:
    csv = GOOD_CSV + "maybe later,NA\n"
    paths = [write(tmp_path, f"{split}.csv", csv) for split in ("train", "val", "test")]
    config = write_config(tmp_path / "c.yaml")
    files = [f"data.{split}_file={p}" for split, p in zip(("train", "val", "test"), paths)]
    result = run_train(tmp_path, config, *files, f"output_dir={tmp_path / 'run'}")
    assert_one_error_line(result, "train.csv, row 5 (line 6), column 'label'", "data.na_labels=true")
    write(tmp_path, "train.csv", "text,label,label\na,spam,ham\n")
    result = run_train(tmp_path, config, *files, f"output_dir={tmp_path / 'run2'}")
    assert_one_error_line(result, "column 'label' twice")


def test_a_label_map_of_integers_has_the_same_classes_as_their_exact_text() -> None:
    assert LabelMap((2, 10)).same_classes(LabelMap(("2", "10")))
    assert not LabelMap((2, 10)).same_classes(LabelMap(("2", "010")))
    assert not LabelMap(("a", "b")).same_classes(LabelMap(("a", "c")))
