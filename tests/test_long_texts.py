"""data.long_texts: truncate (the first tokens) or head_tail (first and last), the same in training, evaluate
and predict. A set the tests make, whose label is written only at the end of long texts, tells them apart."""
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
from dist_finetune.encoding import describe, fit
from dist_finetune.tokenizer import encode

FILLER = ("the meeting notes cover budget travel lunch schedule weather office parking printer coffee report "
          "team project update review plan agenda minutes draft").split()
ENDINGS = {"urgent": "please treat this as urgent and answer today", "later": "no rush at all and answer whenever"}


def long_text(rng: random.Random, label: str) -> str:
    """About 100 filler tokens, then the sentence that decides the label: past any 32-token start."""
    return " ".join(rng.choice(FILLER) for _ in range(100)) + ". " + ENDINGS[label]


def write_split(path: Path, rows: int, seed: int) -> Path:
    rng = random.Random(seed)
    labels = ["urgent", "later"] * (rows // 2)
    rng.shuffle(labels)
    path.write_text("text,label\n" + "".join(f"{long_text(rng, label)},{label}\n" for label in labels))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("long")
    return {split: write_split(tmp / f"{split}.csv", rows, seed)
            for split, rows, seed in (("train", 96, 1), ("val", 32, 2), ("test", 40, 3))}


def train(tmp: Path, name: str, data: dict[str, Path], mode: str) -> runner.Run:
    run = runner.train(tmp, name, overrides=[
        f"data.train_file={data['train']}", f"data.val_file={data['val']}", f"data.test_file={data['test']}",
        "data.max_length=32", f"data.long_texts={mode}", "train.epochs=3", "train.micro_batch_size=8",
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


def test_head_tokens_is_checked_against_the_mode_and_max_length():
    with pytest.raises(ConfigError, match="data.head_tokens: only used with data.long_texts=head_tail"):
        from_dict({"data": {"head_tokens": 4}})
    with pytest.raises(ConfigError, match="data.head_tokens: 32 must be at least 1 and below data.max_length"):
        from_dict({"data": {"long_texts": "head_tail", "head_tokens": 32, "max_length": 32}})
    with pytest.raises(ConfigError, match="data.long_texts"):
        from_dict({"data": {"long_texts": "middle"}})


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
