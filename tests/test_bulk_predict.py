"""`predict --input FILE --output FILE` in shards (bulk_predict): one output in input order, equal to
Classifier.predict, on one rank or several (--nproc, torchrun); resumable; every row checked first."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

import runner
from dist_finetune import Classifier, bulk_predict, predict

ROWS = 150
SHARD = 64  # a multiple of --batch-size 32: the batches are those of one whole-file predict call
FORMATS = ["csv", "jsonl", "parquet"]


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    return runner.tiny_export(tmp_path_factory.mktemp("bulk") / "export")


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


def test_a_join_killed_midway_leaves_its_temporary_file_where_the_rerun_removes_it(export, classifier, tmp_path,
                                                                                   monkeypatch):
    src = write_input(frame(), tmp_path / "in.csv")
    out = tmp_path / "out.csv"
    finished_shards(export, src, out, [0, 1, 2], classifier)  # every shard done: only the join was left
    joined_in = []
    real_join = bulk_predict.join_text
    monkeypatch.setattr(bulk_predict, "join_text", lambda paths, tmp, fmt: joined_in.append(tmp.parent)
                        or real_join(paths, tmp, fmt))
    (bulk_predict_parts(out) / ".out.csv.k1ll3d99.tmp").write_text("id,text,pred")  # what kill -9 left there
    assert run_main(export, src, out) == 0  # was: refused, a file predict did not write; and beside out.csv
    assert joined_in == [bulk_predict_parts(out)]  # was: tmp_path, where no rerun may delete it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.csv", "out.csv"]
    assert len(read_output(out)) == ROWS


def test_an_input_still_being_written_while_predicted_is_refused_before_the_join(export, tmp_path, monkeypatch,
                                                                                 capsys):
    src = write_input(frame(), tmp_path / "in.csv")
    out = tmp_path / "out.csv"
    real_predict = Classifier.predict

    def predict_while_appended(self, texts, *args, **kwargs):
        with src.open("a") as f:  # another program appends rows after the check
            f.write("late,more text,\n" * 40)
        return real_predict(self, texts, *args, **kwargs)

    monkeypatch.setattr(Classifier, "predict", predict_while_appended)
    assert run_main(export, src, out) == 2  # was: 0, "wrote 150 prediction(s)" and 192 rows, 42 never checked
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"error: --input {src} or --model {export} changed while predicting (size, mtime_ns differ); "
                       "once they stay as they are, run the command again with --overwrite"), err
    assert not out.exists() and bulk_predict_parts(out).is_dir()  # the parts stay for the user to look at


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


# ---------------------------------------------------------------- hostile inputs and outputs


@pytest.mark.parametrize("line, said", [
    ('{"text": "deep", "d": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
    ('{"text": "lone \\ud800 surrogate"}', "surrogate pair"),
])
def test_a_jsonl_line_python_cannot_hold_is_one_line_before_any_shard(export, tmp_path, capsys, line, said):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": f"ok {i}"}) + "\n" for i in range(100)) + line + "\n")
    assert run_main(export, src, tmp_path / "out.csv") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{src}, line 101: " in err[0] and said in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_parquet_parts_of_different_inferred_types_join_without_losing_values(export, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    late = [i >= SHARD for i in range(ROWS)]  # only the shards after the first hold these values
    table = pa.table({"text": frame()["text"], "meta": [{"a": i, "b": f"x{i}" if x else None} for i, x in
                                                        enumerate(late)],
                      "items": [[i] if x else [] for i, x in enumerate(late)],
                      "count": [i if x else None for i, x in enumerate(late)]})
    pq.write_table(table, tmp_path / "in.parquet")
    out = tmp_path / "out.parquet"
    assert run_main(export, tmp_path / "in.parquet", out) == 0  # was: "a column holds values of one type ..."
    got = pq.read_table(out)
    for name in ("text", "meta", "items", "count"):
        assert got[name].to_pylist() == table[name].to_pylist(), name
    assert [str(got.schema.field(n).type) for n in ("meta", "count")] == ["struct<a: int64, b: string>", "int64"]
    src = tmp_path / "in.jsonl"  # a struct whose fields differ between shards: each shard's fields kept
    src.write_text("".join(json.dumps({"text": t, "meta": {"b": "x"} if x else {"a": 1}}) + "\n"
                           for t, x in zip(frame()["text"], late)))
    assert run_main(export, src, tmp_path / "j.parquet") == 0
    assert pq.read_table(tmp_path / "j.parquet")["meta"].to_pylist() == [{"a": None, "b": "x"} if x else
                                                                          {"a": 1, "b": None} for x in late]


def test_values_of_two_types_in_one_shard_are_one_line_for_a_parquet_output(export, tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": f"ok {i}", "meta": i if i % 2 else f"s{i}"}) + "\n" for i in range(9)))
    assert run_main(export, src, tmp_path / "out.parquet") == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith(f"error: --output {tmp_path / 'out.parquet'}: a column holds "
                                                   "values of one type") and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_an_output_name_too_long_for_the_temporary_names_is_one_line(export, tmp_path, capsys):
    src = write_input(frame(), tmp_path / "in.csv")
    longest = os.pathconf(tmp_path, "PC_NAME_MAX") - 14  # ".NAME.XXXXXXXX.tmp" must fit
    assert run_main(export, src, tmp_path / ("a" * (longest - 4) + ".csv")) == 0
    out = tmp_path / ("b" * (longest - 3) + ".csv")  # the OS takes this name, not the temporary one beside it
    assert run_main(export, src, out) == 2  # was: OSError "File name too long" (a traceback)
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"error: --output {out}: the file name is too long ({longest + 1} bytes; predict writes beside "
                       f"it under longer names, at most {longest} bytes here): choose a shorter name"), err
    assert not out.exists() and not bulk_predict_parts(out).exists()


@pytest.mark.parametrize("rows", ["0", "-3", str(10**12 + 1), "99999999999999999999"])
def test_shard_rows_out_of_range_is_a_usage_error(tmp_path, capsys, rows):
    with pytest.raises(SystemExit) as exit_:
        predict.parse_args(["--model", "m", "--input", "a.parquet", "--output", "b.parquet", "--shard-rows", rows])
    assert exit_.value.code == 2 and "--shard-rows must be from 1 to 1000000000000" in capsys.readouterr().err


def test_a_read_only_output_folder_is_one_line_before_the_model_loads(export, tmp_path):
    src = write_input(frame(), tmp_path / "in.csv")
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    # root writes anywhere: drop that power (CAP_DAC_OVERRIDE) for the child, as a plain user has none
    prefix = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--"] if os.geteuid() == 0 else []
    if prefix and shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: a read-only folder cannot be made here")
    try:
        proc = run_process(export, src, folder / "out.csv", launcher=[*prefix, sys.executable])
    finally:
        folder.chmod(0o755)
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = proc.stderr.strip().splitlines()
    assert err == [f"error: --output {folder / 'out.csv'}: the folder {folder} is not writable (predict writes the "
                   "output and out.csv.parts there); choose another --output, or make the folder writable"], err
    assert list(folder.iterdir()) == []


@pytest.mark.slow
def test_sigterm_to_the_nproc_command_stops_its_ranks_and_a_one_rank_rerun_resumes(export, classifier, tmp_path):
    import psutil

    rows = 30_000
    texts = [f"text {i} " + "free prize call now " * (i % 5) for i in range(rows)]
    src = tmp_path / "in.csv"
    pd.DataFrame({"id": [f"r{i}" for i in range(rows)], "text": texts}).to_csv(src, index=False)
    out = tmp_path / "out.csv"
    cmd = [sys.executable, "-m", "dist_finetune.predict", "--model", str(export), "--input", str(src), "--output",
           str(out), "--device", "cpu", "--shard-rows", "200", "--nproc", "2"]
    proc = subprocess.Popen(cmd, cwd=runner.REPO, env=runner.child_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        parts = bulk_predict_parts(out)
        deadline = time.time() + 180
        while not (parts.is_dir() and any(p.name.startswith("shard_") for p in parts.iterdir())):
            assert proc.poll() is None and time.time() < deadline, "no shard was written"
            time.sleep(0.05)
        children = psutil.Process(proc.pid).children(recursive=True)  # torchrun and its two ranks
        assert len(children) >= 3
        proc.terminate()  # to this process alone, as a supervisor's stop or `kill PID` sends it
        proc.wait(timeout=120)
        _, alive = psutil.wait_procs(children, timeout=30)
        assert alive == [], f"ranks outlived the command: {alive}"  # were orphaned, predicting on
    finally:
        runner.kill_tree(proc.pid)
    assert not out.exists() and parts.is_dir()
    rerun = run_process(export, src, out, shard_rows=200)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming: " in rerun.stderr
    got = read_output(out)
    assert got["id"].tolist() == [f"r{i}" for i in range(rows)] and not parts.exists()
