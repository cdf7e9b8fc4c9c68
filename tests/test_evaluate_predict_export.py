"""Using a finetuned model: the evaluate, predict and export commands, the run report, class imbalance.

One short tiny run (module fixture) serves most tests; the commands run as real processes.
"""
from __future__ import annotations

import csv
import json
import subprocess
import sys
import pandas as pd
import pytest

import runner
from dist_finetune import Classifier, evaluate, export, predict
from dist_finetune.checkpoint import read_pointer
from dist_finetune.config import DataConfig
from dist_finetune.data import load_data
from dist_finetune.weights import load_export

PNG = b"\x89PNG\r\n\x1a\n"
# Obvious messages of the held-out (test) split of the bundled collection, by their first words.
OBVIOUS = {
    "spam": ("You've won tkts to the EURO2004 CUP FINAL", "3 FREE TAROT TEXTS!", 'FREE RING TONE just text "POLYS"'),
    "ham": ("Sir, waiting for your letter.", "Nobody can decide where to eat", "Thank u!"),
}


def cli(module: str, *args: object, nproc: int = 1, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m dist_finetune.<module> ARGS`, or under torchrun (`--` keeps torchrun off `--run`)."""
    sep = ["--"] if nproc > 1 else []
    cmd = [*runner.launcher(nproc), "-m", f"dist_finetune.{module}", *sep, *map(str, args)]
    return subprocess.run(cmd, cwd=runner.REPO, env=runner.child_env(), capture_output=True, text=True,
                          timeout=timeout)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-5000:]}"
    return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> runner.Run:
    tmp = tmp_path_factory.mktemp("trained")
    run = runner.train(tmp, "run", overrides=["train.max_steps=60", "eval.every_steps=20", "report.plots=true"])
    assert run.ok, run.output()
    return run


@pytest.fixture(scope="module")
def evaluated(trained) -> tuple[dict, subprocess.CompletedProcess]:
    proc = ok(cli("evaluate", "--run", trained.dir))
    return json.loads((trained.dir / "eval" / "test.json").read_text()), proc


@pytest.fixture(scope="module")
def other_arch(tmp_path_factory) -> runner.Run:
    tmp = tmp_path_factory.mktemp("other")
    run = runner.train(tmp, "narrow", overrides=["model.n_embd=32", "train.max_steps=1", "checkpoint.export=false"])
    assert run.ok, run.output()
    return run


def by_hand(cm: list[list[int]]) -> tuple[list[dict], dict, dict]:
    """Per-class precision / recall / F1 / support, macro and weighted means, straight from the counts."""
    n = len(cm)
    rows = []
    for c in range(n):
        tp, predicted, support = cm[c][c], sum(cm[r][c] for r in range(n)), sum(cm[c])
        p, r = (tp / predicted if predicted else 0.0), (tp / support if support else 0.0)
        rows.append({"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0, "support": support})
    mean = lambda w: {k: sum(wi * row[k] for wi, row in zip(w, rows)) / sum(w) for k in ("precision", "recall", "f1")}
    return rows, mean([1] * n), mean([row["support"] for row in rows])


# ---------------------------------------------------------------- evaluate


def test_evaluate_reproduces_the_run_summary(trained, evaluated):
    result, proc = evaluated
    test = trained.summary()["test"]
    assert result["accuracy"] == test["accuracy"] and result["examples"] == test["examples"] == 300
    assert result["loss"] == pytest.approx(test["loss"], rel=1e-6)
    assert result["confusion_matrix"] == test["confusion_matrix"] and result["per_class"] == test["per_class"]
    assert result["labels"] == ["ham", "spam"] and result["split"] == "test" and result["world_size"] == 1
    assert result["checkpoint"].endswith(read_pointer(trained.dir, "best"))
    assert "macro avg" in proc.stdout and "confusion matrix" in proc.stdout
    assert (trained.dir / "eval" / "confusion_test.png").read_bytes()[:8] == PNG


def test_per_class_numbers_match_a_hand_computation(evaluated):
    result, _ = evaluated
    cm = result["confusion_matrix"]
    assert sum(map(sum, cm)) == result["examples"]
    assert result["accuracy"] == sum(cm[i][i] for i in range(len(cm))) / result["examples"]
    rows, macro, weighted = by_hand(cm)
    for label, entry, row in zip(result["labels"], result["per_class"], rows):
        assert entry["label"] == label and entry["support"] == row["support"]
        for key in ("precision", "recall", "f1"):
            assert entry[key] == pytest.approx(row[key], rel=1e-12), (label, key)
    for key in ("precision", "recall", "f1"):
        assert result["macro"][key] == pytest.approx(macro[key], rel=1e-12)
        assert result["weighted"][key] == pytest.approx(weighted[key], rel=1e-12)


@pytest.mark.slow
def test_one_and_two_ranks_agree(trained, evaluated, tmp_path):
    one, _ = evaluated
    ok(cli("evaluate", "--run", trained.dir, "--out", tmp_path / "two.json", nproc=2))
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["world_size"] == 2
    for key in ("examples", "accuracy", "confusion_matrix", "per_class", "macro", "weighted"):
        assert two[key] == one[key], key
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-6)


def test_run_report_puts_the_table_and_plots_together(trained):
    d, summary = trained.dir, trained.summary()
    for png in ("loss.png", "accuracy.png", "confusion_test.png"):
        assert (d / png).read_bytes()[:8] == PNG
    report = (d / "report.md").read_text()
    for split in ("train", "val", "test"):
        s = summary[split]
        assert f"| {split} | {s['examples']} | {s['loss']:.4f} | {s['accuracy']:.4f} | {s['macro']['f1']:.4f} |" in report
    for c in summary["test"]["per_class"]:
        assert f"| {c['label']} | {c['precision']:.4f} | {c['recall']:.4f} | {c['f1']:.4f} | {c['support']} |" in report
    for png in ("loss.png", "accuracy.png", "confusion_test.png"):
        assert f"]({png})" in report
    assert set(summary["val"]) >= {"accuracy", "loss", "examples", "macro", "weighted", "per_class", "confusion_matrix"}


# ---------------------------------------------------------------- predict


def obvious_messages() -> list[tuple[str, str]]:
    test = load_data(DataConfig(), context_length=128).test  # the held-out split of the bundled collection
    picked = []
    for label, prefixes in OBVIOUS.items():
        for prefix in prefixes:
            (text,) = [t for t, y in zip(test.texts, test.labels) if t.startswith(prefix) and ["ham", "spam"][y] == label]
            picked.append((text, label))
    return picked


def test_predict_gives_the_labels_evaluation_gets_right(trained, tmp_path):
    messages = obvious_messages()
    handful = tmp_path / "handful.csv"
    pd.DataFrame({"text": [t for t, _ in messages], "label": [y for _, y in messages]}).to_csv(handful, index=False)
    ok(cli("evaluate", "--run", trained.dir, "--data", handful, "--out", tmp_path / "handful.json"))
    result = json.loads((tmp_path / "handful.json").read_text())
    assert result["examples"] == len(messages) and result["data"] == str(handful)
    assert result["accuracy"] == 1.0, result["confusion_matrix"]  # obvious ones: all right

    ok(cli("predict", "--model", trained.dir / "export", "--input", handful, "--output", tmp_path / "pred.csv"))
    out = pd.read_csv(tmp_path / "pred.csv", dtype=str, keep_default_na=False)
    assert out["predicted_label"].tolist() == [y for _, y in messages]
    confusion = [[sum((y, p) == (a, b) for y, p in zip(out["label"], out["predicted_label"])) for b in ("ham", "spam")]
                 for a in ("ham", "spam")]
    assert confusion == result["confusion_matrix"]
    sums = out["prob_ham"].astype(float) + out["prob_spam"].astype(float)
    assert sums.tolist() == pytest.approx([1.0] * len(messages), abs=1e-6)


def test_predict_texts_on_the_command_line_without_deepspeed(trained):
    messages = obvious_messages()
    long_text = "call now " * 60  # > 64 tokens: truncated as in training, and counted
    code = ("import sys; from dist_finetune.predict import main; rc = main(sys.argv[1:]); "
            "print('deepspeed loaded:', 'deepspeed' in sys.modules); sys.exit(rc)")
    proc = ok(subprocess.run(
        [sys.executable, "-c", code, "--model", str(trained.dir / "export"), "--device", "cpu",
         *[t for t, _ in messages], long_text],
        cwd=runner.REPO, env=runner.child_env(), capture_output=True, text=True, timeout=120))
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == "deepspeed loaded: False"
    assert len(lines[:-1]) == len(messages) + 1
    for line, (_, label) in zip(lines, messages):
        fields = line.split("\t")
        assert fields[0] == label and fields[1].startswith("ham=") and fields[2].startswith("spam=")
        assert float(fields[1][4:]) + float(fields[2][5:]) == pytest.approx(1.0, abs=2e-4)  # 4 decimals each
    assert "warning: 1 of 7 text(s) are longer than the model's max_length (64 tokens)" in proc.stderr

    as_json = ok(cli("predict", "--model", trained.dir / "export", "--json", messages[0][0]))
    record = json.loads(as_json.stdout.strip().splitlines()[-1])
    assert record["predicted_label"] == messages[0][1] and record["text"] == messages[0][0]
    assert sum(record["probabilities"].values()) == pytest.approx(1.0, abs=1e-6)


def test_predict_round_trips_a_csv_with_quoting_commas_and_newlines(trained, tmp_path):
    frame = pd.DataFrame({
        "id": ["1", "2", "3"],
        "text": ['He said "hi", then left', "line one\nline two, with a comma", "WIN a FREE prize, txt 80086"],
        "note": ["a,b", '"quoted"', "multi\nline"],
    })
    frame.to_csv(tmp_path / "in.csv", index=False, quoting=csv.QUOTE_MINIMAL)
    ok(cli("predict", "--model", trained.dir / "export", "--input", tmp_path / "in.csv", "--text-column", "text",
           "--output", tmp_path / "out.csv"))
    back = pd.read_csv(tmp_path / "out.csv", dtype=str, keep_default_na=False)
    assert list(back.columns) == ["id", "text", "note", "predicted_label", "prob_ham", "prob_spam"]
    assert back[["id", "text", "note"]].equals(frame)
    direct = Classifier.load(trained.dir / "export", device="cpu").predict(frame["text"].tolist())
    assert back["predicted_label"].tolist() == [p.label for p in direct]
    spam = [p.probabilities["spam"] for p in direct]
    assert back["prob_spam"].astype(float).tolist() == pytest.approx(spam, abs=1e-7)


# ---------------------------------------------------------------- export


def test_export_command_equals_the_runs_own_export(trained, tmp_path):
    ok(cli("export", "--run", trained.dir, "--out", tmp_path / "again"))
    mine, labels = load_export(tmp_path / "again")
    own, own_labels = load_export(trained.dir / "export")
    assert labels == own_labels == ["ham", "spam"]
    runner.assert_same_weights(mine.state_dict(), own.state_dict(), fp32=True)
    config = json.loads((tmp_path / "again" / "model_config.json").read_text())
    assert config == json.loads((trained.dir / "export" / "model_config.json").read_text())
    assert (config["tokenizer"], config["pad_id"], config["max_length"]) == ("gpt2", 50256, 64)


def test_export_command_replaces_an_export_only_with_overwrite(trained, tmp_path, capsys):
    out = tmp_path / "again"
    assert export.main(["--run", str(trained.dir), "--out", str(out)]) == 0
    (out / "labels.json").write_text('["old", "labels"]\n')
    assert export.main(["--run", str(trained.dir), "--out", str(out)]) == 2
    assert "already holds an export" in capsys.readouterr().err
    assert export.main(["--run", str(trained.dir), "--out", str(out), "--overwrite"]) == 0
    assert load_export(out)[1] == ["ham", "spam"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]  # no temporary folder left behind


def test_evaluate_replaces_its_own_report_only_with_overwrite(trained, evaluated):
    report = trained.dir / "eval" / "test.json"
    report.write_text(json.dumps({**evaluated[0], "accuracy": -1.0}))
    again = cli("evaluate", "--run", trained.dir)
    assert again.returncode == 2 and f"{report} already exists" in again.stderr and "--overwrite" in again.stderr
    assert json.loads(report.read_text())["accuracy"] == -1.0
    ok(cli("evaluate", "--run", trained.dir, "--overwrite"))
    assert json.loads(report.read_text())["accuracy"] == evaluated[0]["accuracy"]
    assert (trained.dir / "eval" / "confusion_test.png").read_bytes()[:8] == PNG
    assert sorted(p.name for p in report.parent.iterdir()) == ["confusion_test.png", "test.json"]


@pytest.mark.slow
def test_export_from_zero2_and_zero3_checkpoints_of_two_ranks(tmp_path):
    common = ["train.max_steps=4", "train.micro_batch_size=4", "model.trainable=last_block",
              "early_stopping.enabled=false"]
    exported = {}
    for stage in (2, 3):
        run = runner.train(tmp_path, f"z{stage}", nproc=2, overrides=[*common, f"zero.stage={stage}"])
        assert run.ok, run.output()
        folder = run.dir / "checkpoints" / read_pointer(run.dir, "best")
        ok(cli("export", "--run", run.dir, "--checkpoint", folder, "--out", tmp_path / f"export{stage}"))
        exported[stage] = load_export(tmp_path / f"export{stage}")[0].state_dict()
        runner.assert_same_weights(exported[stage], load_export(run.dir / "export")[0].state_dict(), fp32=True)
    runner.assert_same_weights(exported[2], exported[3], atol=1e-5, fp32=True)


# ---------------------------------------------------------------- class imbalance


def test_full_imbalanced_sms_with_balanced_class_weights(tmp_path):
    run = runner.train(tmp_path, "imbalanced", overrides=[
        "train.max_steps=30", "data.balance=none", "loss.class_weights=balanced"])
    assert run.ok, run.output()
    summary = run.summary()
    train_labels = load_data(DataConfig(balance="none"), context_length=128).train.labels
    n, spam = len(train_labels), sum(train_labels)
    assert summary["class_weights"] == pytest.approx([n / (2 * (n - spam)), n / (2 * spam)])
    assert summary["train"]["examples"] == 3900 and summary["test"]["examples"] == 1115
    per_class = {c["label"]: c for c in summary["test"]["per_class"]}
    assert set(per_class) == {"ham", "spam"}
    assert per_class["ham"]["support"] + per_class["spam"]["support"] == 1115
    assert per_class["spam"]["support"] < 0.2 * 1115 and per_class["spam"]["f1"] > 0
    report = (run.dir / "report.md").read_text()
    assert "| spam |" in report and "Training loss weighted by class" in report


def test_class_weights_of_the_wrong_length_stop_before_training(tmp_path):
    run = runner.train(tmp_path, "bad", overrides=["loss.class_weights=[1, 2, 3]"])
    assert run.proc.returncode == 2
    assert "loss.class_weights" in run.proc.stderr and "2 classes" in run.proc.stderr
    assert "Traceback" not in run.proc.stderr and not (run.dir / "checkpoints").exists()


# ---------------------------------------------------------------- bad input


def one_line_error(rc: int, stderr: str, *words: str) -> None:
    assert rc == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for word in words:
        assert word in lines[0], (word, lines[0])


def test_missing_run_folder_is_one_line_from_a_real_process(tmp_path):
    proc = cli("evaluate", "--run", tmp_path / "nowhere")
    one_line_error(proc.returncode, proc.stderr, str(tmp_path / "nowhere"), "not found", "--run")


def test_bad_input_is_one_line_naming_the_fix(trained, other_arch, tmp_path, capsys):
    no_label = tmp_path / "no_label.csv"
    no_label.write_text("text\nhello\n")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    no_text = tmp_path / "no_text.csv"
    no_text.write_text("message\nhello\n")
    foreign = other_arch.dir / "checkpoints" / read_pointer(other_arch.dir, "latest")
    export_dir = str(trained.dir / "export")
    cases = [
        (evaluate.main, ["--run", str(tmp_path / "missing")], ["missing", "not found", "--run"]),
        (export.main, ["--run", str(tmp_path), "--out", str(tmp_path / "x")], ["no config.yaml", "--run"]),
        (evaluate.main, ["--run", str(trained.dir), "--checkpoint", str(foreign), "--out", str(tmp_path / "f.json")],
         [str(foreign), "does not fit", "n_embd=32", "--run"]),
        (export.main, ["--run", str(trained.dir), "--checkpoint", str(foreign), "--out", str(tmp_path / "y")],
         ["does not fit", "--run"]),
        (evaluate.main, ["--run", str(trained.dir), "--data", str(no_label)], ["no column 'label'", "--label-column"]),
        (evaluate.main, ["--run", str(trained.dir), "--data", str(empty)], [str(empty), "empty"]),
        (predict.main, ["--model", export_dir, "--input", str(no_text), "--output", str(tmp_path / "o.csv")],
         ["no column 'text'", "--text-column"]),
        (predict.main, ["--model", export_dir, "--input", str(empty)], [str(empty), "empty"]),
        (predict.main, ["--model", str(tmp_path / "nomodel"), "hello"], ["not found", "export"]),
        (predict.main, ["--model", str(other_arch.dir), "hello"],  # a run folder without its export
         [f"{other_arch.dir} (", f"{other_arch.dir / 'export'} (not found)", "training to finish",
          f"dist_finetune.export --run {other_arch.dir}"]),
    ]
    for main, argv, words in cases:
        rc = main(argv)
        one_line_error(rc, capsys.readouterr().err, *words)
    assert not (tmp_path / "o.csv").exists() and not (tmp_path / "x").exists()
