"""`--format hf` / checkpoint.export_formats: [native, hf]: a transformers GPT2ForSequenceClassification
folder that real transformers (pipeline, AutoModel..., AutoTokenizer) loads and that answers as our
Classifier does, the head's bias folded into ln_f exactly.

One tiny run (module fixture) with last_token pooling, padded to the longest text of each batch and a
head trained with its bias; both formats written by training itself.
"""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

import runner
from dist_finetune import Classifier, runs
from dist_finetune.config import ConfigError, load_config
from dist_finetune.export import main as export_main
from dist_finetune.hf_export import EOT_WARNING, HF_FILES, HfExportError, save_hf
from dist_finetune.model import GPTClassifier, GPTConfig
from dist_finetune.tokenizer import encode_batch

LONG = "URGENT! call now to claim your free prize " * 12  # ~100 tokens: longer than max_length (64)
SHORT = ["ok", "Sir, waiting for your letter.", "FREE entry: txt WIN to 80086 now", "see you at 8 then?",
         "WINNER!! claim your cash prize today, reply YES", "k", "Où est la gare? 日本語 ünïcödé ✓",
         "  leading spaces and\ttabs\nand newlines  ", "a <|endoftext|> in the middle", "call me later",
         "Congratulations, you have been selected for a free cruise! Call 0800 now", "lol", "what's up?"]
TEXTS = [*SHORT, LONG, *(t.upper() for t in SHORT), LONG[:150], "thanks", "ok ok ok ok ok ok ok ok"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> runner.Run:
    tmp = tmp_path_factory.mktemp("hf")
    run = runner.train(tmp, "run", overrides=[
        "train.max_steps=20", "eval.every_steps=20", "data.padding=longest", "model.pooling=last_token",
        "model.head_init=torch", "checkpoint.export_formats=[native, hf]"])
    assert run.ok, run.output()
    return run


@pytest.fixture(scope="module")
def hf_dir(trained):
    return trained.dir / "export_hf"


@pytest.fixture(scope="module")
def clf(trained) -> Classifier:
    return Classifier.load(trained.dir / "export", device="cpu")


def test_training_writes_both_formats_and_the_hf_folder_is_complete(trained, hf_dir):
    assert len(TEXTS) == 30
    assert sorted(p.name for p in hf_dir.iterdir()) == sorted(HF_FILES)
    assert f"{trained.dir / 'export'}, {hf_dir}" in trained.proc.stdout + trained.proc.stderr
    assert EOT_WARNING in trained.proc.stdout  # training's own hf export says it too
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["architectures"] == ["GPT2ForSequenceClassification"] and config["model_type"] == "gpt2"
    assert config["id2label"] == {"0": "ham", "1": "spam"} and config["label2id"] == {"ham": 0, "spam": 1}
    assert config["pad_token_id"] == 50256 and config["n_layer"] == 2 and config["n_embd"] == 64
    ours, theirs = load_file(trained.dir / "export" / "model.safetensors"), load_file(hf_dir / "model.safetensors")
    assert ours["head.bias"].abs().max() > 1e-3  # a real bias: the fold below is exercised
    assert "score.bias" not in theirs and torch.equal(theirs["score.weight"], ours["head.weight"])
    assert torch.equal(theirs["transformer.h.1.attn.c_attn.weight"], ours["backbone.blocks.1.attn.qkv.weight"].T)
    assert not torch.equal(theirs["transformer.ln_f.bias"], ours["backbone.ln_f.bias"])  # the folded bias
    assert runs.foreign_files(trained.dir, sorted(os.listdir(trained.dir))) == []  # --overwrite may replace it


def test_pipeline_answers_as_our_classifier_does(hf_dir, clf):
    from transformers import pipeline

    pipe = pipeline("text-classification", model=str(hf_dir), top_k=None, device="cpu")
    theirs = pipe(TEXTS, batch_size=8, truncation=True)  # padded batches; truncated to max_length as ours
    mine = clf.predict(TEXTS, batch_size=5)
    for text, pred, scores in zip(TEXTS, mine, theirs):
        by_label = {s["label"]: s["score"] for s in scores}
        assert scores[0]["label"] == pred.label, text
        assert by_label == pytest.approx(pred.probabilities, abs=1e-5), text


def test_auto_classes_round_trip_and_save_pretrained_reloads(hf_dir, clf, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    assert tokenizer(TEXTS)["input_ids"] == encode_batch(TEXTS)
    model = AutoModelForSequenceClassification.from_pretrained(hf_dir).eval()
    batch = tokenizer(SHORT, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
        lengths = batch["attention_mask"].sum(1)
        mine = clf.model(batch["input_ids"], lengths)
    assert logits.shape == (len(SHORT), 2) and (logits - mine).abs().max() < 1e-5
    model.save_pretrained(tmp_path / "saved")
    tokenizer.save_pretrained(tmp_path / "saved")
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path / "saved").eval()
    with torch.no_grad():
        assert torch.equal(again(**batch).logits, logits)
    assert again.config.id2label == {0: "ham", 1: "spam"}


def test_the_export_command_writes_the_same_folder_and_warns(trained, hf_dir, tmp_path, capsys):
    assert export_main(["--run", str(trained.dir), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert EOT_WARNING in capsys.readouterr().out
    for name in HF_FILES:
        assert (tmp_path / "hf" / name).read_bytes() == (hf_dir / name).read_bytes(), name


def test_our_export_read_back_by_evaluate_weights_scores_as_the_run(trained, hf_dir, tmp_path):
    """The way out and the way back in: evaluate --weights on export_hf equals evaluate --run on the same file."""
    from dist_finetune.evaluate import main as evaluate_main

    data = tmp_path / "sample.csv"
    rows = [(t, "spam" if "free" in t.lower() or "win" in t.lower() else "ham") for t in TEXTS]
    data.write_text("text,label\n" + "".join(f'"{t.replace(chr(34), chr(34) * 2)}",{label}\n' for t, label in rows))
    base = ["--data", str(data), "--batch-size", "7"]
    assert evaluate_main(["--run", str(trained.dir), *base, "--out", str(tmp_path / "run" / "r.json")]) == 0
    assert evaluate_main(["--weights", str(hf_dir), *base, "--max-length", "64",
                          "--out", str(tmp_path / "hf" / "r.json")]) == 0
    ours, back = (json.loads((tmp_path / name / "r.json").read_text()) for name in ("run", "hf"))
    assert back["examples"] == ours["examples"] == 30 and back["confusion_matrix"] == ours["confusion_matrix"]
    assert back["loss"] == pytest.approx(ours["loss"], abs=1e-5)


def test_a_run_without_last_token_pooling_is_refused(trained, tmp_path, capsys):
    other = tmp_path / "mean_run"  # the run's config only: the refusal comes before any checkpoint is read
    other.mkdir()
    for name in ("config.yaml", ".dist_finetune_run"):
        shutil.copy(trained.dir / name, other / name)
    text = (other / "config.yaml").read_text().replace("pooling: last_token", "pooling: mean")
    text = text.replace("  - native\n  - hf\n", "  - native\n")  # trained for the native export alone
    (other / "config.yaml").write_text(text)
    assert export_main(["--run", str(other), "--format", "hf", "--out", str(tmp_path / "hf")]) != 0
    err = capsys.readouterr().err
    assert "model.pooling=mean has no transformers equivalent" in err and "--format native" in err, err
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("pooling", ["last", "first", "mean"])
def test_poolings_transformers_does_not_have_are_refused(pooling, tmp_path):
    with pytest.raises(ConfigError, match=f"model.pooling={pooling} has no transformers equivalent"):
        load_config(None, [f"model.pooling={pooling}", "checkpoint.export_formats=[native, hf]"])
    model = GPTClassifier(GPTConfig(n_embd=16, n_layer=1, n_head=2, context_length=8), 2, pooling=pooling)
    with pytest.raises(HfExportError, match="last_token"):
        save_hf(model, tmp_path / "hf", ["a", "b"], 8)
    assert not (tmp_path / "hf").exists()


def test_lora_adapters_are_merged_and_the_model_given_is_left_as_it_was(tmp_path):
    from transformers import AutoModelForSequenceClassification

    from dist_finetune.config import LoraConfig
    from dist_finetune.lora import apply_lora, has_lora

    torch.manual_seed(0)
    model = GPTClassifier(GPTConfig(n_embd=16, n_layer=1, n_head=2, context_length=16), 3, pooling="last_token")
    apply_lora(model, LoraConfig(targets=("attn", "mlp", "head")))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora" in name or name.endswith("bias"):
                p.normal_(0, 0.5)  # adapters and biases that change the logits
    save_hf(model.eval(), tmp_path / "hf", ["x", "y", "z"], 16)
    assert has_lora(model)
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 50256, 50256]])
    theirs = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        mine = model(ids, torch.tensor([4, 2]))
        assert (theirs(input_ids=ids, attention_mask=(ids != 50256).long()).logits - mine).abs().max() < 1e-5
