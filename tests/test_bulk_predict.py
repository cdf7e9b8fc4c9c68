"""`predict --input FILE --output FILE` in shards (bulk_predict): one output in input order, equal to
Classifier.predict, on one rank or several (--nproc, torchrun); resumable; every row checked first."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

import runner
from dist_finetune import Classifier, bulk_predict, predict
from dist_finetune.model import GPTClassifier, GPTConfig
from dist_finetune.weights import save_export

ROWS = 150
SHARD = 64  # a multiple of --batch-size 32: the batches are those of one whole-file predict call
FORMATS = ["csv", "jsonl", "parquet"]


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("bulk") / "export"
    model = GPTClassifier(GPTConfig(n_layer=2, n_head=4, n_embd=64, context_length=128), 2, "last_token")
    save_export(model, folder, "last_token", ["ham", "spam"], max_length=32, padding="longest")
    return folder


@pytest.fixture(scope="module")
def classifier(export) -> Classifier:
    return Classifier.load(export, device="cpu")


def frame(rows: int = ROWS) -> pd.DataFrame:
    texts = [f"message {i}: " + ["WINNER! claim your prize", "see you at 8", "call 0800 now, free", "ok"][i % 4]
             + " again" * (i % 9) for i in range(rows)]
    return pd.DataFrame({"id": [f"r{i}" for i in range(rows)], "text": texts,
                         "note": [None if i < 70 else f"n{i}" for i in range(rows)]})  # null in the first shard


def write_input(df: pd.DataFrame, path: Path) -> Path:
    if path.suffix == ".parquet":
        df.to_parquet(path, index=False, row_group_size=25)  # row groups across shard boundaries
    elif path.suffix == ".jsonl":
        records = df.to_dict(orient="records")
        records[120]["extra"] = 7  # a key of one late row: a column of every output row
        path.write_text("".join(json.dumps({k: v for k, v in r.items() if v is not None}) + "\n" for r in records))
    else:
        df.fillna("").to_csv(path, index=False, sep="\t" if path.suffix == ".tsv" else ",")
    return path


def read_output(path: Path) -> pd.DataFrame:
    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    if path.suffix == ".jsonl":
        return pd.read_json(path, lines=True, dtype=False)
    return pd.read_csv(path, dtype=str, keep_default_na=False, sep="\t" if path.suffix == ".tsv" else ",")


def whole_file_output(path: Path, out: Path, classifier: Classifier) -> None:
    """What predict --output wrote before shards: the whole file read, predicted and written at once."""
    fmt = out.suffix.lstrip(".")
    whole, texts = predict.read_texts(path, "text")
    predict.write_table(predict.with_predictions(whole, classifier.predict(texts), classifier.labels), out, fmt)


def assert_predictions(out: Path, texts: list[str], classifier: Classifier) -> None:
    got = read_output(out)
    assert got["id"].tolist() == [f"r{i}" for i in range(len(texts))]  # input order
    assert got["text"].tolist() == texts
    expected = classifier.predict(texts)
    assert got["predicted_label"].tolist() == [p.label for p in expected]
    assert got["prob_spam"].astype(float).tolist() == pytest.approx([p.probabilities["spam"] for p in expected],
                                                                    abs=1e-6)
    assert not bulk_predict_parts(out).exists()


def bulk_predict_parts(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


def run_main(export: Path, src: Path, out: Path, *flags: str) -> int:
    return predict.main(["--model", str(export), "--input", str(src), "--output", str(out), "--device", "cpu",
                         "--shard-rows", str(SHARD), *flags])


def run_process(export: Path, src: Path, out: Path, *flags: str, launcher: list[str] | None = None,
                shard_rows: int = SHARD) -> subprocess.CompletedProcess:
    cmd = [*(launcher or [sys.executable]), "-m", "dist_finetune.predict", "--model", str(export), "--input",
           str(src), "--output", str(out), "--device", "cpu", "--shard-rows", str(shard_rows), *flags]
    return runner.run_to_end(cmd, runner.child_env(), timeout=240)


# ---------------------------------------------------------------- one rank


@pytest.mark.parametrize("fmt", [*FORMATS, "tsv"])
def test_one_rank_writes_what_the_whole_file_predict_wrote(export, classifier, tmp_path, fmt, capsys):
    src = write_input(frame(), tmp_path / f"in.{fmt}")
    out, before = tmp_path / f"out.{fmt}", tmp_path / f"whole.{fmt}"
    assert run_main(export, src, out) == 0
    printed = capsys.readouterr()
    assert printed.out.startswith(f"wrote {ROWS} prediction(s) to {out} (") and "texts/s over 1 rank(s))" in printed.out
    assert "predict: 100%" in printed.err  # the bar
    assert_predictions(out, frame()["text"].tolist(), classifier)
    whole_file_output(src, before, classifier)
    if fmt == "parquet":
        pd.testing.assert_frame_equal(pd.read_parquet(out), pd.read_parquet(before))
    else:
        assert out.read_bytes() == before.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([src.name, out.name, before.name])


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_input_is_read_shard_by_shard(tmp_path, fmt):
    src = write_input(frame(), tmp_path / f"in.{fmt}")
    source = bulk_predict.Source(src, "text", None)
    checked = bulk_predict.validate(source, SHARD)
    shards = list(bulk_predict.shards(source, SHARD, checked.columns))
    assert [len(s) for s in shards] == [64, 64, 22] and checked.rows == ROWS
    assert pd.concat(shards)["text"].tolist() == frame()["text"].tolist()
    if fmt == "jsonl":
        assert checked.columns == ["id", "text", "note", "extra"] and all(list(s.columns) == checked.columns
                                                                           for s in shards)


def test_the_model_sees_one_shard_at_a_time(export, tmp_path, monkeypatch):
    src = write_input(frame(), tmp_path / "in.csv")
    seen, read = [], []
    real_predict, real_read_csv = Classifier.predict, pd.read_csv
    monkeypatch.setattr(Classifier, "predict", lambda self, texts, *a, **k: seen.append(len(texts))
                        or real_predict(self, texts, *a, **k))
    monkeypatch.setattr(pd, "read_csv", lambda *a, **k: read.append(k.get("chunksize")) or real_read_csv(*a, **k))
    assert run_main(export, src, tmp_path / "out.csv", "--shard-rows", "40") == 0
    assert seen == [40, 40, 40, 30]
    assert 40 in read and None not in read[:-1]  # chunks; the last read is the join's header of one part


def test_an_empty_text_fails_before_any_shard_naming_its_row(export, tmp_path, capsys):
    df = frame().fillna("")
    df.loc[136, "text"] = "  "
    src = write_input(df, tmp_path / "in.csv")
    out = tmp_path / "out.csv"
    assert run_main(export, src, out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    for word in (str(src), "row 137", "column 'text'", "empty or missing", "Fill it in or delete the row"):
        assert word in err[0], (word, err[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.csv"]  # no parts folder, no shard, no output


# ---------------------------------------------------------------- resume


def finished_shards(export: Path, src: Path, out: Path, shards: list[int], classifier: Classifier) -> None:
    """A parts folder as an interrupted run leaves it, the given shards done, their labels TAMPERED."""
    job = bulk_predict.Job(bulk_predict.Source(src, "text", None), out, out.suffix.lstrip("."), SHARD, 32,
                           export, "auto", False)
    job.parts.mkdir()
    (job.parts / "manifest.json").write_text(json.dumps(bulk_predict.manifest(job, ROWS)))
    for index, shard in enumerate(bulk_predict.shards(job.source, SHARD)):
        if index in shards:
            done = predict.with_predictions(shard, classifier.predict(shard["text"].tolist()), classifier.labels)
            done["predicted_label"] = "TAMPERED"
            predict.write_table(done, job.part(index), job.fmt)


@pytest.mark.parametrize("nproc", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_a_rerun_keeps_the_finished_shards_and_predicts_the_rest(export, classifier, tmp_path, monkeypatch, nproc):
    src = write_input(frame(), tmp_path / "in.csv")
    out = tmp_path / "out.csv"
    done = [0, 2] if nproc == 1 else [1]  # on 2 ranks: a shard of rank 1 (shards are by row, not by rank)
    finished_shards(export, src, out, done, classifier)
    if nproc == 1:
        seen = []
        real_predict = Classifier.predict
        monkeypatch.setattr(Classifier, "predict", lambda self, texts, *a, **k: seen.append(len(texts))
                            or real_predict(self, texts, *a, **k))
        assert run_main(export, src, out) == 0
        assert seen == [64]  # shard 1 only
    else:
        proc = run_process(export, src, out, "--nproc", "2")
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "resuming: 1 of 3 shard(s)" in proc.stderr
    labels = read_output(out)["predicted_label"].tolist()
    expected = [p.label for p in classifier.predict(frame()["text"].tolist())]
    tampered = {row for shard in done for row in range(shard * SHARD, min(ROWS, (shard + 1) * SHARD))}
    assert [labels[i] for i in sorted(tampered)] == ["TAMPERED"] * len(tampered)
    assert [label for i, label in enumerate(labels) if i not in tampered] == \
        [label for i, label in enumerate(expected) if i not in tampered]
    assert not bulk_predict_parts(out).exists()


def test_parts_of_another_run_are_refused_and_replaced_only_with_overwrite(export, classifier, tmp_path, capsys):
    src = write_input(frame(), tmp_path / "in.csv")
    out = tmp_path / "out.csv"
    finished_shards(export, src, out, [0], classifier)
    parts = bulk_predict_parts(out)
    manifest = json.loads((parts / "manifest.json").read_text())
    (parts / "manifest.json").write_text(json.dumps({**manifest, "shard_rows": 50}))
    assert run_main(export, src, out) == 2
    err = capsys.readouterr().err.strip()
    assert "holds the unfinished predictions of another run (shard_rows differ)" in err and "--overwrite" in err
    assert sorted(p.name for p in parts.iterdir()) == ["manifest.json", "shard_000000.csv"]  # untouched

    (parts / "mine.txt").write_text("not predict's")
    assert run_main(export, src, out, "--overwrite") == 2
    assert "holds files predict did not write (mine.txt)" in capsys.readouterr().err
    (parts / "mine.txt").unlink()

    assert run_main(export, src, out, "--overwrite") == 0  # replaced: every shard predicted again
    assert_predictions(out, frame()["text"].tolist(), classifier)


def test_nproc_is_refused_under_a_launcher(export, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    src = write_input(frame(), tmp_path / "in.csv")
    assert run_main(export, src, tmp_path / "out.csv", "--nproc", "2") == 2
    assert "leave --nproc out" in capsys.readouterr().err


def test_without_nproc_drops_every_spelling():
    argv = ["--model", "m", "--nproc", "2", "--input", "a.csv", "--nproc=3", "--npr", "4", "--output", "b.csv"]
    assert bulk_predict.without_nproc(argv) == ["--model", "m", "--input", "a.csv", "--output", "b.csv"]


# ---------------------------------------------------------------- two ranks


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
def test_two_ranks_with_nproc_write_one_output_in_input_order(export, classifier, tmp_path, fmt):
    src = write_input(frame(), tmp_path / f"in.{fmt}")
    out = tmp_path / f"out.{fmt}"
    proc = run_process(export, src, out, "--nproc", "2", shard_rows=30)  # 5 shards: rank 0 has 3, rank 1 has 2
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"wrote {ROWS} prediction(s) to {out} (" in proc.stdout and "over 2 rank(s))" in proc.stdout
    assert_predictions(out, frame()["text"].tolist(), classifier)
    if fmt == "jsonl":
        records = [json.loads(line) for line in out.read_text().splitlines()]
        assert [r["extra"] for r in records[119:122]] == [None, 7, None]


@pytest.mark.slow
def test_two_ranks_under_torchrun(export, classifier, tmp_path):
    src = write_input(frame(), tmp_path / "in.parquet")
    out = tmp_path / "out.csv"
    proc = run_process(export, src, out, launcher=runner.launcher(2), shard_rows=30)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote ") == 1 and "over 2 rank(s))" in proc.stdout  # rank 0 alone reports
    assert_predictions(out, frame()["text"].tolist(), classifier)


@pytest.mark.slow
def test_two_ranks_raise_the_same_error_for_a_bad_row(export, tmp_path):
    df = frame().fillna("")
    df.loc[99, "text"] = ""
    src = write_input(df, tmp_path / "in.csv")
    proc = run_process(export, src, tmp_path / "out.csv", "--nproc", "2", shard_rows=30)
    assert proc.returncode != 0
    for rank in (0, 1):
        assert f"error (rank {rank}): {src}, row 100, column 'text': the text is empty or missing" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.csv"]
