"""The Python API (`Classifier.load(...).predict(...)`) and the predict command built on it: the same
answers, a run folder for its export, texts from standard input.

One tiny run (module fixture) padded to the longest text of each batch, so that a batch's padding
depends on its texts; the commands run as real processes.
"""
from __future__ import annotations

import json
import subprocess

import pytest

import runner
from dist_finetune import Classifier, Prediction
from dist_finetune.tokenizer import decode, encode
from dist_finetune.weights import WeightsError

LONG = "URGENT! call now to claim your free prize " * 12  # ~100 tokens: longer than max_length (64)
TEXTS = ["ok", "Sir, waiting for your letter.", LONG, "FREE entry: txt WIN to 80086 now", "see you at 8 then?"]


def predict_cli(*args: object, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*runner.launcher(1), "-m", "dist_finetune.predict", "--device", "cpu", *map(str, args)],
                          cwd=runner.REPO, env=runner.child_env(), input=stdin, capture_output=True, text=True,
                          timeout=120)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-5000:]}"
    return proc


def records(proc: subprocess.CompletedProcess) -> list[dict]:
    return [json.loads(line) for line in ok(proc).stdout.splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> runner.Run:
    tmp = tmp_path_factory.mktemp("api")
    run = runner.train(tmp, "run", overrides=["train.max_steps=30", "eval.every_steps=30", "data.padding=longest"])
    assert run.ok, run.output()
    return run


@pytest.fixture(scope="module")
def clf(trained) -> Classifier:
    return Classifier.load(trained.dir, device="cpu")


def assert_same(a: Prediction, b: Prediction, tol: float = 1e-6) -> None:
    assert a.label == b.label and a.index == b.index
    assert list(a.probabilities) == list(b.probabilities)
    assert list(a.probabilities.values()) == pytest.approx(list(b.probabilities.values()), abs=tol)


def test_the_api_answers_as_the_command_does(trained, clf):
    assert clf.labels == ["ham", "spam"] and clf.max_length == 64
    mine = clf.predict(TEXTS, batch_size=len(TEXTS))  # one batch: the short texts padded to the long one
    theirs = records(predict_cli("--model", trained.dir / "export", "--json", "--batch-size", 2, *TEXTS))
    assert [r["text"] for r in theirs] == TEXTS
    for p, r in zip(mine, theirs):
        assert isinstance(p, Prediction) and p.label == r["predicted_label"] == clf.labels[p.index]
        assert p.probabilities == pytest.approx(r["probabilities"], abs=1e-6)
        assert sum(p.probabilities.values()) == pytest.approx(1.0, abs=1e-6)
    assert [p.truncated for p in mine] == [text is LONG for text in TEXTS]
    assert len({round(p.probabilities["spam"], 6) for p in mine}) > 1  # the texts are told apart


def test_padding_does_not_change_a_prediction(clf):
    together = clf.predict(TEXTS, batch_size=len(TEXTS))
    alone = [clf.predict([text], batch_size=1)[0] for text in TEXTS]
    for a, b in zip(together, alone):
        assert_same(a, b, tol=1e-5)


def test_a_text_longer_than_max_length_is_its_first_max_length_tokens(clf):
    ids = encode(LONG)
    assert len(ids) > clf.max_length
    head = decode(ids[: clf.max_length])
    assert encode(head) == ids[: clf.max_length]  # the prefix's text encodes to the same tokens
    long, short = clf.predict([LONG, head])
    assert long.truncated and not short.truncated
    assert_same(long, short)


def test_load_takes_a_run_folder_or_its_export_and_names_both_when_neither(trained, clf, tmp_path):
    export = Classifier.load(trained.dir / "export", device="cpu")
    assert export.labels == clf.labels and export.max_length == clf.max_length
    assert_same(export.predict(["Thank u!"])[0], clf.predict(["Thank u!"])[0], tol=0.0)
    (tmp_path / "config.yaml").write_text("seed: 1\n")  # a run folder whose training has not finished
    with pytest.raises(WeightsError) as caught:
        Classifier.load(tmp_path)
    for words in (f"{tmp_path} (model.safetensors not found)", f"{tmp_path / 'export'} (not found)",
                  "wait for its training to finish", f"python -m dist_finetune.export --run {tmp_path} --out"):
        assert words in str(caught.value)
    with pytest.raises(TypeError, match=r"predict\(\[text\]\)"):
        clf.predict("one text")
    with pytest.raises(TypeError, match="text 2 is a int, not a str"):
        clf.predict(["fine", 7])


def test_predict_with_a_run_folder_and_its_export_agree(trained):
    by_run = records(predict_cli("--model", trained.dir, "--json", *TEXTS))
    by_export = records(predict_cli("--model", trained.dir / "export", "--json", *TEXTS))
    assert by_run == by_export and len(by_run) == len(TEXTS)


def test_predict_reads_standard_input_one_text_per_line_in_order(trained, clf):
    lines = [TEXTS[1], "", TEXTS[3], "   ", TEXTS[0], TEXTS[2], TEXTS[4]]
    given = [line for line in lines if line.strip()]
    expected = clf.predict(given)
    for args in ([], ["-"]):
        proc = predict_cli("--model", trained.dir, "--json", *args, stdin="\r\n".join(lines) + "\n")
        got = records(proc)
        assert [r["text"] for r in got] == given
        assert [r["predicted_label"] for r in got] == [p.label for p in expected]
        for r, p in zip(got, expected):
            assert r["probabilities"] == pytest.approx(p.probabilities, abs=1e-6)
        assert "skipped 2 empty or blank line(s) of standard input" in proc.stderr
        assert "1 of 5 text(s) are longer than the model's max_length" in proc.stderr
    plain = ok(predict_cli("--model", trained.dir, stdin=f"{TEXTS[1]}\n{TEXTS[3]}")).stdout.splitlines()
    assert [line.split("\t")[0] for line in plain] == [p.label for p in clf.predict([TEXTS[1], TEXTS[3]])]
    assert [line.split("\t")[-1] for line in plain] == [TEXTS[1], TEXTS[3]]


def test_empty_standard_input_and_a_dash_among_texts_are_refused(trained):
    empty = predict_cli("--model", trained.dir, stdin="\n \n")
    assert empty.returncode == 2 and empty.stdout == ""
    assert empty.stderr.strip().splitlines() == [
        "error: standard input held no text: give one text per line, or texts as arguments, or --input FILE"]
    mixed = predict_cli("--model", trained.dir, "hello", "-", stdin="x\n")
    assert mixed.returncode == 2 and "give it alone" in mixed.stderr
