"""Reading, validation, label maps, tokenization, padding and sharding of classification data."""
from __future__ import annotations

import json
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from dist_finetune.config import DataConfig
from dist_finetune.data import (
    ClassificationDataset,
    DataError,
    LabelMap,
    bundled_sms_splits,
    load_data,
    make_collate,
    read_table,
)
from dist_finetune.tokenizer import EOT_ID, PAD_ID, encode

GOOD_CSV = "text,label\nwin a prize now,spam\nsee you at lunch,ham\ncall me later,ham\nfree money,spam\n"


def write(directory: Path, name: str, content: str | bytes) -> Path:
    path = directory / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def files_cfg(tmp_path: Path, train: tuple[str, str | bytes] = ("train.csv", GOOD_CSV),
              val: tuple[str, str | bytes] = ("val.csv", GOOD_CSV),
              test: tuple[str, str | bytes] = ("test.csv", GOOD_CSV), **overrides) -> DataConfig:
    paths = {split: str(write(tmp_path, *spec)) for split, spec in (("train", train), ("val", val), ("test", test))}
    return DataConfig(train_file=paths["train"], val_file=paths["val"], test_file=paths["test"], **overrides)


def tiny_dataset(n: int) -> ClassificationDataset:
    return ClassificationDataset([[i + 1] for i in range(n)], [i % 2 for i in range(n)], [str(i) for i in range(n)])


# ---------------------------------------------------------------- the bundled SMS Spam Collection


@pytest.fixture(scope="module")
def bundled():
    return load_data(DataConfig(), context_length=1024)


def test_bundled_split_sizes_and_balance(bundled):
    assert (len(bundled.train), len(bundled.val), len(bundled.test)) == (1045, 149, 300)
    assert bundled.label_map.labels == ("ham", "spam")
    counts = Counter(bundled.train.labels + bundled.val.labels + bundled.test.labels)
    assert counts == {0: 747, 1: 747}


def test_bundled_matches_reference_max_length(bundled):
    # The chapter-6 reference reports 120 tokens for the longest training message.
    assert bundled.max_length == 120
    assert bundled.truncated == {"train": 0, "val": 0, "test": 0}


def test_bundled_is_deterministic(bundled):
    again = load_data(DataConfig(), context_length=1024)
    for split in ("train", "val", "test"):
        first, second = getattr(bundled, split), getattr(again, split)
        assert first.token_ids == second.token_ids
        assert first.labels == second.labels
        assert first.texts == second.texts


def test_bundled_splits_frames():
    splits = bundled_sms_splits()
    assert set(splits) == {"train", "val", "test"}
    for frame in splits.values():
        assert list(frame.columns) == ["text", "label"]
        assert set(frame["label"]) <= {"ham", "spam"}
        assert list(frame.index) == list(range(len(frame)))
    other = bundled_sms_splits(seed=7)
    assert len(other["train"]) == 1045
    assert other["train"]["text"].tolist() != splits["train"]["text"].tolist()


def test_bundled_tokens_are_encode(bundled):
    for i in (0, 1, 500, 1044):
        assert bundled.train.token_ids[i] == encode(bundled.train.texts[i])
    assert bundled.train.num_tokens() == sum(len(ids) for ids in bundled.train.token_ids)


# ---------------------------------------------------------------- padding and truncation


def test_fixed_padding_shapes_and_lengths():
    collate = make_collate("fixed", max_length=6)
    batch = collate([([5, 6, 7], 1), ([8], 0), ([1, 2, 3, 4, 5, 6], 1)])
    assert batch["input_ids"].shape == (3, 6)
    assert batch["input_ids"].dtype == torch.long
    assert batch["lengths"].tolist() == [3, 1, 6]
    assert batch["labels"].tolist() == [1, 0, 1]
    assert batch["input_ids"][0].tolist() == [5, 6, 7, PAD_ID, PAD_ID, PAD_ID]
    assert batch["input_ids"][1].tolist() == [8] + [PAD_ID] * 5


def test_longest_padding_shapes_and_lengths():
    collate = make_collate("longest", max_length=50)
    batch = collate([([5, 6, 7], 1), ([8], 0)])
    assert batch["input_ids"].shape == (2, 3)
    assert batch["lengths"].tolist() == [3, 1]
    assert batch["input_ids"][1].tolist() == [8, PAD_ID, PAD_ID]


def test_collate_rejects_bad_input():
    with pytest.raises(ValueError, match="padding"):
        make_collate("left", 8)
    with pytest.raises(ValueError, match="max_length"):
        make_collate("fixed", 2)([([1, 2, 3], 0)])
    with pytest.raises(ValueError):
        make_collate("longest", 2)([([], 0)])


def test_collate_pickles():
    collate = make_collate("longest", 9)
    assert pickle.loads(pickle.dumps(collate)) == collate


def test_text_ending_in_endoftext_keeps_it(tmp_path):
    csv = 'text,label\n"hello there <|endoftext|>",spam\nhi,ham\n'
    bundle = load_data(files_cfg(tmp_path, train=("train.csv", csv)), context_length=1024)
    ids = bundle.train.token_ids[0]
    assert ids[-1] == EOT_ID and ids == encode("hello there <|endoftext|>")
    collate = make_collate("fixed", bundle.max_length)
    batch = collate([bundle.train[0], bundle.train[1]])
    assert batch["lengths"][0].item() == len(ids)
    assert batch["input_ids"][0, len(ids) - 1].item() == EOT_ID
    assert batch["lengths"][1].item() == 1


def test_truncation_with_max_length(tmp_path):
    long = "one two three four five six seven"
    train = f"text,label\n{long},a\nshort,b\n"
    val = f"text,label\n{long},a\n{long} eight,b\nok,a\n"
    bundle = load_data(files_cfg(tmp_path, train=("train.csv", train), val=("val.csv", val),
                                 test=("test.csv", train), max_length=3), context_length=1024)
    assert bundle.max_length == 3
    assert bundle.truncated == {"train": 1, "val": 2, "test": 1}
    assert bundle.train.token_ids[0] == encode(long)[:3]
    assert bundle.train.token_ids[1] == encode("short")
    assert all(len(ids) <= 3 for ids in bundle.val.token_ids)
    assert bundle.train.texts[0] == long


def test_max_length_defaults_to_longest_train_example(tmp_path):
    train = "text,label\none two three,a\nfour,b\n"
    val = "text,label\none two three four five,a\n"
    bundle = load_data(files_cfg(tmp_path, train=("train.csv", train), val=("val.csv", val),
                                 test=("test.csv", train)), context_length=1024)
    assert bundle.max_length == 3
    assert bundle.truncated == {"train": 0, "val": 1, "test": 0}
    capped = load_data(files_cfg(tmp_path, train=("train.csv", train), val=("val.csv", val),
                                 test=("test.csv", train)), context_length=2)
    assert capped.max_length == 2
    assert capped.truncated == {"train": 1, "val": 1, "test": 1}


# ---------------------------------------------------------------- formats and labels


def test_csv_custom_columns_and_int_labels(tmp_path):
    csv = "id,msg,y\n1,hello,2\n2,bye,10\n3,\"comma, inside\",2\n4,NA,10\n5,null,2\n"
    bundle = load_data(files_cfg(tmp_path, train=("t.csv", csv), val=("v.csv", csv), test=("s.csv", csv),
                                 text_column="msg", label_column="y", balance="none"), context_length=1024)
    assert bundle.label_map.labels == ("2", "10")  # the text as written; integer spellings sort numerically
    assert bundle.train.labels == [0, 1, 0, 1, 0]
    assert bundle.train.texts == ["hello", "bye", "comma, inside", "NA", "null"]  # no NA guessing


def test_tsv_and_txt_custom_columns(tmp_path):
    tsv = "body\tcls\nhello, world\tpos\nbad day\tneg\n"
    bundle = load_data(files_cfg(tmp_path, train=("t.tsv", tsv), val=("v.txt", tsv), test=("s.tab", tsv),
                                 text_column="body", label_column="cls"), context_length=1024)
    assert bundle.label_map.labels == ("neg", "pos")
    assert bundle.val.texts == ["hello, world", "bad day"]
    assert bundle.val.labels == [1, 0]


def test_jsonl_int_labels_extra_keys_blank_lines(tmp_path):
    lines = [{"content": "good film", "stars": 1, "extra": [1, 2]}, {"content": "bad film", "stars": 0}]
    jsonl = json.dumps(lines[0]) + "\n\n" + json.dumps(lines[1]) + "\n"
    bundle = load_data(files_cfg(tmp_path, train=("t.jsonl", jsonl), val=("v.ndjson", jsonl),
                                 test=("s.csv", "content,stars\nok,1\n"),
                                 text_column="content", label_column="stars"), context_length=1024)
    assert bundle.label_map.labels == (0, 1)
    assert bundle.train.labels == [1, 0]
    assert bundle.test.labels == [1]


def test_read_table_returns_text_and_label(tmp_path):
    path = write(tmp_path, "d.csv", "a,msg,y\nx,hello,3\nz,bye,4\n")
    frame = read_table(path, "msg", "y")
    assert list(frame.columns) == ["text", "label"]
    assert frame["text"].tolist() == ["hello", "bye"]
    assert frame["label"].tolist() == ["3", "4"]  # the text in the file
    utf8_bom = write(tmp_path, "bom.csv", "\ufefftext,label\ncafé,x\n".encode())
    assert read_table(utf8_bom, "text", "label")["text"].tolist() == ["café"]


def test_label_map_round_trip():
    for labels in (("ham", "spam"), (0, 1, 7)):
        label_map = LabelMap(labels)
        restored = LabelMap.from_json(json.loads(json.dumps(label_map.to_json())))
        assert restored == label_map and len(restored) == len(labels)
        assert [restored.to_id(x) for x in labels] == list(range(len(labels)))
    ints = LabelMap((0, 1, 7))
    assert ints.to_id(np.int64(7)) == 2 and ints.to_id("7") == 2
    assert ints.from_id(1) == 1
    with pytest.raises(DataError, match="known labels"):
        ints.to_id(3)
    with pytest.raises(ValueError, match="sorted"):
        LabelMap.from_json(["spam", "ham"])
    with pytest.raises(ValueError, match="all strings or all integers"):
        LabelMap.from_json([1, "a"])


# ---------------------------------------------------------------- bad data: one message each

BAD_DATA = [
    # id, overrides of files_cfg, substrings the message must contain
    ("missing file", dict(train=None), ["nope.csv", "not found", "data.train_file"]),
    ("unknown format", dict(train=("train.xlsx", GOOD_CSV)),
     ["train.xlsx", "'.xlsx'", ".csv", ".tsv", ".jsonl"]),
    ("missing text column", dict(text_column="body"),
     ["train.csv", "'body'", "columns found", "['text', 'label']", "data.text_column"]),
    ("missing label column", dict(label_column="y"),
     ["train.csv", "'y'", "['text', 'label']", "data.label_column"]),
    ("empty text", dict(train=("train.csv", "text,label\nhello,ham\n,spam\nbye,ham\n")),
     ["train.csv", "row 2", "'text'", "empty"]),
    ("whitespace text", dict(val=("val.csv", "text,label\nhello,ham\nbye,spam\n   ,ham\n")),
     ["val.csv", "row 3", "'text'", "empty"]),
    ("missing label", dict(train=("train.csv", "text,label\nhello,ham\nbye,spam\nno label,\n")),
     ["train.csv", "row 3", "'label'", "missing"]),
    ("short row", dict(train=("train.csv", "text,label\nhello,ham\nbye\n")),
     ["train.csv", "row 2", "'label'", "missing"]),
    ("unseen label", dict(test=("test.csv", "text,label\nhi,ham\nmaybe spam,maybe\n")),
     ["test.csv", "row 2", "'maybe'", "known labels", "['ham', 'spam']"]),
    ("invalid utf-8", dict(train=("train.csv", b"text,label\nhello,ham\ncaf\xe9 au lait,spam\n")),
     ["train.csv", "invalid UTF-8", "line 3", "row 2", "'text'", "0xe9"]),
    ("invalid utf-8 jsonl",
     dict(val=("val.jsonl", b'{"text": "ok", "label": "ham"}\n\n{"text": "x", "label": "sp\xffam"}\n')),
     ["val.jsonl", "invalid UTF-8", "line 3", "row 2", "'label'"]),
    ("header only", dict(test=("test.csv", "text,label\n")), ["test.csv", "test split has no rows"]),
    ("empty file", dict(val=("val.csv", "")), ["val.csv", "empty"]),
    ("empty jsonl", dict(val=("val.jsonl", "\n\n")), ["val.jsonl", "empty"]),
    ("mixed labels", dict(train=("train.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": 0}\n'
                                               '{"text": "c", "label": "spam"}\n')),
     ["train.jsonl", "row 3", "'label'", "'spam'", "integer"]),
    ("too many fields", dict(train=("train.csv", "text,label\na,ham\nb,spam,extra\n")),
     ["train.csv", "line 3", "fields"]),
    ("too many fields first row", dict(train=("train.csv", "text,label\na,ham,extra\nb,spam\n")),
     ["train.csv", "comma-separated", "more fields than the header"]),
    ("bad json", dict(train=("train.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", label}\n')),
     ["train.jsonl", "line 2", "not valid JSON"]),
    ("json not object", dict(train=("train.jsonl", '["a", "x"]\n')), ["train.jsonl", "line 1", "JSON object"]),
    ("json nested too deep", dict(train=("train.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "d": '
                                         + "[" * 100_000 + "]" * 100_000 + "}\n")),
     ["train.jsonl", "line 2", "nested too deeply"]),
    ("json lone surrogate", dict(train=("train.jsonl", '{"text": "a \\ud83d\\ude00", "label": "x"}\n'
                                                       '{"text": "b \\ud800", "label": "y"}\n')),
     ["train.jsonl", "line 2", "surrogate"]),
    ("json null text", dict(train=("train.jsonl", '{"text": "a", "label": "x"}\n{"text": null, "label": "y"}\n')),
     ["train.jsonl", "row 2 (line 2)", "'text'", "empty"]),
    ("json empty text zero tokens",
     dict(train=("train.jsonl", '{"text": "a", "label": "x"}\n\n{"text": "", "label": "y"}\n')),
     ["train.jsonl", "row 2 (line 3)", "'text'", "empty"]),
    ("json missing label key", dict(train=("train.jsonl", '{"text": "a", "label": "x"}\n{"text": "b"}\n')),
     ["train.jsonl", "row 2", "'label'", "missing"]),
    ("json float label", dict(train=("train.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": 0.5}\n')),
     ["train.jsonl", "row 2", "'label'", "strings or integers"]),
    ("json number text", dict(train=("train.jsonl", '{"text": 42, "label": "x"}\n')),
     ["train.jsonl", "row 1", "'text'", "must be a string"]),
    ("one training label", dict(train=("train.csv", "text,label\na,ham\nb,ham\n")),
     ["train.csv", "only one label", "'ham'"]),
    ("directory", dict(val="dir"), ["is not a file", "data.val_file"]),
    ("max_length too long", dict(max_length=5000), ["data.max_length", "5000", "1024"]),
]


@pytest.mark.parametrize("overrides, expected", [(o, e) for _, o, e in BAD_DATA], ids=[c[0] for c in BAD_DATA])
def test_bad_data_messages(tmp_path, overrides, expected):
    overrides = dict(overrides)
    special = {split: overrides.pop(split) for split in ("train", "val", "test")
               if split in overrides and not isinstance(overrides[split], tuple)}
    cfg = files_cfg(tmp_path, **overrides)
    for split, what in special.items():
        if what is None:
            target = tmp_path / "nope.csv"
        else:
            target = tmp_path / "adir.csv"
            target.mkdir()
        cfg = DataConfig(**{**cfg.__dict__, f"{split}_file": str(target)})
    with pytest.raises(DataError) as excinfo:
        load_data(cfg, context_length=1024)
    message = str(excinfo.value)
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"


def test_val_or_test_file_without_a_train_file_is_an_error(tmp_path):
    cfg = DataConfig(val_file=str(write(tmp_path, "v.csv", GOOD_CSV)))
    with pytest.raises(DataError, match="without data.train_file: set data.train_file too"):
        load_data(cfg, context_length=1024)


def test_a_row_of_a_split_file_is_named_by_its_row_in_the_file(tmp_path):
    rows = "".join(f"text number {i},{'ham' if i % 2 else 'spam'}\n" for i in range(20))
    cfg = DataConfig(train_file=str(write(tmp_path, "all.csv", "text,label\n" + rows)), split=(0.5, 0.5),
                     max_length=2)
    bundle = load_data(cfg, context_length=1024)
    from dist_finetune.data import _rows_of, _read_file  # the split's rows keep their file row in messages
    val = _rows_of(_read_file(cfg.train_file, "text", "label"), "val", bundle.split.indices["val"])
    first = bundle.split.indices["val"][0]
    assert val.source.at(1, "label") == f"{cfg.train_file} (val split), row {first + 1} (line {first + 2}), column 'label'"
