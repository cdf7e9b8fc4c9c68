"""data.long_texts: truncate (the first tokens), head_tail (first and last) or chunk (all of it, in windows), the
same in training, evaluate and predict. Sets the tests make, whose label is written only at the end (or only in
the middle) of long texts, tell them apart."""
from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

import runner
from dist_finetune import Classifier
from dist_finetune.config import ConfigError, from_dict
from dist_finetune.encoding import describe, fit, windows
from dist_finetune.tokenizer import encode

FILLER = ("the meeting notes cover budget travel lunch schedule weather office parking printer coffee report "
          "team project update review plan agenda minutes draft").split()
ENDINGS = {"urgent": "please treat this as urgent and answer today", "later": "no rush at all and answer whenever"}


def long_text(rng: random.Random, label: str, middle: bool = False) -> str:
    """About 100 filler tokens and the sentence that decides the label: at the end (past any 32-token start), or
    in the middle (out of reach of the first 8 and the last 24 tokens too)."""
    filler = [rng.choice(FILLER) for _ in range(100)]
    if middle:
        return " ".join(filler[:50]) + ". " + ENDINGS[label] + ". " + " ".join(filler[50:])
    return " ".join(filler) + ". " + ENDINGS[label]


def write_split(path: Path, rows: int, seed: int, middle: bool = False) -> Path:
    rng = random.Random(seed)
    labels = ["urgent", "later"] * (rows // 2)
    rng.shuffle(labels)
    path.write_text("text,label\n" + "".join(f"{long_text(rng, label, middle)},{label}\n" for label in labels))
    return path


def splits(tmp: Path, middle: bool = False) -> dict[str, Path]:
    return {split: write_split(tmp / f"{split}.csv", rows, seed, middle)
            for split, rows, seed in (("train", 96, 1), ("val", 32, 2), ("test", 40, 3))}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    return splits(tmp_path_factory.mktemp("long"))


@pytest.fixture(scope="module")
def middle(tmp_path_factory) -> dict[str, Path]:
    return splits(tmp_path_factory.mktemp("middle"), middle=True)


def train(tmp: Path, name: str, data: dict[str, Path], mode: str, nproc: int = 1, micro: int = 8) -> runner.Run:
    run = runner.train(tmp, name, nproc=nproc, overrides=[
        f"data.train_file={data['train']}", f"data.val_file={data['val']}", f"data.test_file={data['test']}",
        "data.max_length=32", f"data.long_texts={mode}", "train.epochs=3", f"train.micro_batch_size={micro}",
        "eval.every_steps=12", "early_stopping.enabled=false"])
    assert run.ok, run.output()
    return run


def test_fit_keeps_the_first_tokens_or_the_head_and_the_tail():
    ids = list(range(100))
    assert fit(ids, 10) == list(range(10)) and fit(ids[:7], 10) == ids[:7]
    assert fit(ids, 10, "head_tail") == [0, 1] + list(range(92, 100))  # a quarter of 10 at the head: 2
    assert fit(ids, 10, "head_tail", head=3) == [0, 1, 2] + list(range(93, 100))
    assert fit(ids[:10], 10, "head_tail") == ids[:10]
    assert describe(32, "head_tail") == "their first 8 and last 24 tokens"
    assert describe(32) == "their first 32 tokens"


def test_windows_cover_every_token_with_the_stride_apart():
    ids = list(range(10))
    assert windows(ids, 4, 3) == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]
    assert windows(list(range(9)), 4, 2) == [[0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 6, 7], [5, 6, 7, 8]]  # last: the end
    assert windows(ids[:4], 4) == [ids[:4]] and windows(ids, 4) == windows(ids, 4, 3)  # default: 3/4 of 4
    assert windows(ids, 10) == [ids]


def test_head_tokens_is_checked_against_the_mode_and_max_length():
    with pytest.raises(ConfigError, match="data.head_tokens: only used with data.long_texts=head_tail"):
        from_dict({"data": {"head_tokens": 4}})
    with pytest.raises(ConfigError, match="data.head_tokens: 32 must be at least 1 and below data.max_length"):
        from_dict({"data": {"long_texts": "head_tail", "head_tokens": 32, "max_length": 32}})
    with pytest.raises(ConfigError, match="data.long_texts"):
        from_dict({"data": {"long_texts": "middle"}})
    with pytest.raises(ConfigError, match="data.chunk_stride: only used with data.long_texts=chunk"):
        from_dict({"data": {"chunk_stride": 4}})
    with pytest.raises(ConfigError, match="data.chunk_stride: 40 must be at least 1 and at most data.max_length"):
        from_dict({"data": {"long_texts": "chunk", "chunk_stride": 40, "max_length": 32}})
    with pytest.raises(ConfigError, match="windows of text pairs are not supported"):
        from_dict({"data": {"long_texts": "chunk", "train_file": "t.csv", "text_pair_column": "b"}})


@pytest.mark.slow
def test_head_tail_reads_the_ending_that_truncate_never_sees(data, tmp_path):
    assert len(encode(long_text(random.Random(0), "urgent"))) > 100
    cut = train(tmp_path, "truncate", data, "truncate")
    kept = train(tmp_path, "head_tail", data, "head_tail")
    assert "truncated to their first 8 and last 24 tokens: 96 of 96 train" in kept.proc.stderr
    truncated_acc, head_tail_acc = cut.summary()["test"]["accuracy"], kept.summary()["test"]["accuracy"]
    assert truncated_acc <= 0.7 < 0.95 <= head_tail_acc, (truncated_acc, head_tail_acc)

    # predict on the export cuts texts as training did, and agrees with the run's own test evaluation
    info = json.loads((kept.dir / "export" / "model_config.json").read_text())
    assert info["long_texts"] == "head_tail" and info["max_length"] == 32
    clf = Classifier.load(kept.dir)
    texts = [line.rsplit(",", 1) for line in data["test"].read_text().splitlines()[1:]]
    predictions = clf.predict([t for t, _ in texts])
    accuracy = sum(p.label == label for p, (_, label) in zip(predictions, texts)) / len(texts)
    assert accuracy == pytest.approx(head_tail_acc) and all(p.truncated for p in predictions)

    proc = subprocess.run([sys.executable, "-m", "dist_finetune.evaluate", "--run", str(kept.dir), "--data",
                           str(data["test"]), "--out", str(tmp_path / "eval" / "t.json")], cwd=runner.REPO,
                          env=runner.child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "eval" / "t.json").read_text())["accuracy"] == pytest.approx(head_tail_acc)

    proc = subprocess.run([sys.executable, "-m", "dist_finetune.predict", "--model", str(kept.dir), texts[0][0]],
                          cwd=runner.REPO, env=runner.child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "cut to their first 8 and last 24 tokens, as in training" in proc.stderr

    proc = subprocess.run([sys.executable, "-m", "dist_finetune.export", "--run", str(kept.dir), "--format", "hf",
                           "--out", str(tmp_path / "hf")], cwd=runner.REPO, env=runner.child_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "data.long_texts=head_tail" in proc.stdout, proc.stderr


@pytest.mark.slow
def test_chunk_reads_the_middle_that_head_tail_never_sees_on_one_and_two_ranks(middle, tmp_path):
    kept = train(tmp_path, "head_tail", middle, "head_tail")
    chunked = train(tmp_path, "chunk", middle, "chunk")
    assert "long texts: windows of 32 tokens, 24 apart: train 96 texts -> 480 windows" in chunked.proc.stdout
    summary = chunked.summary()
    assert summary["windows"] == {"train": 480, "val": 160, "test": 200} and summary["test"]["examples"] == 40
    head_tail_acc, chunk_acc = kept.summary()["test"]["accuracy"], summary["test"]["accuracy"]
    assert head_tail_acc <= 0.7 < 0.95 <= chunk_acc, (head_tail_acc, chunk_acc)

    # two ranks: windows of one text on both ranks, scored from all of them (gathered in dataset order)
    two = train(tmp_path, "chunk2", middle, "chunk", nproc=2, micro=4)
    for split in ("val", "test"):
        assert two.summary()[split]["confusion_matrix"] == summary[split]["confusion_matrix"], split
        assert two.summary()[split]["loss"] == pytest.approx(summary[split]["loss"], rel=1e-4), split

    # predict on the export scores each text from its windows, as evaluation did
    info = json.loads((chunked.dir / "export" / "model_config.json").read_text())
    assert info["long_texts"] == "chunk" and info["chunk_aggregate"] == "mean"
    rows = [line.rsplit(",", 1) for line in middle["test"].read_text().splitlines()[1:]]
    predictions = Classifier.load(chunked.dir).predict([t for t, _ in rows])
    assert sum(p.label == label for p, (_, label) in zip(predictions, rows)) / len(rows) == pytest.approx(chunk_acc)
    assert not any(p.truncated for p in predictions)

    out = tmp_path / "eval" / "t.json"
    proc = subprocess.run([sys.executable, "-m", "dist_finetune.evaluate", "--run", str(chunked.dir), "--data",
                           str(middle["test"]), "--out", str(out)], cwd=runner.REPO, env=runner.child_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["examples"] == 40 and result["loss"] == pytest.approx(summary["test"]["loss"], rel=1e-6)
