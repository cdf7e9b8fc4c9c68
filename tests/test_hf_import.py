"""A transformers GPT2ForSequenceClassification folder as model.weights, for evaluate --weights and Classifier."""
from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2ForSequenceClassification

import runner
from dist_finetune import Classifier, evaluate
from dist_finetune.hf_import import load_hf_classifier
from dist_finetune.model import GPTClassifier, GPTConfig
from dist_finetune.tokenizer import PAD_ID, encode_batch
from dist_finetune.weights import WeightsError, load_export, load_pretrained

CTX = 128
TEXTS = ["WINNER!! You have won a prize, call now", "see you at 8", "ok", "Free entry in a weekly competition",
         "Nah I don't think he goes to usf, he lives around here though", "URGENT! claim your cash", "thanks",
         "Are you coming home for dinner tonight or not?"]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=CTX, vocab_size=50257, pad_token_id=PAD_ID,
                     id2label={0: "ham", 1: "spam"}, label2id={"ham": 0, "spam": 1},
                     resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    model = GPT2ForSequenceClassification(cfg).eval()
    with torch.no_grad():  # a score as large as a trained one: the two classes really differ
        model.score.weight.normal_(0, 1.0)
    folder = tmp_path_factory.mktemp("hf") / "clf"
    model.save_pretrained(folder)
    return folder


def relabelled(hf_dir: Path, dest: Path, id2label: dict[int, str]) -> Path:
    """The same weights, with config.json naming the score rows differently."""
    shutil.copytree(hf_dir, dest)
    config = json.loads((dest / "config.json").read_text())
    config["id2label"] = {str(i): name for i, name in id2label.items()}
    config["label2id"] = {name: i for i, name in id2label.items()}
    (dest / "config.json").write_text(json.dumps(config))
    return dest


def padded(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = encode_batch(texts)
    width = max(map(len, tokens))
    ids = torch.tensor([t + [PAD_ID] * (width - len(t)) for t in tokens])
    return ids, torch.tensor([len(t) for t in tokens])


def hf_logits(hf_dir: Path, texts: list[str]) -> torch.Tensor:
    model = GPT2ForSequenceClassification.from_pretrained(hf_dir).eval()
    ids, lengths = padded(texts)
    mask = (torch.arange(ids.shape[1])[None] < lengths[:, None]).long()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def test_logits_equal_transformers_on_a_right_padded_batch(hf_dir):
    model, labels = load_hf_classifier(str(hf_dir))
    assert labels == ["ham", "spam"] and model.pooling == "last_token"
    assert torch.equal(model.head.bias, torch.zeros(2))
    ids, lengths = padded(TEXTS)
    assert len(set(lengths.tolist())) > 2  # real padding in the batch
    with torch.no_grad():
        ours = model(ids, lengths)
    torch.testing.assert_close(ours, hf_logits(hf_dir, TEXTS), atol=1e-5, rtol=0)


def test_classifier_load_predicts_as_transformers(hf_dir):
    clf = Classifier.load(hf_dir, device="cpu")
    expected = torch.softmax(hf_logits(hf_dir, TEXTS), -1)
    predictions = clf.predict(TEXTS, batch_size=3)
    assert clf.labels == ["ham", "spam"]
    for p, row in zip(predictions, expected.tolist()):
        assert p.label == ["ham", "spam"][max(range(2), key=row.__getitem__)]
        assert abs(p.probabilities["spam"] - row[1]) < 1e-5


def test_evaluate_weights_gives_transformers_accuracy(hf_dir, tmp_path):
    truth = ["spam", "ham", "ham", "spam", "ham", "spam", "spam", "ham"]
    data = tmp_path / "labelled.csv"
    with data.open("w", newline="") as f:
        csv.writer(f).writerows([("text", "label"), *zip(TEXTS, truth)])
    predicted = [["ham", "spam"][i] for i in hf_logits(hf_dir, TEXTS).argmax(-1).tolist()]
    accuracy = sum(p == t for p, t in zip(predicted, truth)) / len(truth)
    out = tmp_path / "report.json"
    proc = subprocess.run([*runner.launcher(1), "-m", "dist_finetune.evaluate", "--weights", str(hf_dir), "--data",
                           str(data), "--batch-size", "3", "--out", str(out)],
                          cwd=runner.REPO, env=runner.child_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["labels"] == ["ham", "spam"] and report["examples"] == len(truth)
    assert report["accuracy"] == pytest.approx(accuracy)
    assert report["run"] is None and report["max_length"] == CTX


def tiny(num_classes: int, pooling: str = "last_token") -> GPTClassifier:
    return GPTClassifier(GPTConfig(vocab_size=50257, context_length=CTX, n_embd=64, n_layer=2, n_head=4),
                         num_classes, pooling)


def test_head_rows_follow_the_data_labels(hf_dir, tmp_path):
    score = GPT2ForSequenceClassification.from_pretrained(hf_dir).score.weight.detach()
    reversed_dir = relabelled(hf_dir, tmp_path / "rev", {0: "spam", 1: "ham"})
    model = tiny(2)
    report = load_pretrained(model, str(reversed_dir), labels=("ham", "spam"))
    assert report.head_loaded and torch.equal(model.head.weight, score[[1, 0]])
    generic = relabelled(hf_dir, tmp_path / "generic", {0: "LABEL_0", 1: "LABEL_1"})
    load_pretrained(model, str(generic), labels=(0, 1))  # placeholder names match the labels 0..N-1
    assert torch.equal(model.head.weight, score)


@pytest.mark.parametrize("labels, pooling, words", [
    (("a", "b", "c"), "last_token", ["['ham', 'spam']", "['a', 'b', 'c']", "model.head=new"]),
    (("ham", "eggs"), "last_token", ["['ham', 'spam']", "['eggs', 'ham']", "model.head=new"]),
    (("ham", "spam"), "last", ["model.pooling=last", "model.pooling=last_token", "model.head=new"]),
])
def test_a_mismatch_is_one_line_naming_the_fix(hf_dir, labels, pooling, words):
    with pytest.raises(WeightsError) as err:
        load_pretrained(tiny(len(labels), pooling), str(hf_dir), labels=tuple(sorted(labels)))
    message = str(err.value)
    assert "\n" not in message and all(w in message for w in words), message
    model = tiny(len(labels), pooling)  # the fix: a fresh head on the imported backbone
    assert not load_pretrained(model, str(hf_dir), head_policy="new", labels=labels).head_loaded


def test_evaluate_weights_refuses_foreign_labels(hf_dir, tmp_path, capsys):
    data = tmp_path / "other.csv"
    data.write_text("text,label\nhello,positive\n")
    assert evaluate.main(["--weights", str(hf_dir), "--data", str(data), "--out", str(tmp_path / "r.json")]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "positive" in err and "spam" in err, err


def test_finetune_from_it_keeps_the_label_order(hf_dir, tmp_path):
    """Rows named spam, ham (in that order) train on the ham/spam data as the same classes."""
    score = GPT2ForSequenceClassification.from_pretrained(hf_dir).score.weight.detach()
    folder = relabelled(hf_dir, tmp_path / "rev", {0: "spam", 1: "ham"})
    run = runner.train(tmp_path, "ft", overrides=[f"model.weights={folder}", "train.max_steps=2", "train.lr=1e-7",
                                                 "eval.max_batches=1"])
    assert run.ok, run.output()
    model, labels = load_export(run.dir / "export")
    assert labels == ["ham", "spam"]
    torch.testing.assert_close(model.head.weight, score[[1, 0]], atol=1e-5, rtol=0)
    assert model.head.bias.abs().max() < 1e-5
