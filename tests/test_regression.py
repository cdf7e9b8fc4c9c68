"""task: regression — numeric targets (two columns here) through training on 1 and 2 ranks (ZeRO 0 and 3),
exact evaluation, early stopping on val_rmse, the reports, evaluate, predict and both exports."""
from __future__ import annotations

import csv
import math
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
from dist_finetune.regression import TargetScale, metrics

SCORES = {"superb": 6, "great": 5, "good": 3, "nice": 2, "fine": 1, "okay": 0, "poor": -2, "bad": -3, "awful": -5,
          "terrible": -6}


def write_split(path: Path, rows: int, seed: int) -> list[tuple[str, float, float]]:
    """The last word decides both targets: rating = 10 + 1.5 x score, delta = -score / 2."""
    rng = random.Random(seed)
    table = []
    for _ in range(rows):
        words = [rng.choice(list(SCORES)) for _ in range(4)]
        table.append((" ".join(words), 10 + 1.5 * SCORES[words[-1]], -SCORES[words[-1]] / 2))
    runner.write_csv(path, ("text", "rating", "delta"), table)
    return table


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    return runner.split_files(tmp_path_factory.mktemp("reg"), write_split, (256, 64, 64))


def overrides(data: dict[str, Path]) -> list[str]:
    return ["task=regression", *runner.split_overrides(data), "data.label_column=[rating, delta]", "train.epochs=3",
            "eval.every_steps=32", "early_stopping.metric=val_rmse", "report.plots=true",
            "checkpoint.export_formats=[native, hf]"]


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> runner.Run:
    run = runner.train(tmp_path_factory.mktemp("reg_run"), "run", overrides=overrides(data))
    assert run.ok, run.output()
    return run


def test_metrics_match_pandas_and_numpy():
    torch.manual_seed(0)
    true = torch.randn(50, 2, dtype=torch.float64)
    predicted = true + 0.3 * torch.randn(50, 2, dtype=torch.float64)
    predicted[:5, 0] = predicted[0, 0]  # ties, for Spearman's average ranks
    scale = TargetScale(("a", "b"), (10.0, -1.0), (2.0, 0.5))
    result = metrics(predicted, true, scale)
    p, y = scale.to_units(predicted), scale.to_units(true)
    for k, name in enumerate(("a", "b")):
        t = result["per_target"][k]
        frame = pd.DataFrame({"p": p[:, k].numpy(), "y": y[:, k].numpy()})
        assert t["target"] == name and t["mse"] == pytest.approx(((frame.p - frame.y) ** 2).mean())
        assert t["mae"] == pytest.approx((frame.p - frame.y).abs().mean())
        assert t["r2"] == pytest.approx(1 - ((frame.p - frame.y) ** 2).sum() / ((frame.y - frame.y.mean()) ** 2).sum())
        assert t["pearson"] == pytest.approx(frame.p.corr(frame.y))
        assert t["spearman"] == pytest.approx(frame.p.corr(frame.y, method="spearman"))
    assert result["rmse"] == pytest.approx(sum(t["rmse"] for t in result["per_target"]) / 2)
    constant = metrics(predicted, torch.zeros_like(true), scale)["per_target"][0]  # a target without variance
    assert math.isnan(constant["r2"]) and math.isnan(constant["pearson"]) and math.isnan(constant["spearman"])


def test_a_saved_dataset_with_float_targets_loads(tmp_path):
    import datasets

    from dist_finetune.config import DataConfig
    from dist_finetune.data import load_data

    rows = {"text": ["good", "bad", "fine", "awful"] * 4, "rating": [3.5, -3.0, 1.25, -5.0] * 4}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows),
                          "validation": datasets.Dataset.from_dict(rows)}).save_to_disk(str(tmp_path / "ds"))
    bundle = load_data(DataConfig(dataset_dir=str(tmp_path / "ds"), label_column="rating"), 128, task="regression")
    assert bundle.label_map.labels == ("rating",) and bundle.scale.mean == pytest.approx((-0.8125,))
    assert len(bundle.train) == 16 and bundle.val is not None


def test_config_refuses_what_regression_cannot_do():
    with pytest.raises(ConfigError, match="bundled SMS Spam Collection has no numeric target"):
        from_dict({"task": "regression"})
    with pytest.raises(ConfigError, match="val_accuracy is not a metric of task=regression"):
        from_dict({"task": "regression", "data": {"train_file": "t.csv"}, "early_stopping": {"metric": "val_accuracy"}})
    with pytest.raises(ConfigError, match="a list of columns .* is for task=regression"):
        from_dict({"data": {"train_file": "t.csv", "label_column": ["a", "b"]}})
    with pytest.raises(ConfigError, match="val_rmse is not a metric of task=single_label"):
        from_dict({"early_stopping": {"metric": "val_rmse"}})


@pytest.mark.slow
def test_regression_trains_reports_and_every_command_agrees(trained, data, tmp_path):
    summary = trained.summary()
    test = summary["test"]
    assert summary["labels"] == ["delta", "rating"] and test["examples"] == 64
    assert test["r2"] > 0.9 and test["spearman"] > 0.9, test
    assert [t["target"] for t in test["per_target"]] == ["delta", "rating"]
    assert test["per_target"][1]["rmse"] == pytest.approx(3 * test["per_target"][0]["rmse"], rel=0.5)  # units
    evals = trained.events("eval")
    assert all("val_rmse" in e and e["val_accuracy"] is None for e in evals)
    assert "val_rmse" in trained.proc.stdout and "done: test rmse" in trained.proc.stdout
    assert (trained.dir / "scatter_test.png").is_file() and not (trained.dir / "accuracy.png").exists()
    assert "| split | examples | loss | RMSE | MAE | R² | Pearson | Spearman |" in (trained.dir / "report.md").read_text()

    info = json.loads((trained.dir / "export" / "model_config.json").read_text())
    assert info["task"] == "regression" and info["targets"]["targets"] == ["delta", "rating"]
    with data["test"].open(newline="") as f:
        rows = list(csv.DictReader(f))
    predictions = Classifier.load(trained.dir).predict([r["text"] for r in rows])
    mse = sum((p.values["rating"] - float(r["rating"])) ** 2 for p, r in zip(predictions, rows)) / len(rows)
    assert mse == pytest.approx(test["per_target"][1]["mse"], rel=1e-4)

    out = tmp_path / "pred.csv"
    proc = subprocess.run([sys.executable, "-m", "dist_finetune.predict", "--model", str(trained.dir), "--input",
                           str(data["test"]), "--output", str(out)], cwd=runner.REPO, env=runner.child_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    written = pd.read_csv(out)
    assert written["predicted_rating"].tolist() == pytest.approx([p.values["rating"] for p in predictions], abs=1e-4)

    report = tmp_path / "e" / "t.json"
    proc = subprocess.run([sys.executable, "-m", "dist_finetune.evaluate", "--run", str(trained.dir), "--data",
                           str(data["test"]), "--out", str(report)], cwd=runner.REPO, env=runner.child_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(report.read_text())["rmse"] == pytest.approx(test["rmse"], rel=1e-6)
    assert "pearson" in proc.stdout


@pytest.mark.slow
def test_the_transformers_export_answers_in_the_targets_units(trained):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = trained.dir / "export_hf"
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    assert model.config.problem_type == "regression" and model.config.id2label == {0: "delta", 1: "rating"}
    texts = ["good bad awful superb", "okay", "terrible nice fine great"]
    batch = AutoTokenizer.from_pretrained(folder)(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        theirs = model(**batch).logits
    ours = Classifier.load(trained.dir).predict(texts)
    assert theirs.tolist() == [pytest.approx([p.values["delta"], p.values["rating"]], abs=1e-4) for p in ours]


@pytest.mark.slow
def test_two_ranks_under_zero3_train_and_evaluate_as_one(trained, data, tmp_path):
    two = runner.train(tmp_path, "two", overrides=[*overrides(data), "train.micro_batch_size=4", "zero.stage=3",
                                                   "checkpoint.export_formats=[native]"], nproc=2)
    assert two.ok, two.output()
    one, many = trained.summary()["test"], two.summary()["test"]
    for key in ("mse", "mae", "r2", "pearson", "spearman"):
        assert many[key] == pytest.approx(one[key], rel=1e-3, abs=1e-4), key


@pytest.mark.parametrize("cell,words", [("high", ["row 2", "column 'rating'", "is not a number"]),
                                        ("", ["row 2", "column 'rating'", "the target is missing"]),
                                        ("inf", ["row 2", "not a finite number"]),
                                        ("1e200", ["column 'rating'", "too large to standardize"])])
def test_a_bad_target_is_one_line_naming_the_row(tmp_path, cell, words):
    train = tmp_path / "train.csv"
    train.write_text(f"text,rating\nfine,1\nbad,{cell}\n" + "good,3\nok,2\n" * 8)
    run = runner.train(tmp_path, "bad", overrides=["task=regression", f"data.train_file={train}",
                                                   f"data.val_file={train}", "data.label_column=rating"])
    assert run.proc.returncode == 2, run.output()
    error = [line for line in run.proc.stderr.splitlines() if line.startswith("error")]
    assert len(error) == 1 and all(w in error[0] for w in words), run.proc.stderr
