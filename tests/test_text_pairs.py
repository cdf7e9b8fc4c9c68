"""data.text_pair_column: text + blank line + pair, cut longest-first, through training (1 and 2 ranks), evaluate,
predict and the export. The test's set decides the label by the short second text behind a long first one, so a
model that lost the pair (cut at the end of the joined text) could not learn it."""
from __future__ import annotations

import csv
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

import runner
from dist_finetune import Classifier
from dist_finetune.config import ConfigError, from_dict
from dist_finetune.encoding import PAIR_SEPARATOR, fit_example, pair_budgets
from dist_finetune.tokenizer import encode

WORDS = "the report covers the budget the travel plan the office move and the printer".split()
ANSWERS = {"yes": "yes, that is right", "no": "no, that is wrong"}
MAX = "data.max_length=24"


def write_split(path: Path, rows: int, seed: int) -> list[tuple[str, str, str]]:
    """Rows (question, answer, label): a long question, the label in the short answer."""
    rng = random.Random(seed)
    labels = ["yes", "no"] * (rows // 2)
    rng.shuffle(labels)
    table = [(" ".join(rng.choice(WORDS) for _ in range(60)), ANSWERS[label], label) for label in labels]
    runner.write_csv(path, ("question", "answer", "label"), table)
    return table


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    return runner.split_files(tmp_path_factory.mktemp("pairs"), write_split, (64, 16, 24))


def overrides(data: dict[str, Path]) -> list[str]:
    return [*runner.split_overrides(data), "data.text_column=question", "data.text_pair_column=answer", MAX, "train.epochs=3",
            "eval.every_steps=8", "early_stopping.enabled=false"]


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> runner.Run:
    run = runner.train(tmp_path_factory.mktemp("pair_run"), "run", overrides=overrides(data))
    assert run.ok, run.output()
    return run


def test_longest_first_budgets_and_the_separator():
    assert pair_budgets(100, 5, 21) == (16, 5) and pair_budgets(5, 100, 21) == (5, 16)
    assert pair_budgets(100, 100, 21) == (11, 10) and pair_budgets(3, 4, 21) == (3, 4)
    text, pair = list(range(100)), [900, 901, 902]
    assert fit_example(text, pair, 10) == list(range(6)) + list(PAIR_SEPARATOR) + pair
    assert fit_example(text, pair, 10, "head_tail") == [0, 95, 96, 97, 98, 99, 628, 900, 901, 902]  # head: 6 // 4
    assert encode("\n\n") == list(PAIR_SEPARATOR)


def test_the_pair_column_is_checked_in_the_config():
    with pytest.raises(ConfigError, match="bundled SMS Spam Collection has no text pairs"):
        from_dict({"data": {"text_pair_column": "answer"}})
    with pytest.raises(ConfigError, match="data.head_tokens: with text pairs"):
        from_dict({"data": {"train_file": "t.csv", "text_pair_column": "b", "long_texts": "head_tail",
                            "head_tokens": 4}})
    with pytest.raises(ConfigError, match="also data.text_column"):
        from_dict({"data": {"train_file": "t.csv", "text_pair_column": "text"}})
    with pytest.raises(ConfigError, match="hf: a model of text pairs"):
        from_dict({"data": {"train_file": "t.csv", "text_pair_column": "b"}, "model": {"pooling": "last_token"},
                   "checkpoint": {"export_formats": ["native", "hf"]}})


@pytest.mark.slow
def test_the_pair_decides_and_every_command_reads_it(trained, data, tmp_path):
    summary = trained.summary()
    assert summary["test"]["accuracy"] >= 0.95, summary["test"]
    assert "truncated to 24 tokens in all, longest text first, each text keeping its first tokens: 64 of 64 train" \
        in trained.proc.stderr
    info = json.loads((trained.dir / "export" / "model_config.json").read_text())
    assert info["text_pair_column"] == "answer" and info["pair_separator"] == list(PAIR_SEPARATOR)

    with data["test"].open(newline="") as f:
        rows = list(csv.reader(f))[1:]
    questions, answers = [r[0] for r in rows], [r[1] for r in rows]
    clf = Classifier.load(trained.dir)
    predictions = clf.predict(questions, pairs=answers)
    accuracy = sum(p.label == r[-1] for p, r in zip(predictions, rows)) / len(rows)
    assert accuracy == pytest.approx(summary["test"]["accuracy"])
    with pytest.raises(TypeError, match="classifies text pairs"):
        clf.predict(questions)

    out = tmp_path / "pred.csv"
    cmd = [sys.executable, "-m", "dist_finetune.predict", "--model", str(trained.dir), "--input", str(data["test"]),
           "--output", str(out)]  # the text column too is the one the model was trained on
    proc = subprocess.run(cmd, cwd=runner.REPO, env=runner.child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    with out.open(newline="") as f:
        predicted = [row["predicted_label"] for row in csv.DictReader(f)]
    assert predicted == [p.label for p in predictions]

    proc = subprocess.run([sys.executable, "-m", "dist_finetune.evaluate", "--run", str(trained.dir), "--data",
                           str(data["test"]), "--out", str(tmp_path / "e" / "t.json")], cwd=runner.REPO,
                          env=runner.child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "e" / "t.json").read_text())["accuracy"] == pytest.approx(accuracy)

    proc = subprocess.run([sys.executable, "-m", "dist_finetune.predict", "--model", str(trained.dir), "hello"],
                          cwd=runner.REPO, env=runner.child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "classifies text pairs: give --input FILE" in proc.stderr


@pytest.mark.slow
def test_two_ranks_train_the_pairs_as_one_does(trained, data, tmp_path):
    two = runner.train(tmp_path, "two", overrides=[*overrides(data), "train.micro_batch_size=4"], nproc=2)
    assert two.ok, two.output()
    one, many = trained.summary(), two.summary()
    assert many["world_size"] == 2 and many["test"]["confusion_matrix"] == one["test"]["confusion_matrix"]
    assert many["test"]["loss"] == pytest.approx(one["test"]["loss"], rel=1e-4)


@pytest.mark.parametrize("case,words", [
    ("empty pair", ["row 2", "column 'answer'", "the text is empty"]),
    ("no pair column", ["no column 'answer'", "data.text_pair_column"]),
])
def test_bad_pair_input_is_one_line(tmp_path, case, words):
    train = tmp_path / "train.csv"
    if case == "empty pair":
        train.write_text('question,answer,label\nis it,"yes, right",yes\nis it,,no\n' * 4)
    else:
        train.write_text("question,label\nis it,yes\nis it not,no\n" * 4)
    run = runner.train(tmp_path, "bad", overrides=[f"data.train_file={train}", f"data.val_file={train}",
                                                   "data.text_column=question", "data.text_pair_column=answer"])
    assert run.proc.returncode == 2, run.output()
    error = [line for line in run.proc.stderr.splitlines() if line.startswith("error")]
    assert len(error) == 1 and all(w in error[0] for w in words), run.proc.stderr
