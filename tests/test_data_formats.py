"""Data in the formats people have: Parquet files and folders written by datasets' save_to_disk.

Unit-level through the real loaders, plus one tiny one-process training run on Parquet files that
predict --input and evaluate --data then read Parquet from.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest

pa = pytest.importorskip("pyarrow")
datasets = pytest.importorskip("datasets")

import runner  # noqa: E402
from dist_finetune.config import ConfigError, DataConfig, load_config  # noqa: E402
from dist_finetune.data import load_data, load_eval_file, read_texts  # noqa: E402
from dist_finetune.errors import UserError  # noqa: E402

SPAM = ["WINNER claim your free prize now", "FREE entry text WIN to 80086", "Urgent! call 0900 to claim cash",
        "You won a free holiday, reply YES"]
HAM = ["see you at eight tonight", "can you pick up some milk", "ok thanks, talk later", "running late, sorry"]


def frame(n: int = 40, labels: tuple = ("ham", "spam")) -> pd.DataFrame:
    texts = [(HAM if i % 2 == 0 else SPAM)[(i // 2) % 4] + f" #{i}" for i in range(n)]
    return pd.DataFrame({"text": texts, "label": [labels[i % 2] for i in range(n)], "id": list(range(n))})


def parquet(path, df: pd.DataFrame):
    df.to_parquet(path, index=False)
    return path


def message(excinfo) -> str:
    return str(excinfo.value)


# ---------------------------------------------------------------- Parquet through load_data


def test_parquet_train_val_test_load_as_written(tmp_path):
    ints = frame(labels=(0, 7))
    paths = {s: parquet(tmp_path / f"{s}.parquet", ints) for s in ("train", "val", "test")}
    bundle = load_data(DataConfig(train_file=str(paths["train"]), val_file=str(paths["val"]),
                                  test_file=str(paths["test"])), context_length=128)
    assert bundle.label_map.labels == (0, 7)  # an integer column gives integer labels, as JSONL
    assert bundle.splits() == ("train", "val", "test") and len(bundle.test) == 40
    strings = frame(labels=("007", "7"))  # a string column keeps its strings: two labels
    single = load_data(DataConfig(train_file=str(parquet(tmp_path / "s.parquet", strings))), context_length=128)
    assert single.label_map.labels == ("007", "7")
    assert single.split is not None and single.split.file.endswith("s.parquet")  # split by data.split
    assert sum(len(getattr(single, s)) for s in ("train", "val", "test")) == 40


@pytest.mark.parametrize("change, expected", [
    (lambda df: df.rename(columns={"label": "y"}), "no column 'label' (read as Parquet); columns found: "
                                                   "['text', 'y', 'id']. Set data.label_column"),
    (lambda df: df.assign(text=[*df.text[:2], "  ", *df.text[3:]]), ", row 3, column 'text': the text is empty"),
    (lambda df: df.assign(label=pd.array([*df.label[:4], None, *df.label[5:]], dtype=object)),
     ", row 5, column 'label': the label is missing"),
    (lambda df: df.assign(label=[float(i % 2) for i in range(len(df))]), "column 'label' holds double values; "
                                                                         "labels are read as written"),
    (lambda df: df.assign(label=[i % 2 == 0 for i in range(len(df))]), "column 'label' holds bool values"),
    (lambda df: df.assign(text=list(range(len(df)))), "column 'text' holds int64, not text"),
])
def test_parquet_bad_input_names_file_row_column_and_fix(tmp_path, change, expected):
    path = parquet(tmp_path / "bad.parquet", change(frame()))
    with pytest.raises(UserError) as excinfo:
        load_data(DataConfig(train_file=str(path)), context_length=128)
    assert str(path) in message(excinfo) and expected in message(excinfo)


def test_parquet_damaged_file_and_nullable_integer_labels(tmp_path):
    bad = tmp_path / "cut.parquet"
    bad.write_bytes(parquet(tmp_path / "x.parquet", frame()).read_bytes()[:100])
    with pytest.raises(UserError, match="cannot be read as Parquet"):
        load_data(DataConfig(train_file=str(bad)), context_length=128)
    df = frame().assign(label=pd.array([i % 2 if i != 6 else None for i in range(40)], dtype="Int64"))
    with pytest.raises(UserError, match=r"row 7, column 'label': the label is missing"):  # not a float column
        load_data(DataConfig(train_file=str(parquet(tmp_path / "n.parquet", df))), context_length=128)


def test_parquet_without_pyarrow_names_the_extra(tmp_path):
    path = parquet(tmp_path / "t.parquet", frame())
    code = ("import sys; sys.modules['pyarrow'] = None\n"
            "from dist_finetune.data import read_table\n"
            f"read_table({str(path)!r}, 'text', 'label')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=runner.REPO, capture_output=True, text=True)
    assert proc.returncode != 0 and "pip install -e '.[parquet]'" in proc.stderr.strip().splitlines()[-1]


def test_eval_file_and_texts_read_parquet(tmp_path):
    from dist_finetune.data import LabelMap
    path = parquet(tmp_path / "e.parquet", frame())
    dataset, _ = load_eval_file(path, "text", "label", LabelMap(("ham", "spam")), 64)
    assert dataset.labels[:4] == [0, 1, 0, 1]
    whole, texts = read_texts(path, "text")
    assert list(whole.columns) == ["text", "label", "id"] and whole["id"].tolist()[:3] == [0, 1, 2]
    assert texts[0].startswith("see you")


# ---------------------------------------------------------------- datasets.save_to_disk folders


def saved_dict(tmp_path, names=("train", "validation", "test")):
    features = datasets.Features({"sms": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["ham", "spam"])})
    parts = {}
    for name in names:
        df = frame()
        parts[name] = datasets.Dataset.from_dict({"sms": df.text.tolist(), "label": [i % 2 for i in range(40)]},
                                                 features=features)
    folder = tmp_path / "saved"
    datasets.DatasetDict(parts).save_to_disk(str(folder))
    return folder


def test_saved_dataset_dict_gives_its_three_splits_with_classlabel_names(tmp_path):
    folder = saved_dict(tmp_path, ("train", "dev", "test"))
    bundle = load_data(DataConfig(dataset_dir=str(folder), text_column="sms"), context_length=128)
    assert bundle.label_map.labels == ("ham", "spam")
    assert [len(getattr(bundle, s)) for s in ("train", "val", "test")] == [40, 40, 40] and bundle.split is None
    assert bundle.val.texts[0].startswith("see you")


def test_single_saved_dataset_is_split_by_data_split(tmp_path):
    df = frame()
    datasets.Dataset.from_pandas(df[["text", "label"]]).save_to_disk(str(tmp_path / "one"))
    cfg = DataConfig(dataset_dir=str(tmp_path / "one"), split=(0.5, 0.5), split_seed=7)
    bundle = load_data(cfg, context_length=128)
    assert (len(bundle.train), len(bundle.val), bundle.test) == (20, 20, None)
    assert bundle.split.fractions == (0.5, 0.5) and len(bundle.split.sha256) == 64
    assert load_data(cfg, context_length=128).split.indices == bundle.split.indices  # the same rows again
    assert load_data(cfg, 128, saved_split=bundle.split).val.texts == bundle.val.texts  # the run's record
    df.loc[2, "text"] = "another text"
    datasets.Dataset.from_pandas(df).save_to_disk(str(tmp_path / "one"))
    with pytest.raises(UserError, match="changed since the run split it"):
        load_data(cfg, 128, saved_split=bundle.split)
    df.loc[2, "text"] = ""
    datasets.Dataset.from_pandas(df).save_to_disk(str(tmp_path / "one"))
    with pytest.raises(UserError, match=r"one \(train split\), row 3, column 'text': the text is empty"):
        load_data(cfg, context_length=128)


def test_dataset_dir_refusals(tmp_path):
    with pytest.raises(ConfigError, match="data.dataset_dir and data.train_file are both set"):
        load_config(None, ["data.dataset_dir=x", "data.train_file=y.csv"])
    with pytest.raises(UserError, match="no 'train' split"):
        load_data(DataConfig(dataset_dir=str(saved_dict(tmp_path, ("training",)))), context_length=128)
    with pytest.raises(UserError, match=r"\(train split\): no column 'text' \(read as a saved dataset\)"):
        load_data(DataConfig(dataset_dir=str(saved_dict(tmp_path, ("train",)))), context_length=128)
    with pytest.raises(UserError, match="is not a saved dataset"):
        load_data(DataConfig(dataset_dir=str(tmp_path)), context_length=128)


# ---------------------------------------------------------------- one tiny run on Parquet files


def cli(module: str, *args: object) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", f"dist_finetune.{module}", *map(str, args)], cwd=runner.REPO,
                          env=runner.child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_train_predict_evaluate_on_parquet(tmp_path):
    data = parquet(tmp_path / "all.parquet", frame(60))
    run = runner.train(tmp_path, "run", overrides=[f"data.train_file={data}", "train.max_steps=3",
                                                   "eval.every_steps=3"])
    assert run.ok, run.output()
    assert json.loads((run.dir / "data_split.json").read_text())["file"] == str(data)
    cli("predict", "--model", run.dir, "--input", data, "--output", tmp_path / "out.parquet")
    out = pd.read_parquet(tmp_path / "out.parquet")
    assert list(out.columns) == ["text", "label", "id", "predicted_label", "prob_ham", "prob_spam"]
    assert len(out) == 60 and set(out.predicted_label) <= {"ham", "spam"}
    cli("evaluate", "--run", run.dir, "--data", data)
    result = json.loads((run.dir / "eval" / "all.json").read_text())
    assert result["examples"] == 60 and result["labels"] == ["ham", "spam"]


def test_train_and_evaluate_on_a_saved_dataset_dict(tmp_path):
    folder = saved_dict(tmp_path)
    run = runner.train(tmp_path, "run", overrides=[f"data.dataset_dir={folder}", "data.text_column=sms",
                                                   "train.max_steps=2", "eval.every_steps=2"])
    assert run.ok, run.output()
    assert run.summary()["labels"] == ["ham", "spam"] and not (run.dir / "data_split.json").exists()
    cli("evaluate", "--run", run.dir)
    result = json.loads((run.dir / "eval" / "test.json").read_text())
    assert result["examples"] == 40 and result["labels"] == ["ham", "spam"]
