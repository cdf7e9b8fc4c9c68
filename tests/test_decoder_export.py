"""`--format hf` and `--format onnx` for Llama / Qwen3 classifiers, on tiny random checkpoints with a tiny trained
tokenizer (decoder_checkpoints.py): the hf folder read by real transformers (AutoTokenizer, AutoModel..., pipeline)
answers as our Classifier on a padded batch, the ONNX graph under onnxruntime as the torch model.

transformers' score layer has no bias and the final RMSNorm none to fold one into: the hf export takes a bias-free
head (built here with the checkpoint's weights) and refuses one with a bias, as training's checkpoint.export_formats.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import runner  # noqa: E402
from decoder_checkpoints import mixed_text, tokenizer_checkpoint, train_tokenizer  # noqa: E402
from dist_finetune import Classifier, runs  # noqa: E402
from dist_finetune.config import ConfigError, Config, from_dict  # noqa: E402
from dist_finetune.decoder_weights import load_into, read_config  # noqa: E402
from dist_finetune.export import main as export_main  # noqa: E402
from dist_finetune.exporter import save_format  # noqa: E402
from dist_finetune.hf_export import HfExportError  # noqa: E402
from dist_finetune.hf_tokenizer import HFTokenizer  # noqa: E402
from dist_finetune.model import GPTClassifier  # noqa: E402

LABELS = ["ham", "spam", "other"]
MAX_LENGTH = 24
ARCHITECTURES = {"llama": "LlamaForSequenceClassification", "qwen3": "Qwen3ForSequenceClassification"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    tok, tmp = train_tokenizer(), tmp_path_factory.mktemp("checkpoints")
    return {"llama": tokenizer_checkpoint(tmp / "llama", "llama", tied=False, tok=tok),
            "qwen3": tokenizer_checkpoint(tmp / "qwen3", "qwen3", tied=True, tok=tok)}


def run_config(folder: Path) -> Config:
    return from_dict({"model": {"name": "auto", "weights": str(folder)},
                      "data": {"max_length": MAX_LENGTH, "padding": "longest"}})


def classifier_model(folder: Path, bias: bool) -> GPTClassifier:
    """The checkpoint's weights under a 3-class head of large weights (the probabilities are far from uniform);
    bias=False: a bias-free head (model.head_bias=false)."""
    model = GPTClassifier(read_config(folder), len(LABELS), pooling="last_token", head_bias=bias)
    load_into(model.backbone, folder)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        model.head.weight.copy_(torch.randn(model.head.weight.shape, generator=generator))
        if bias:
            model.head.bias.copy_(torch.randn(len(LABELS), generator=generator))
    return model.eval()


def texts_for(folder: Path, count: int = 30) -> list[str]:
    """Mixed texts (accents, CJK, emoji, digits, whitespace, special tokens written out), two longer than
    MAX_LENGTH tokens; none empty and none ending in the pad token (transformers pools those one token earlier)."""
    tokenizer, rng = HFTokenizer.from_folder(folder), random.Random(7)
    texts = ["spam spam " * 20, "Hello world, the quick brown fox " * 6]
    while len(texts) < count:
        text = mixed_text(rng)
        ids = tokenizer.encode(text)
        if ids and text.strip() and ids[min(len(ids), MAX_LENGTH) - 1] != tokenizer.pad_id:
            texts.append(text)
    return texts


def probabilities(clf: Classifier, texts: list[str]) -> torch.Tensor:
    preds = clf.predict(texts, batch_size=7)
    return torch.tensor([[p.probabilities[label] for label in LABELS] for p in preds], dtype=torch.float64)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_transformers_reads_the_hf_folder_and_answers_as_our_classifier(family, folders, tmp_path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    folder, cfg, model = folders[family], run_config(folders[family]), classifier_model(folders[family], bias=False)
    save_format("native", model, tmp_path / "native", cfg, LABELS, MAX_LENGTH)
    save_format("hf", model, tmp_path / "hf", cfg, LABELS, MAX_LENGTH)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    pad_id = HFTokenizer.from_folder(folder).pad_id
    assert config["architectures"] == [ARCHITECTURES[family]] and config["model_type"] == family
    assert config["pad_token_id"] == pad_id and config["id2label"] == dict(zip("012", LABELS))
    assert (tmp_path / "hf" / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()

    texts = texts_for(folder)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    batch = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    assert batch["input_ids"].shape == (30, MAX_LENGTH) and (batch["input_ids"][:, -1] == pad_id).any()
    ours = HFTokenizer.from_folder(folder).encode_batch(texts)
    assert tokenizer(texts, truncation=True)["input_ids"] == [ids[:MAX_LENGTH] for ids in ours]
    hf_model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    assert type(hf_model).__name__ == ARCHITECTURES[family]
    with torch.no_grad():
        theirs = hf_model(**batch).logits.double().softmax(-1)
    mine = probabilities(Classifier.load(tmp_path / "native", device="cpu"), texts)
    gap = (theirs - mine).abs().max().item()
    print(f"{family}: transformers vs Classifier, 30 texts, max abs probability difference {gap:.2e}")
    assert gap < 1e-5 and (mine.max(-1).values > 0.6).any()
    pipe = pipeline("text-classification", model=str(tmp_path / "hf"), top_k=None, device="cpu")
    piped = [{s["label"]: s["score"] for s in scores} for scores in pipe(texts, batch_size=8, truncation=True)]
    assert torch.tensor([[p[label] for label in LABELS] for p in piped], dtype=torch.float64) == pytest.approx(
        mine, abs=1e-5)


@pytest.mark.parametrize("head_bias", [False, True])
def test_an_hf_export_as_model_weights_brings_its_head_in_the_data_label_order(folders, tmp_path, head_bias) -> None:
    """model.weights = a Llama/Qwen3ForSequenceClassification folder (our `--format hf`): the backbone loads and,
    with model.head=auto, score.weight becomes the head, its rows put in the data's label order; head=new ignores
    it, and a label set that differs is one clear error."""
    from dist_finetune.model import build_model
    from dist_finetune.weights import WeightsError, load_pretrained

    folder = folders["qwen3"]
    model = classifier_model(folder, bias=False)
    save_format("hf", model, tmp_path / "hf", run_config(folder), LABELS, MAX_LENGTH)
    mc = from_dict({"model": {"name": "auto", "weights": str(tmp_path / "hf"), "pooling": "last_token",
                              "head_bias": head_bias}}).model
    data_labels = sorted(LABELS)  # the data's label map: ham, other, spam
    ours = build_model(mc, len(LABELS))
    report = load_pretrained(ours, mc.weights, labels=data_labels)
    assert report.head_loaded and "head.weight" in report.loaded and not report.missing
    rows = [LABELS.index(label) for label in data_labels]
    assert torch.equal(ours.head.weight, model.head.weight[rows])
    assert (ours.head.bias is None) != head_bias and (not head_bias or not ours.head.bias.any())
    ids = torch.tensor([HFTokenizer.from_folder(folder).encode("win a free prize now")])
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(ids), model(ids)[:, rows], rtol=0, atol=1e-6)
    fresh = build_model(mc, len(LABELS))
    assert not load_pretrained(fresh, mc.weights, head_policy="new", labels=data_labels).head_loaded
    with pytest.raises(WeightsError, match=r"has 3 labels \['ham', 'spam', 'other'\].*but the data has 2 labels"):
        load_pretrained(build_model(mc, 2), mc.weights, labels=["ham", "spam"])


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_a_transformers_decoder_classifier_predicts_and_evaluates_as_ours(family, folders, tmp_path) -> None:
    """Classifier.load, predict --model and evaluate --weights take a Llama/Qwen3ForSequenceClassification folder
    (tokenizer.json and pad token from it), and answer as the native export of the same model."""
    import csv
    import subprocess
    import sys

    folder, model = folders[family], classifier_model(folders[family], bias=False)
    save_format("native", model, tmp_path / "native", run_config(folder), LABELS, MAX_LENGTH)
    save_format("hf", model, tmp_path / "hf", run_config(folder), LABELS, MAX_LENGTH)
    texts = [t for t in texts_for(folder) if len(HFTokenizer.from_folder(folder).encode(t)) <= MAX_LENGTH]
    native, hf = (Classifier.load(tmp_path / name, device="cpu") for name in ("native", "hf"))
    assert hf.labels == LABELS and hf.tokenizer.pad_id == native.tokenizer.pad_id
    assert probabilities(hf, texts) == pytest.approx(probabilities(native, texts), abs=1e-6)
    predicted = [p.label for p in native.predict(texts)]
    truth = [LABELS[i % 3] for i in range(len(texts))]
    data = tmp_path / "labelled.csv"
    with data.open("w", newline="") as f:
        csv.writer(f).writerows([("text", "label"), *zip(texts, truth)])
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "dist_finetune.evaluate", "--weights", str(tmp_path / "hf"), "--data",
                           str(data), "--batch-size", "4", "--out", str(out)],
                          cwd=runner.REPO, env=runner.child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["labels"] == sorted(LABELS) and report["examples"] == len(texts)
    assert report["accuracy"] == pytest.approx(sum(p == t for p, t in zip(predicted, truth)) / len(texts))


def test_a_head_with_a_bias_is_refused_and_nothing_is_written(folders, tmp_path) -> None:
    model = classifier_model(folders["llama"], bias=True)
    with pytest.raises(HfExportError, match=r"the head's bias \(up to .*\) has no place in "
                                            r"LlamaForSequenceClassification.*export --format native or onnx"):
        save_format("hf", model, tmp_path / "hf", run_config(folders["llama"]), LABELS, MAX_LENGTH)
    assert not (tmp_path / "hf").exists()


def test_training_export_formats_take_hf_with_a_bias_free_head_and_onnx(folders) -> None:
    base = {"model": {"name": "auto", "weights": str(folders["qwen3"])}}
    with pytest.raises(ConfigError, match="checkpoint.export_formats: hf: .*set model.head_bias: false"):
        from_dict({**base, "checkpoint": {"export_formats": ["native", "hf"]}})
    free = {"model": {**base["model"], "head_bias": False}, "checkpoint": {"export_formats": ["native", "hf"]}}
    assert from_dict(free).checkpoint.export_formats == ("native", "hf")
    assert from_dict({**base, "checkpoint": {"export_formats": ["native", "onnx"]}}).checkpoint.export_formats == (
        "native", "onnx")


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_onnx_graph_answers_as_torch(family, folders, tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    folder, cfg, model = folders[family], run_config(folders[family]), classifier_model(folders[family], bias=True)
    save_format("native", model, tmp_path / "native", cfg, LABELS, MAX_LENGTH)
    save_format("onnx", model, tmp_path / "onnx", cfg, LABELS, MAX_LENGTH)
    assert (tmp_path / "onnx" / "model.onnx").is_file() and (tmp_path / "onnx" / "tokenizer.json").is_file()
    texts = texts_for(folder)
    onnx_clf = Classifier.load(tmp_path / "onnx", device="cpu")
    mine = probabilities(Classifier.load(tmp_path / "native", device="cpu"), texts)
    theirs = probabilities(onnx_clf, texts)
    gap = (theirs - mine).abs().max().item()
    print(f"{family}: onnxruntime vs torch, 30 texts, max abs probability difference {gap:.2e}")
    assert gap < 1e-4


def test_a_trained_run_writes_onnx_and_export_refuses_hf_by_its_bias(folders, tmp_path, capsys) -> None:
    """Training writes export_onnx beside export; `export --format hf` of the trained head (it has a bias) is one
    line naming the bias, before any folder is written; `export --format onnx` writes the same model."""
    pytest.importorskip("onnxruntime")

    base = {"seed": 123, "precision": "fp32", "model": {"name": "auto", "trainable": "all",
                                                       "weights": str(folders["llama"])},
            "data": {"padding": "longest", "max_length": 32},
            "train": {"epochs": 1, "micro_batch_size": 8, "lr": 1e-3, "max_steps": 4, "log_every_steps": 1},
            "early_stopping": {"enabled": False}, "report": {"plots": False}}
    run = runner.train(tmp_path, "run", overrides=["checkpoint.export_formats=[native, onnx]"], base=base,
                       timeout=600)
    assert run.ok, run.output()
    assert export_main(["--run", str(run.dir), "--format", "onnx", "--out", str(tmp_path / "onnx")]) == 0
    texts = texts_for(folders["llama"])
    mine = Classifier.load(run.dir / "export", device="cpu").predict(texts, batch_size=7)
    for onnx in (run.dir / "export_onnx", tmp_path / "onnx"):
        theirs = Classifier.load(onnx, device="cpu").predict(texts, batch_size=7)
        gap = max(abs(a.probabilities[k] - b.probabilities[k]) for a, b in zip(mine, theirs) for k in a.probabilities)
        assert gap < 1e-4, onnx
    capsys.readouterr()
    assert export_main(["--run", str(run.dir), "--format", "hf", "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "--format hf: the head's bias" in err and "LlamaForSequenceClassification" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "hf").exists()


def test_a_run_with_a_bias_free_head_exports_to_transformers(folders, tmp_path) -> None:
    """model.head_bias=false: training itself writes export_hf, and transformers answers as our export."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    base = {"seed": 123, "precision": "fp32", "model": {"name": "auto", "trainable": "all", "head_bias": False,
                                                       "weights": str(folders["qwen3"])},
            "data": {"padding": "longest", "max_length": MAX_LENGTH},
            "train": {"epochs": 1, "micro_batch_size": 8, "lr": 1e-3, "max_steps": 4, "log_every_steps": 1},
            "early_stopping": {"enabled": False}, "report": {"plots": False}}
    run = runner.train(tmp_path, "run", overrides=["checkpoint.export_formats=[native, hf]"], base=base, timeout=600)
    assert run.ok, run.output()
    assert json.loads((run.dir / "export" / "model_config.json").read_text())["head_bias"] is False
    assert runs.foreign_files(run.dir, sorted(os.listdir(run.dir))) == []  # --overwrite may replace it
    texts = [t for t in texts_for(folders["qwen3"])]
    tokenizer = AutoTokenizer.from_pretrained(run.dir / "export_hf")
    batch = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    hf_model = AutoModelForSequenceClassification.from_pretrained(run.dir / "export_hf").eval()
    with torch.no_grad():
        theirs = hf_model(**batch).logits.double().softmax(-1)
    mine = Classifier.load(run.dir, device="cpu").predict(texts, batch_size=7)
    labels = json.loads((run.dir / "export" / "labels.json").read_text())
    mine = torch.tensor([[p.probabilities[label] for label in labels] for p in mine], dtype=torch.float64)
    assert (theirs - mine).abs().max().item() < 1e-5
