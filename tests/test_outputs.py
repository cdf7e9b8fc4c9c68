"""The commands' output files: never replaced without consent, always whole, their inputs checked.

predict / evaluate / export refuse to overwrite (--overwrite to consent, and only files of their own);
every output file and the export folder appear whole; exports take the run's permissions; a torn last
line of metrics.jsonl does not block a resume; a damaged export is one line naming file, key and fix.
"""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pandas as pd
import pytest

import runner
from dist_finetune import evaluate, export, predict, weights
from dist_finetune.model import GPTClassifier, GPTConfig
from dist_finetune.report import Reporter
from dist_finetune.runs import RunError
from dist_finetune.weights import WeightsError, load_export, save_export

TINY = GPTConfig(n_layer=2, n_head=4, n_embd=64, context_length=128)
EXPORT_FILES = ["labels.json", "model.safetensors", "model_config.json"]


def make_export(folder: Path, labels: list | None = None) -> Path:
    labels = labels or ["ham", "spam"]
    save_export(GPTClassifier(TINY, len(labels), "last_token"), folder, "last_token", labels, max_length=64)
    return folder


def one_line_error(rc: int, stderr: str, *words: str) -> str:
    assert rc == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


@pytest.fixture
def texts(tmp_path) -> Path:
    path = tmp_path / "in.csv"
    pd.DataFrame({"text": ["win a free prize", "see you at lunch"]}).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_export(tmp_path_factory.mktemp("model") / "export")


# ---------------------------------------------------------------- predict --output


@pytest.mark.parametrize("spelling", ["same", "dotdot", "symlink", "hardlink"])
def test_predict_refuses_to_write_over_its_input(model_dir, texts, capsys, spelling):
    before = texts.read_bytes()
    output = {"same": texts, "dotdot": texts.parent / "sub" / ".." / texts.name,
              "symlink": texts.parent / "link.csv", "hardlink": texts.parent / "hard.csv"}[spelling]
    (texts.parent / "sub").mkdir()
    if spelling == "symlink":
        output.symlink_to(texts)
    elif spelling == "hardlink":
        os.link(texts, output)
    rc = predict.main(["--model", str(model_dir), "--input", str(texts), "--output", str(output), "--overwrite"])
    one_line_error(rc, capsys.readouterr().err, str(output), "is the --input file", "another --output")
    assert texts.read_bytes() == before


def test_predict_replaces_an_existing_output_only_with_overwrite(model_dir, texts, tmp_path, capsys):
    out = tmp_path / "out.csv"
    out.write_text("precious\n")
    rc = predict.main(["--model", str(model_dir), "--input", str(texts), "--output", str(out)])
    one_line_error(rc, capsys.readouterr().err, str(out), "already exists", "--overwrite")
    assert out.read_text() == "precious\n"
    assert predict.main(["--model", str(model_dir), "--input", str(texts), "--output", str(out), "--overwrite"]) == 0
    assert pd.read_csv(out)["predicted_label"].isin(["ham", "spam"]).all()


def test_predict_output_appears_whole(model_dir, texts, tmp_path, monkeypatch):
    """A writer that dies halfway (a full disk) leaves no half file, the old file as it was, and no
    temporary file."""
    def half_then_full_disk(self, path, **kwargs):
        Path(path).write_text("text,predicted_la")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_csv", half_then_full_disk)
    new, old = tmp_path / "new.csv", tmp_path / "old.csv"
    old.write_text("old,complete\n")
    with pytest.raises(OSError, match="No space left"):
        predict.main(["--model", str(model_dir), "--input", str(texts), "--output", str(new)])
    assert not new.exists()
    with pytest.raises(OSError, match="No space left"):
        predict.main(["--model", str(model_dir), "--input", str(texts), "--output", str(old), "--overwrite"])
    assert old.read_text() == "old,complete\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.csv", "old.csv"]


# ---------------------------------------------------------------- a damaged export


def damage(folder: Path, file: str, change) -> None:
    path = folder / file
    data = json.loads(path.read_text())
    path.write_text(change(data) if callable(change) else change)


def set_gpt(**keys):
    return lambda c: json.dumps({**c, "gpt": {**c["gpt"], **keys}})


def set_top(**keys):
    return lambda c: json.dumps({**c, **keys})


DAMAGED = {  # case -> (file, change, words the error names)
    "three labels for a two-class head": ("labels.json", json.dumps(["a", "b", "c"]),
                                          ["labels.json", "3 labels", "num_classes=2"]),
    "labels not a list": ("labels.json", json.dumps("ham"), ["labels.json", "list of labels", "str"]),
    "duplicate labels": ("labels.json", json.dumps(["ham", "ham"]), ["labels.json", "'ham' appears twice"]),
    "label ids with a gap": ("labels.json", json.dumps({"ham": 0, "spam": 2}), ["labels.json", "ids 0..1"]),
    "config not JSON": ("model_config.json", "{\"gpt\": {", ["model_config.json", "not readable JSON"]),
    "config a list": ("model_config.json", "[1, 2]", ["model_config.json", "JSON object"]),
    "negative n_layer": ("model_config.json", set_gpt(n_layer=-3), ["model_config.json", "gpt.n_layer=-3"]),
    "absurd n_layer": ("model_config.json", set_gpt(n_layer=10**9), ["model_config.json", "gpt.n_layer"]),
    "n_layer a string": ("model_config.json", set_gpt(n_layer="2"), ["model_config.json", "gpt.n_layer='2'"]),
    "n_embd not divisible by n_head": ("model_config.json", set_gpt(n_head=3),
                                       ["model_config.json", "gpt.n_embd=64", "gpt.n_head=3"]),
    "more than 100 GiB": ("model_config.json", set_gpt(n_layer=1024, n_embd=16384, n_head=128),
                          ["model_config.json", "n_layer=1024", "GiB"]),
    "unknown pooling": ("model_config.json", set_top(pooling="max"), ["model_config.json", "pooling='max'"]),
    "num_classes a float": ("model_config.json", set_top(num_classes=2.0), ["model_config.json", "num_classes"]),
    "unknown gpt key": ("model_config.json", set_gpt(n_heads=4), ["model_config.json", "n_heads"]),
}


@pytest.mark.parametrize("case", sorted(DAMAGED))
def test_a_damaged_export_is_one_line_before_any_model_is_built(tmp_path, capsys, monkeypatch, case):
    folder = make_export(tmp_path / "export")
    file, change, words = DAMAGED[case]
    damage(folder, file, change)

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built from a damaged export")

    monkeypatch.setattr(weights, "GPTClassifier", no_model)
    rc = predict.main(["--model", str(folder), "--device", "cpu", "hello"])
    err = one_line_error(rc, capsys.readouterr().err, *words)
    assert "export" in err  # the fix: re-export


def test_weights_of_another_vocabulary_are_named_before_loading(tmp_path, capsys):
    folder = make_export(tmp_path / "export")
    damage(folder, "model_config.json", set_gpt(vocab_size=50304))
    rc = predict.main(["--model", str(folder), "--device", "cpu", "hello"])
    one_line_error(rc, capsys.readouterr().err, "model.safetensors", "backbone.wte.weight", "(50257, 64)",
                   "gpt.vocab_size")


def test_weights_that_are_not_safetensors_are_one_line(tmp_path, capsys):
    folder = make_export(tmp_path / "export")
    (folder / "model.safetensors").write_bytes(b"\x00" * 100)
    rc = predict.main(["--model", str(folder), "--device", "cpu", "hello"])
    one_line_error(rc, capsys.readouterr().err, "model.safetensors", "safetensors")


def test_an_export_with_nonfinite_weights_is_refused_not_predicted_from(tmp_path, capsys):
    """Before: `predict` printed `ham ham=nan spam=nan` with exit 0."""
    import torch
    from safetensors.torch import load_file, save_file

    folder = make_export(tmp_path / "export")
    state = load_file(folder / "model.safetensors")
    state["head.weight"][0, 0] = float("nan")
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    rc = predict.main(["--model", str(folder), "--device", "cpu", "hello"])
    one_line_error(rc, capsys.readouterr().err, "model.safetensors", "non-finite", "head.weight")
    assert torch.isnan(load_file(folder / "model.safetensors")["head.weight"]).any()  # nothing rewritten


# ---------------------------------------------------------------- the export folder


def test_save_export_replaces_the_folder_as_a_whole(tmp_path):
    """A failure while writing the new export (here: unwritable labels) leaves the old export untouched:
    never new weights beside old labels."""
    folder = make_export(tmp_path / "export", ["ham", "spam"])
    before = {name: (folder / name).read_bytes() for name in EXPORT_FILES}
    model = GPTClassifier(GPTConfig(n_layer=1, n_head=4, n_embd=32, context_length=128), 2, "mean")
    with pytest.raises(TypeError):
        save_export(model, folder, "mean", [object(), object()])
    assert {name: (folder / name).read_bytes() for name in EXPORT_FILES} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temporary folder left behind
    assert load_export(folder)[1] == ["ham", "spam"]


def test_save_export_never_replaces_a_folder_holding_other_files(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(WeightsError, match=r"mine: holds notes.txt, which is not part of an export"):
        make_export(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]


def test_exported_files_take_the_runs_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        folder = make_export(tmp_path / "export")
    finally:
        os.umask(old)
    modes = {name: stat.S_IMODE((folder / name).stat().st_mode) for name in EXPORT_FILES}
    assert modes == dict.fromkeys(EXPORT_FILES, 0o644)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755


def test_export_command_refuses_to_replace_without_consent(tmp_path, capsys):
    """Checked before any work: the run folder need not even exist for these refusals."""
    no_run = str(tmp_path / "no_run")
    existing = make_export(tmp_path / "existing")
    rc = export.main(["--run", no_run, "--out", str(existing)])
    one_line_error(rc, capsys.readouterr().err, str(existing), "already holds an export", "--overwrite")

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    for extra in ([], ["--overwrite"]):
        rc = export.main(["--run", no_run, "--out", str(foreign), *extra])
        one_line_error(rc, capsys.readouterr().err, str(foreign), "thesis.tex", "not part of an export",
                       "choose another --out")
    mixed = make_export(tmp_path / "mixed")
    (mixed / "README").write_text("mine")
    rc = export.main(["--run", no_run, "--out", str(mixed), "--overwrite"])
    one_line_error(rc, capsys.readouterr().err, str(mixed), "README")
    assert (foreign / "thesis.tex").read_text() == "years of work" and (mixed / "README").exists()


# ---------------------------------------------------------------- evaluate --out


def test_evaluate_refuses_a_foreign_out_file_before_any_work(tmp_path, capsys):
    foreign = tmp_path / "data.json"
    foreign.write_text('{"mine": true}\n')
    for extra in ([], ["--overwrite"]):
        rc = evaluate.main(["--run", str(tmp_path / "no_run"), "--out", str(foreign), *extra])
        one_line_error(rc, capsys.readouterr().err, str(foreign), "not an evaluation report", "another --out")
    assert foreign.read_text() == '{"mine": true}\n'
    report = tmp_path / "old.json"
    report.write_text(json.dumps(dict.fromkeys((*evaluate.REPORT_KEYS, "confusion_matrix", "accuracy"), 1)))
    rc = evaluate.main(["--run", str(tmp_path / "no_run"), "--out", str(report)])
    one_line_error(rc, capsys.readouterr().err, str(report), "already exists", "--overwrite")


# ---------------------------------------------------------------- metrics.jsonl cut short


def test_a_torn_last_line_is_dropped_with_a_warning(tmp_path, capsys):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"event": "train", "step": 1}\n{"event": "eval", "step": 2}\n{"event": "tr')
    reporter = Reporter(tmp_path, True)
    assert f"warning: {metrics}: dropped its last line" in capsys.readouterr().err
    assert metrics.read_text() == '{"event": "train", "step": 1}\n{"event": "eval", "step": 2}\n'
    reporter.event("train", step=3)
    reporter.truncate_after(2)
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2]


def test_a_damaged_line_in_the_middle_is_an_error_naming_it(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, garbage}\n{"step": 3}\n')
    with pytest.raises(RunError, match=r"metrics.jsonl: line 2 is damaged .* not the last line"):
        Reporter(tmp_path, True)


def test_a_torn_history_row_is_dropped(tmp_path, capsys):
    (tmp_path / "history.csv").write_text(
        "step,epoch,examples_seen,train_loss,train_accuracy,val_loss,val_accuracy,lr\n"
        "5,0.1,40,0.6,0.5,0.7,0.5,0.001\n10,0.2,8")
    reporter = Reporter(tmp_path, True)
    assert [row["step"] for row in reporter.history] == [5]
    assert "history.csv: dropped its last line" in capsys.readouterr().err


def test_resume_after_a_torn_metrics_line(tmp_path):
    steps = ["train.max_steps=10", "eval.every_steps=5", "checkpoint.every_steps=5", "checkpoint.keep_last=5",
             "early_stopping.patience=100", "checkpoint.export=false"]
    first = runner.train(tmp_path, "run", overrides=steps)
    assert first.ok, first.output()
    metrics = first.dir / "metrics.jsonl"
    with metrics.open("a") as f:
        f.write('{"event": "train", "step": 11, "train_lo')  # a full disk mid-append
    again = runner.train(tmp_path, "run", overrides=[*steps, "resume=auto"])
    assert again.ok, again.output()
    assert f"{metrics}: dropped its last line" in again.proc.stderr
    records = [json.loads(line) for line in metrics.read_text().splitlines()]  # every line whole again
    assert records[-1]["event"] == "summary"
