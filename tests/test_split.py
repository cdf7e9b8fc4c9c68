"""One data file split automatically: stratified, seeded, recorded in RUN/data_split.json, and reused
(not recomputed) by evaluate and resume; train + val without a test split; the bad-input messages."""
from __future__ import annotations

import csv
import json
import random
import subprocess
from collections import Counter
from pathlib import Path

import pytest

import runner
from dist_finetune.config import DataConfig
from dist_finetune.data import load_data
from dist_finetune.splits import SPLIT_FILE, DataSplit, SplitError, cut, file_sha256, read_split, stratified_split

# A learnable toy task: the last word names the class; three classes of different sizes.
KEYWORDS = {"apple": "fruit", "river": "water", "engine": "machine"}
SIZES = {"apple": 40, "river": 30, "engine": 20}
FILLER = "the a of and to in is it you that he was for on are with as I his they be at one have this from".split()
SPLIT = ["data.split=[0.7, 0.1, 0.2]"]


def write_toy_csv(path: Path, seed: int = 0) -> Path:
    rng = random.Random(seed)
    rows = [(" ".join(rng.choices(FILLER, k=6)) + " " + word, KEYWORDS[word])
            for word, n in SIZES.items() for _ in range(n)]
    rng.shuffle(rows)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return path


def cli(module: str, *args: object, nproc: int = 1) -> subprocess.CompletedProcess:
    sep = ["--"] if nproc > 1 else []  # torchrun would read --run as its own --run-path
    cmd = [*runner.launcher(nproc), "-m", f"dist_finetune.{module}", *sep, *map(str, args)]
    return runner.run_to_end(cmd, runner.child_env(), timeout=300)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-5000:]}"
    return proc


def error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def labels_of(path: Path) -> list[str]:
    with path.open(newline="", encoding="utf-8") as f:
        return [row["label"] for row in csv.DictReader(f)]


# ---------------------------------------------------------------- the split itself


def test_cut_gives_every_row_a_part():
    assert cut(10, (0.7, 0.1, 0.2)) == [7, 1, 2]
    assert cut(37, (0.7, 0.1, 0.2)) == [26, 4, 7]  # 25.9 / 3.7 / 7.4: the two rows left go to .9 and .7
    assert cut(3, (0.8, 0.1, 0.1)) == [3, 0, 0]
    assert all(sum(cut(n, (0.6, 0.25, 0.15))) == n for n in range(200))


def test_stratified_split_is_seeded_disjoint_and_stratified():
    labels = ["b"] * 50 + ["a"] * 30 + ["c"] * 7
    random.Random(1).shuffle(labels)
    parts = stratified_split(labels, (0.7, 0.1, 0.2), seed=123)
    assert sorted(i for part in parts for i in part) == list(range(len(labels)))  # every row once
    assert all(part == sorted(part) for part in parts)
    for label, n in Counter(labels).items():
        assert [sum(labels[i] == label for i in part) for part in parts] == cut(n, (0.7, 0.1, 0.2)), label
    assert stratified_split(labels, (0.7, 0.1, 0.2), seed=123) == parts
    assert stratified_split(labels, (0.7, 0.1, 0.2), seed=124) != parts


def test_integer_labels_split_the_same_way_as_their_text():
    texts = [str(i % 3) for i in range(60)]
    assert stratified_split([int(t) for t in texts], (0.5, 0.5), 7) == stratified_split(texts, (0.5, 0.5), 7)


# ---------------------------------------------------------------- load_data with one file


def test_a_train_file_alone_is_split_80_10_10_by_default(tmp_path):
    csv_path = write_toy_csv(tmp_path / "toy.csv")
    bundle = load_data(DataConfig(train_file=str(csv_path)), context_length=128)
    record = bundle.split
    assert record.fractions == (0.8, 0.1, 0.1) and record.seed == 123 and record.rows == 90
    assert record.sha256 == file_sha256(csv_path) and record.file == str(csv_path)
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (72, 9, 9)
    labels = labels_of(csv_path)
    for name in ("train", "val", "test"):
        from_file = Counter(labels[i] for i in record.indices[name])
        in_bundle = Counter(bundle.label_map.from_id(i) for i in getattr(bundle, name).labels)
        assert from_file == in_bundle, name
    assert Counter(labels[i] for i in record.indices["val"]) == {"fruit": 4, "water": 3, "machine": 2}
    again = load_data(DataConfig(train_file=str(csv_path)), context_length=128)
    assert again.split == record and again.test.texts == bundle.test.texts


def test_split_seed_changes_the_rows_not_the_sizes(tmp_path):
    csv_path = write_toy_csv(tmp_path / "toy.csv")
    a = load_data(DataConfig(train_file=str(csv_path), split=(0.7, 0.1, 0.2)), 128).split
    b = load_data(DataConfig(train_file=str(csv_path), split=(0.7, 0.1, 0.2), split_seed=5), 128).split
    assert a.indices != b.indices
    assert [len(rows) for rows in a.indices.values()] == [len(rows) for rows in b.indices.values()] == [63, 9, 18]


def test_two_fractions_and_a_test_file_split_val_off_train(tmp_path):
    csv_path = write_toy_csv(tmp_path / "toy.csv")
    test_path = write_toy_csv(tmp_path / "held_out.csv", seed=9)
    bundle = load_data(DataConfig(train_file=str(csv_path), test_file=str(test_path)), 128)
    assert bundle.split.fractions == (0.9, 0.1) and set(bundle.split.indices) == {"train", "val"}
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (81, 9, 90)
    alone = load_data(DataConfig(train_file=str(csv_path), split=(0.75, 0.25)), 128)
    assert alone.test is None and alone.splits() == ("train", "val") and set(alone.truncated) == {"train", "val"}


def test_train_and_val_files_make_no_test_split(tmp_path):
    csv_path = write_toy_csv(tmp_path / "toy.csv")
    bundle = load_data(DataConfig(train_file=str(csv_path), val_file=str(csv_path)), 128)
    assert bundle.test is None and bundle.split is None and bundle.splits() == ("train", "val")


def test_a_saved_split_is_used_as_recorded_not_recomputed(tmp_path):
    csv_path = write_toy_csv(tmp_path / "toy.csv")
    cfg = DataConfig(train_file=str(csv_path))
    made = load_data(cfg, 128).split
    moved = made.indices["test"][:2]  # two test rows moved to val by hand
    edited = DataSplit(made.file, made.sha256, made.rows, made.fractions, made.seed,
                       {"train": made.indices["train"], "val": tuple(sorted(made.indices["val"] + moved)),
                        "test": made.indices["test"][2:]})
    edited.write(tmp_path)
    saved = read_split(tmp_path)
    assert saved.indices == edited.indices and saved.origin == str(tmp_path / SPLIT_FILE)
    bundle = load_data(cfg, 128, saved)
    assert (len(bundle.val), len(bundle.test)) == (11, 7)
    texts = [row["text"] for row in csv.DictReader(csv_path.open(newline="", encoding="utf-8"))]
    assert bundle.test.texts == [texts[i] for i in edited.indices["test"]]


# ---------------------------------------------------------------- bad input


def test_a_changed_file_is_refused_with_the_record_and_the_fix(tmp_path):
    csv_path = write_toy_csv(tmp_path / "toy.csv")
    cfg = DataConfig(train_file=str(csv_path))
    load_data(cfg, 128).split.write(tmp_path)
    with csv_path.open("a", encoding="utf-8") as f:
        f.write("one more row about an apple,fruit\n")
    with pytest.raises(SplitError) as excinfo:
        load_data(cfg, 128, read_split(tmp_path))
    message = str(excinfo.value)
    for part in ("data.train_file", str(csv_path), "changed", str(tmp_path / SPLIT_FILE), "90 rows", "91 rows",
                 "put the original file back", "--data"):
        assert part in message, (part, message)


def test_a_label_too_small_for_the_fractions_names_data_split_and_the_fix(tmp_path):
    csv_path = tmp_path / "small.csv"
    csv_path.write_text("text,label\n" + "".join(f"ham text {i},ham\n" for i in range(30))
                        + "".join(f"spam text {i},spam\n" for i in range(5)))
    with pytest.raises(SplitError) as excinfo:
        load_data(DataConfig(train_file=str(csv_path)), 128)
    message = str(excinfo.value)
    for part in ("data.split", "[0.8, 0.1, 0.1]", "'spam'", "5 row(s)", str(csv_path), "no rows in the test split",
                 "at least 7 rows", "data.test_file"):
        assert part in message, (part, message)
    load_data(DataConfig(train_file=str(csv_path), split=(0.6, 0.2, 0.2)), 128)  # 5 rows: 3 / 1 / 1


@pytest.mark.timeout(60)
def test_a_tiny_fraction_is_refused_at_once_naming_the_rows_it_needs(tmp_path):
    """A fraction like 1e-9 once made the rows-needed count loop for a billion rows (the run hung before training)."""
    csv_path = write_toy_csv(tmp_path / "toy.csv")
    with pytest.raises(SplitError, match="at least 1000000000 rows"):
        load_data(DataConfig(train_file=str(csv_path), split=(1e-9, 0.5, 0.5 - 1e-9)), 128)


@pytest.mark.parametrize("content, found", [
    (None, "is missing"),
    ("{", "is damaged"),
    (json.dumps({"version": 1, "file": "x.csv", "sha256": "0", "rows": 2, "fractions": [0.5, 0.5], "seed": 1,
                 "indices": {"train": [0, 1], "val": [1]}}), "a row is in two splits"),
    (json.dumps({"version": 1, "file": "x.csv", "sha256": "0", "rows": 2, "fractions": [0.5, 0.5], "seed": 1,
                 "indices": {"train": [0], "val": [5]}}), "row positions below 2"),
    (json.dumps({"version": 1, "file": "x.csv", "sha256": "0", "rows": 3, "fractions": [0.5, 0.5], "seed": 1,
                 "indices": {"train": [0], "val": [1, 2, 1]}}), "a row is twice in val"),
])
def test_a_missing_or_damaged_record_is_one_line_with_the_fix(tmp_path, content, found):
    if content is not None:
        (tmp_path / SPLIT_FILE).write_text(content)
    with pytest.raises(SplitError) as excinfo:
        read_split(tmp_path)
    message = str(excinfo.value)
    assert found in message and str(tmp_path / SPLIT_FILE) in message and "--overwrite" in message, message


# ---------------------------------------------------------------- real runs


BASE = {**runner.TINY, "train": {**runner.TINY["train"], "epochs": 2}}


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return write_toy_csv(tmp_path_factory.mktemp("data") / "toy.csv")


@pytest.fixture(scope="module")
def split_run(tmp_path_factory, toy) -> runner.Run:
    """One process, only data.train_file, split 70/10/20."""
    run = runner.train(tmp_path_factory.mktemp("split"), "run", [f"data.train_file={toy}", *SPLIT], base=BASE)
    assert run.ok, run.output()
    return run


def test_the_split_is_written_and_evaluate_reproduces_the_test_metrics(split_run, toy):
    record = read_split(split_run.dir)
    assert record.sha256 == file_sha256(toy) and record.fractions == (0.7, 0.1, 0.2)
    assert [len(record.indices[name]) for name in ("train", "val", "test")] == [63, 9, 18]
    summary = split_run.summary()
    assert (summary["train"]["examples"], summary["val"]["examples"], summary["test"]["examples"]) == (63, 9, 18)
    assert summary["test"]["accuracy"] > 0.6  # learnable: chance is 0.44
    for split in ("test", "val"):
        ok(cli("evaluate", "--run", split_run.dir, "--split", split))
        result = json.loads((split_run.dir / "eval" / f"{split}.json").read_text())
        for key in ("accuracy", "loss", "examples", "confusion_matrix", "per_class", "macro"):
            assert result[key] == summary[split][key], (split, key)


def test_evaluate_refuses_a_file_changed_since_the_split(split_run, toy, tmp_path):
    original = toy.read_bytes()
    try:
        toy.write_bytes(original.replace(b"apple", b"pear", 1))
        line = error_line(cli("evaluate", "--run", split_run.dir, "--split", "test", "--out", tmp_path / "t.json"))
    finally:
        toy.write_bytes(original)
    for part in ("data.train_file", str(toy), "changed", str(split_run.dir / SPLIT_FILE), "--data"):
        assert part in line, (part, line)
    assert not (tmp_path / "t.json").exists()


def test_resume_reuses_the_saved_split(tmp_path, toy):
    overrides = [f"data.train_file={toy}", *SPLIT, "checkpoint.every_steps=1"]
    env = {"DIST_FINETUNE_FAULTS": "exit@step=3"}
    first = runner.train(tmp_path, "run", overrides, base=BASE, env=env)
    assert not first.ok and (first.dir / "checkpoints" / "step_0000002").is_dir(), first.output()
    record = read_split(first.dir)
    edited = DataSplit(record.file, record.sha256, record.rows, record.fractions, record.seed,
                       {"train": record.indices["train"], "val": record.indices["val"],
                        "test": record.indices["test"][:10]})  # a recomputed split would have 18 test rows
    edited.write(first.dir)
    again = runner.train(tmp_path, "run", [*overrides, "resume=auto"], base=BASE)
    assert again.ok, again.output()
    assert again.summary()["test"]["examples"] == 10
    assert read_split(again.dir).indices == edited.indices  # a resume writes no new split


def test_train_and_val_without_test(tmp_path, toy):
    rows = toy.read_text(encoding="utf-8").splitlines(keepends=True)
    (tmp_path / "train.csv").write_text("".join(rows[:71]), encoding="utf-8")
    (tmp_path / "val.csv").write_text(rows[0] + "".join(rows[71:]), encoding="utf-8")
    run = runner.train(tmp_path, "run", [f"data.train_file={tmp_path / 'train.csv'}",
                                         f"data.val_file={tmp_path / 'val.csv'}", "report.plots=true"], base=BASE)
    assert run.ok, run.output()
    summary = run.summary()
    assert "test" not in summary and summary["val"]["examples"] == 20 and summary["best_step"] is not None
    assert run.events("eval")
    assert not (run.dir / "confusion_test.png").exists() and not (run.dir / SPLIT_FILE).exists()
    assert "| test |" not in (run.dir / "report.md").read_text()
    line = error_line(cli("evaluate", "--run", run.dir))
    assert "no test split" in line and "--split val" in line, line
    ok(cli("evaluate", "--run", run.dir, "--split", "val"))
    assert json.loads((run.dir / "eval" / "val.json").read_text())["accuracy"] == summary["val"]["accuracy"]


@pytest.mark.slow
def test_two_ranks_split_the_same_way_as_one(split_run, toy, tmp_path):
    two = runner.train(tmp_path, "two", [f"data.train_file={toy}", *SPLIT], nproc=2, base=BASE)
    assert two.ok, two.output()
    assert read_split(two.dir).indices == read_split(split_run.dir).indices
    ok(cli("evaluate", "--run", two.dir, "--split", "test"))  # one process, the recorded rows
    result, test = json.loads((two.dir / "eval" / "test.json").read_text()), two.summary()["test"]
    assert result["examples"] == test["examples"] == 18
    assert result["confusion_matrix"] == test["confusion_matrix"]
    assert result["loss"] == pytest.approx(test["loss"], rel=1e-6)  # rows another rank split otherwise would differ
