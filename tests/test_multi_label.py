"""task: multi_label — zero or more labels per text (cells joined by |, or JSON lists in JSONL) through training
on 1 and 2 ranks, exact gathered evaluation, tuned thresholds, the reports, evaluate, predict and both exports."""
from __future__ import annotations

import csv
import json
import random
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

import runner
from dist_finetune import Classifier
from dist_finetune.config import ConfigError, from_dict
from dist_finetune.multilabel import metrics, tune_thresholds

TOPICS = {"sports": ["match", "goal", "team"], "money": ["price", "bank", "pay"], "travel": ["flight", "hotel", "trip"]}
FILLER = "the a we will see you then today later ok".split()


def make_rows(rows: int, seed: int) -> list[tuple[str, list[str]]]:
    """A topic's word in the text means its label; some texts have none, some several."""
    rng = random.Random(seed)
    table = []
    for _ in range(rows):
        chosen = [t for t in TOPICS if rng.random() < 0.4]
        words = [rng.choice(FILLER) for _ in range(6)] + [rng.choice(TOPICS[t]) for t in chosen]
        rng.shuffle(words)
        table.append((" ".join(words), chosen))
    return table


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("ml")
    paths = {}
    for split, rows, seed in (("train", 256, 1), ("val", 64, 2), ("test", 64, 3)):
        paths[split] = tmp / f"{split}.csv"
        with paths[split].open("w", newline="") as f:
            csv.writer(f).writerows([("text", "tags"), *((t, "|".join(ls)) for t, ls in make_rows(rows, seed))])
        paths[f"{split}_jsonl"] = tmp / f"{split}.jsonl"
        paths[f"{split}_jsonl"].write_text("".join(json.dumps({"text": t, "tags": ls}) + "\n"
                                                   for t, ls in make_rows(rows, seed)))
    return paths


def overrides(data: dict[str, Path], suffix: str = "") -> list[str]:
    return ["task=multi_label", f"data.train_file={data['train' + suffix]}", f"data.val_file={data['val' + suffix]}",
            f"data.test_file={data['test' + suffix]}", "data.label_column=tags", "train.epochs=4",
            "eval.every_steps=32", "early_stopping.metric=val_micro_f1", "eval.tune_thresholds=true"]


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> runner.Run:
    run = runner.train(tmp_path_factory.mktemp("ml_run"), "run",
                       overrides=[*overrides(data), "checkpoint.export_formats=[native, hf]"])
    assert run.ok, run.output()
    return run


def test_metrics_count_every_label_decision():
    logits = torch.tensor([[2.0, -2.0, 0.1], [-1.0, 3.0, -3.0], [0.5, 0.5, 0.5], [-4.0, -4.0, -4.0]],
                          dtype=torch.float64)
    targets = torch.tensor([[1, 0, 0], [0, 1, 1], [1, 1, 0], [0, 0, 0]], dtype=torch.float64)
    r = metrics(logits, targets, ["a", "b", "c"], [0.5, 0.5, 0.5])
    # decisions: [1,0,1] [0,1,0] [1,1,1] [0,0,0] -> tp 4, fp 2, fn 1
    assert r["micro"]["precision"] == pytest.approx(4 / 6) and r["micro"]["recall"] == pytest.approx(4 / 5)
    assert r["subset_accuracy"] == pytest.approx(1 / 4) and r["hamming_loss"] == pytest.approx(3 / 12)
    assert [p["support"] for p in r["per_label"]] == [2, 2, 1]
    assert r["per_label"][2]["f1"] == 0.0 and r["macro_f1"] == pytest.approx((1 + 1 + 0) / 3)
    probabilities = torch.tensor([[0.30], [0.35], [0.10], [0.12]], dtype=torch.float64)
    truth = torch.tensor([[1.0], [1.0], [0.0], [0.0]], dtype=torch.float64)
    # F1 is 1 for every grid threshold from 0.15 to 0.30; the tie goes to the one nearest 0.5
    assert tune_thresholds(torch.logit(probabilities), truth) == [0.3]
    assert tune_thresholds(logits, targets)[2] == 0.5  # c's one positive (p 0.047) is below the grid: F1 0 for all


def test_balanced_class_weights_become_per_label_positive_weights():
    from dist_finetune.loss import class_weights

    rows = [[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]
    assert class_weights("balanced", rows, ["a", "b", "c"], multi_label=True) == [1 / 3, 3.0, 1.0]  # c: no positive
    assert class_weights([1.0, 2.0, 3.0], rows, ["a", "b", "c"], multi_label=True) == [1.0, 2.0, 3.0]
    with pytest.raises(ConfigError, match="2 weights given but the training data has 3 classes"):
        class_weights([1.0, 2.0], rows, ["a", "b", "c"], multi_label=True)


def test_parquet_list_cells_are_label_sets(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dist_finetune.config import DataConfig
    from dist_finetune.data import load_data

    table = pa.table({"text": ["a b", "c d", "e f", "g h"], "tags": [["money"], ["travel", "money"], [], ["travel"]]})
    pq.write_table(table, tmp_path / "t.parquet")
    cfg = DataConfig(train_file=str(tmp_path / "t.parquet"), val_file=str(tmp_path / "t.parquet"), label_column="tags")
    bundle = load_data(cfg, context_length=128, task="multi_label")
    assert bundle.label_map.labels == ("money", "travel")
    assert bundle.train.labels == [[1.0, 0.0], [1.0, 1.0], [0.0, 0.0], [0.0, 1.0]]


def test_config_checks_for_multi_label():
    with pytest.raises(ConfigError, match="has one label per text"):
        from_dict({"task": "multi_label"})
    with pytest.raises(ConfigError, match="val_micro_f1 is not a metric of task=single_label"):
        from_dict({"early_stopping": {"metric": "val_micro_f1"}})
    with pytest.raises(ConfigError, match="eval.threshold: must be between 0 and 1"):
        from_dict({"task": "multi_label", "data": {"train_file": "t.csv"}, "eval": {"threshold": 1.5}})
    with pytest.raises(ConfigError, match="only task=multi_label decides labels by thresholds"):
        from_dict({"eval": {"tune_thresholds": True}})


@pytest.mark.slow
def test_multi_label_trains_tunes_reports_and_every_command_agrees(trained, data, tmp_path):
    summary = trained.summary()
    test = summary["test"]
    assert summary["labels"] == ["money", "sports", "travel"] and test["examples"] == 64
    assert test["micro_f1"] > 0.9 and test["subset_accuracy"] > 0.8, test
    assert len(summary["thresholds"]) == 3 and all(0 < t < 1 for t in summary["thresholds"])
    assert [p["threshold"] for p in test["per_label"]] == summary["thresholds"]
    assert all("val_micro_f1" in e and e["val_accuracy"] is None for e in trained.events("eval"))
    last = trained.events("train")[-1]
    assert last["examples_seen"] == 8 * last["step"]  # texts, not labels: micro-batch 8 on one rank
    assert "val_micro_f1" in (trained.dir / "history.csv").read_text().splitlines()[0]
    assert "| split | examples | loss | micro F1 |" in (trained.dir / "report.md").read_text()

    info = json.loads((trained.dir / "export" / "model_config.json").read_text())
    assert info["task"] == "multi_label" and info["thresholds"] == summary["thresholds"]
    with data["test"].open(newline="") as f:
        rows = list(csv.DictReader(f))
    predictions = Classifier.load(trained.dir).predict([r["text"] for r in rows])
    exact = sum(sorted(p.labels) == sorted(filter(None, r["tags"].split("|"))) for p, r in zip(predictions, rows))
    assert exact / len(rows) == pytest.approx(test["subset_accuracy"])

    out = tmp_path / "pred.csv"
    proc = subprocess.run([sys.executable, "-m", "dist_finetune.predict", "--model", str(trained.dir), "--input",
                           str(data["test"]), "--output", str(out)], cwd=runner.REPO, env=runner.child_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    written = pd.read_csv(out, keep_default_na=False)
    assert written["predicted_labels"].tolist() == ["|".join(p.labels) for p in predictions]

    report = tmp_path / "e" / "t.json"
    proc = subprocess.run([sys.executable, "-m", "dist_finetune.evaluate", "--run", str(trained.dir), "--data",
                           str(data["test"]), "--out", str(report)], cwd=runner.REPO, env=runner.child_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(report.read_text())["micro_f1"] == pytest.approx(test["micro_f1"])

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = trained.dir / "export_hf"
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    assert model.config.problem_type == "multi_label_classification"
    texts = [r["text"] for r in rows[:6]]
    with torch.no_grad():
        theirs = torch.sigmoid(model(**AutoTokenizer.from_pretrained(folder)(texts, padding=True,
                                                                             return_tensors="pt")).logits)
    for row, p in zip(theirs.tolist(), predictions[:6]):
        assert row == pytest.approx([p.probabilities[label] for label in summary["labels"]], abs=1e-5)


@pytest.mark.slow
def test_two_ranks_on_json_lists_give_what_one_rank_gives(trained, data, tmp_path):
    two = runner.train(tmp_path, "two", overrides=[*overrides(data, "_jsonl"), "train.micro_batch_size=4",
                                                   "zero.stage=2"], nproc=2)
    assert two.ok, two.output()
    one, many = trained.summary(), two.summary()
    assert many["thresholds"] == one["thresholds"]
    for key in ("micro_f1", "macro_f1", "subset_accuracy", "hamming_loss"):
        assert many["test"][key] == pytest.approx(one["test"][key], abs=1e-9), key
    assert many["test"]["loss"] == pytest.approx(one["test"]["loss"], rel=1e-3)


@pytest.mark.parametrize("content,words", [
    ("text,tags\nhi,money||travel\n", ["row 1", "empty label between"]),
    ('{"text": "hi", "tags": ["money|x"]}\n', ["row 1", "holds data.label_separator"]),
    ("text,tags\nhi,money | travel\n", ["'money '", "differ only in case or surrounding spaces"]),
])
def test_bad_label_cells_are_one_line(tmp_path, content, words):
    suffix = ".jsonl" if content.startswith("{") else ".csv"
    train = tmp_path / f"train{suffix}"
    good_rows = '{"text": "ok", "tags": ["money"]}\n' * 8 if suffix == ".jsonl" else "ok,money\n" * 8
    train.write_text(content + good_rows)
    run = runner.train(tmp_path, "bad", overrides=["task=multi_label", f"data.train_file={train}",
                                                   f"data.val_file={train}", "data.label_column=tags"])
    assert run.proc.returncode == 2, run.output()
    error = [line for line in run.proc.stderr.splitlines() if line.startswith("error")]
    assert len(error) == 1 and all(w in error[0] for w in words), run.proc.stderr


def test_an_unknown_label_in_validation_names_its_row(tmp_path):
    train, val = tmp_path / "train.csv", tmp_path / "val.csv"
    train.write_text("text,tags\n" + "a b,money\nc d,travel|money\n" * 8)
    val.write_text("text,tags\nx,money\ny,travel|sports\n")
    run = runner.train(tmp_path, "bad", overrides=["task=multi_label", f"data.train_file={train}",
                                                   f"data.val_file={val}", "data.label_column=tags"])
    assert run.proc.returncode == 2 and "row 2" in run.proc.stderr and "'sports'" in run.proc.stderr, run.output()
