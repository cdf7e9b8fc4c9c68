"""`export --format onnx` / checkpoint.export_formats: [onnx]: model.onnx under onnxruntime answers as the torch
model does (within 1e-4 on 100 texts), predict and serve run it (--backend torch|onnx, auto from the folder), and
every wrong folder is one line.

One tiny LoRA run (module fixture, adapters kept apart in the native export) writes both formats itself.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import httpx
import pytest
import torch

import runner
from dist_finetune import Classifier, runs
from dist_finetune.export import main as export_main
from dist_finetune.model import GPTClassifier, GPTConfig
from dist_finetune.onnx_export import ONNX_WEIGHTS, OnnxModel
from dist_finetune.predict import main as predict_main
from dist_finetune.tokenizer import encode_batch
from dist_finetune.weights import WeightsError, save_export

pytest.importorskip("onnxruntime")

WORDS = ["free", "prize", "call", "now", "see", "you", "at", "8", "ok", "WINNER", "txt", "love", "dinner", "URGENT",
         "claim", "later", "日本語", "ünï", "✓", "lol"]
TEXTS = [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(1 + (i * 13) % 70)) for i in range(100)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> runner.Run:
    run = runner.train(tmp_path_factory.mktemp("onnx"), "run", overrides=[
        "train.max_steps=12", "eval.every_steps=12", "data.padding=longest", "model.trainable=lora",
        "lora.targets=[attn, mlp, head]", "lora.export=separate", "checkpoint.export_formats=[native, onnx]"])
    assert run.ok, run.output()
    return run


@pytest.fixture(scope="module")
def pair(trained) -> tuple[Classifier, Classifier]:
    return (Classifier.load(trained.dir, device="cpu"),
            Classifier.load(trained.dir, device="cpu", backend="onnx"))


def test_training_writes_the_onnx_folder_and_it_is_a_run_file(trained):
    folder = trained.dir / "export_onnx"
    assert sorted(p.name for p in folder.iterdir()) == ["labels.json", "model.onnx", "model_config.json"]
    config = json.loads((folder / "model_config.json").read_text())
    assert config["format"] == "onnx" and "lora" not in config  # adapters merged into the graph
    assert "lora" in json.loads((trained.dir / "export" / "model_config.json").read_text())
    assert str(folder) in trained.proc.stdout + trained.proc.stderr
    assert runs.foreign_files(trained.dir, sorted(os.listdir(trained.dir))) == []  # --overwrite may replace it


def test_onnxruntime_logits_equal_torch_on_100_texts(pair):
    torch_clf, onnx_clf = pair
    assert isinstance(onnx_clf.model, OnnxModel) and onnx_clf.backend == "onnx" and torch_clf.backend == "torch"
    inputs = [ids[:64] for ids in encode_batch(TEXTS)]
    for batch_size in (1, 7, 100):  # padded batches of every shape, one text alone
        theirs, ours = onnx_clf._logits(inputs, batch_size), torch_clf._logits(inputs, batch_size)
        assert theirs.shape == (100, 2) and (theirs - ours).abs().max() < 1e-4
    for a, b in zip(onnx_clf.predict(TEXTS), torch_clf.predict(TEXTS)):
        assert a.label == b.label and a.truncated == b.truncated
        assert a.probabilities == pytest.approx(b.probabilities, abs=1e-5)


def test_the_export_command_writes_an_equal_graph(trained, pair, tmp_path, capsys):
    out = tmp_path / "onnx"
    assert export_main(["--run", str(trained.dir), "--format", "onnx", "--out", str(out)]) == 0
    assert "(ONNX, for onnxruntime)" in capsys.readouterr().out
    again = Classifier.load(out, device="cpu")  # auto: a folder holding only model.onnx runs under onnxruntime
    assert again.backend == "onnx"
    assert [p.probabilities for p in again.predict(TEXTS[:20])] == pytest.approx(
        [p.probabilities for p in pair[1].predict(TEXTS[:20])], abs=1e-6)
    assert export_main(["--run", str(trained.dir), "--format", "onnx", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    (out / "notes.txt").write_text("mine")
    assert export_main(["--run", str(trained.dir), "--format", "onnx", "--out", str(out), "--overwrite"]) == 2
    assert "notes.txt" in capsys.readouterr().err and (out / "notes.txt").read_text() == "mine"


def test_predict_backends_agree_and_auto_picks_from_the_folder(trained, capsys):
    outputs = {}
    for backend in ("torch", "onnx"):
        assert predict_main(["--model", str(trained.dir), "--backend", backend, "--json", *TEXTS[:10]]) == 0
        outputs[backend] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    for a, b in zip(outputs["torch"], outputs["onnx"]):
        assert a["predicted_label"] == b["predicted_label"]
        assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-5)


@pytest.mark.parametrize("backend, folder, said", [
    ("onnx", "export", "holds no model.onnx"),
    ("torch", "export_onnx", "is an ONNX export"),
])
def test_a_backend_the_folder_cannot_serve_is_one_line(trained, capsys, backend, folder, said):
    assert predict_main(["--model", str(trained.dir / folder), "--backend", backend, "ok"]) == 2
    err = capsys.readouterr().err
    assert said in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_damaged_graph_is_one_line(trained, tmp_path, capsys):
    folder = tmp_path / "bad"
    folder.mkdir()
    for name in ("labels.json", "model_config.json"):
        (folder / name).write_bytes((trained.dir / "export_onnx" / name).read_bytes())
    (folder / ONNX_WEIGHTS).write_bytes(b"\x08\x07not a graph" * 50)
    with pytest.raises(WeightsError, match="onnxruntime cannot load it"):
        Classifier.load(folder, device="cpu")
    assert predict_main(["--model", str(folder), "ok"]) == 2
    err = capsys.readouterr().err
    assert str(folder / ONNX_WEIGHTS) in err and "--format onnx" in err and len(err.strip().splitlines()) == 1


def _random_export(tmp_path, name: str, fmt: str, **keys) -> Classifier:
    torch.manual_seed(0)
    model = GPTClassifier(GPTConfig(n_layer=2, n_head=4, n_embd=64, context_length=64), keys.pop("classes"),
                          keys.pop("pooling", "last_token"))
    with torch.no_grad():
        model.head.bias.normal_(0, 0.5)
    save_export(model, tmp_path / name, model.pooling, keys.pop("labels"), fmt=fmt, **keys)
    return Classifier.load(tmp_path / name, device="cpu")


@pytest.mark.parametrize("keys", [
    dict(classes=3, labels=["a", "b", "c"], pooling="mean", max_length=32, padding="fixed"),
    dict(classes=2, labels=["x", "y"], max_length=16, padding="longest", long_texts="chunk", chunk_stride=8,
         chunk_aggregate="max"),
    dict(classes=2, labels=["p", "q"], max_length=32, padding="longest", thresholds=[0.3, 0.6]),
    dict(classes=2, labels=["t1", "t2"], max_length=32, padding="none",
         targets={"targets": ["t1", "t2"], "mean": [1.0, -2.0], "std": [0.5, 3.0]}),
], ids=["mean-pooling", "chunk", "multi_label", "regression"])
def test_every_task_and_recipe_gives_the_same_outputs(tmp_path, keys):
    mine = _random_export(tmp_path, "native", "native", **dict(keys))
    theirs = _random_export(tmp_path, "onnx", "onnx", **dict(keys))
    assert theirs.backend == "onnx"
    for a, b in zip(theirs.predict(TEXTS[:25], 4), mine.predict(TEXTS[:25], 4)):
        assert (a.label, a.labels, a.truncated) == (b.label, b.labels, b.truncated)
        assert a.probabilities == pytest.approx(b.probabilities, abs=1e-5)
        assert a.values == (pytest.approx(b.values, abs=1e-4) if b.values is not None else None)


@pytest.mark.slow
def test_serve_runs_the_onnx_backend(trained, pair):
    port = runner.free_port()
    proc = subprocess.Popen([sys.executable, "-m", "dist_finetune.serve", "--model", str(trained.dir), "--backend",
                             "onnx", "--port", str(port)], cwd=runner.REPO, env=runner.child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(proc, url)
        card = httpx.get(f"{url}/v1/model", timeout=10).json()
        assert card["backend"] == "onnx" and card["source"] == str(trained.dir / "export_onnx")
        answers = httpx.post(f"{url}/v1/classify", json={"texts": TEXTS[:16]}, timeout=60).json()["predictions"]
        for answer, mine in zip(answers, pair[0].predict(TEXTS[:16])):
            assert answer["label"] == mine.label
            assert answer["probabilities"] == pytest.approx(mine.probabilities, abs=1e-5)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, proc.communicate()


def _wait_ready(proc: subprocess.Popen, url: str) -> None:
    import time

    deadline = time.time() + 90
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)
    raise AssertionError("the server did not become ready in 90 s")


def test_a_config_whose_max_length_the_graph_cannot_read_is_one_line(tmp_path, capsys):
    _random_export(tmp_path, "onnx", "onnx", classes=2, labels=["a", "b"], max_length=32)  # a graph of 64 positions
    config = json.loads((tmp_path / "onnx" / "model_config.json").read_text())
    config["gpt"]["context_length"], config["max_length"] = 512, 512  # another model's config beside the graph
    (tmp_path / "onnx" / "model_config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match="the graph cannot read max_length=512 tokens"):
        Classifier.load(tmp_path / "onnx", device="cpu")  # was: loaded, then a traceback on the first long text
    assert predict_main(["--model", str(tmp_path / "onnx"), "ok " * 600]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and "model.onnx" in err, err
