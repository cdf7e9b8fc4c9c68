"""Class imbalance settings: data.balance (undersampling) and loss.class_weights; files for evaluate/predict."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from dist_finetune.config import ConfigError, DataConfig, load_config
from dist_finetune.data import DataError, LabelMap, load_data, load_eval_file, read_texts, undersample_indices
from dist_finetune.loss import class_weights
from dist_finetune.tokenizer import encode


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------- config


def test_class_weights_config_values():
    assert load_config(None, []).loss.class_weights == "none"
    assert load_config(None, ["loss.class_weights=balanced"]).loss.class_weights == "balanced"
    assert load_config(None, ["loss.class_weights=[1, 6.5]"]).loss.class_weights == (1.0, 6.5)
    for bad in ("loss.class_weights=heavy", "loss.class_weights=[1, 0]", "loss.class_weights=[]"):
        with pytest.raises(ConfigError, match=r"loss\.class_weights: .*none \| balanced"):
            load_config(None, [bad])


def test_balance_config_values():
    assert load_config(None, []).data.balance == "auto"
    assert load_config(None, ["data.balance=none"]).data.balance == "none"
    with pytest.raises(ConfigError, match="data.balance.*auto | undersample | none"):
        load_config(None, ["data.balance=oversample"])


# ---------------------------------------------------------------- loss weights


def test_balanced_weights_are_n_over_classes_times_count():
    labels = [0] * 6 + [1] * 2
    assert class_weights("balanced", labels, ["ham", "spam"]) == [8 / (2 * 6), 8 / (2 * 2)]
    assert class_weights("none", labels, ["ham", "spam"]) is None
    assert class_weights((1.0, 3.0), labels, ["ham", "spam"]) == [1.0, 3.0]


def test_weight_list_of_the_wrong_length_names_the_key():
    with pytest.raises(ConfigError, match=r"loss\.class_weights: 3 weights given .* 2 classes \['ham', 'spam'\]"):
        class_weights((1.0, 2.0, 3.0), [0, 1], ["ham", "spam"])


# ---------------------------------------------------------------- undersampling


def test_undersample_indices_keep_order_and_the_rarest_count():
    labels = [0, 0, 1, 0, 0, 1, 0]
    keep = undersample_indices(labels)
    assert keep == sorted(keep) and Counter(labels[i] for i in keep) == {0: 2, 1: 2}
    assert {2, 5} <= set(keep)  # every row of the rarest label stays
    assert undersample_indices(labels) == keep  # fixed seed
    assert undersample_indices([1, 0, 1, 0]) == [0, 1, 2, 3]


def test_undersampling_touches_the_training_file_only(tmp_path):
    rows = "text,label\n" + "".join(f"hello number {i},ham\n" for i in range(6)) + "win cash,spam\nfree prize,spam\n"
    files = {s: str(write(tmp_path / f"{s}.csv", rows)) for s in ("train", "val", "test")}
    cfg = DataConfig(train_file=files["train"], val_file=files["val"], test_file=files["test"],
                     balance="undersample")
    bundle = load_data(cfg, context_length=128)
    assert Counter(bundle.train.labels) == {0: 2, 1: 2}
    assert len(bundle.val) == len(bundle.test) == 8
    assert all(bundle.train.token_ids[i] == encode(t) for i, t in enumerate(bundle.train.texts))
    for keep_all in ("none", "auto"):  # auto: a user's file is used whole
        full = load_data(DataConfig(**{**cfg.__dict__, "balance": keep_all}), context_length=128)
        assert len(full.train) == 8


def test_bundled_full_collection_is_imbalanced():
    bundle = load_data(DataConfig(balance="none"), context_length=1024)
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (3900, 557, 1115)
    spam = bundle.label_map.to_id("spam")
    total = bundle.train.labels + bundle.val.labels + bundle.test.labels
    assert total.count(spam) == 747 and 0.12 < total.count(spam) / len(total) < 0.14


# ---------------------------------------------------------------- files for evaluate / predict


def test_eval_file_uses_the_given_label_map_and_truncates(tmp_path):
    path = write(tmp_path / "e.csv", 'msg,y\n"one two three four five, six",spam\nhi,ham\n')
    ds, truncated = load_eval_file(path, "msg", "y", LabelMap(("ham", "spam")), max_length=3)
    assert ds.labels == [1, 0] and truncated == 1 and ds.token_ids[0] == encode("one two three four five, six")[:3]
    with pytest.raises(DataError, match=r"label 'eggs' does not occur .*known labels: \['ham', 'spam'\]"):
        load_eval_file(write(tmp_path / "bad.csv", "msg,y\nhi,eggs\n"), "msg", "y", LabelMap(("ham", "spam")), 3)
    with pytest.raises(DataError, match=r"no column 'text'.*Set --text-column"):
        load_eval_file(path, "text", "y", LabelMap(("ham", "spam")), 3)


def test_read_texts_keeps_every_column_and_names_bad_rows(tmp_path):
    frame, texts = read_texts(write(tmp_path / "in.csv", 'id,text\n1,"a, b\nc"\n2,d\n'), "text")
    assert list(frame.columns) == ["id", "text"] and texts == ["a, b\nc", "d"]
    with pytest.raises(DataError, match=r"row 2 \(line 3\), column 'text': the text is empty"):
        read_texts(write(tmp_path / "gap.csv", "id,text\n1,x\n2,\n"), "text")
    with pytest.raises(DataError, match=r"the file has no rows"):
        read_texts(write(tmp_path / "header.csv", "id,text\n"), "text")
    with pytest.raises(DataError, match=r"no column 'body'.*Set --text-column"):
        read_texts(tmp_path / "in.csv", "body")
