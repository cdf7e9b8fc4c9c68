"""data.text_pair_column for the Llama / Qwen3 decoders: the two texts joined by the tokenizer's own encoding of a
blank line (GPT-2's stays token 628), recorded in the export, and a tiny decoder trained on pairs whose export
predicts as evaluate does."""
from __future__ import annotations

import csv
import dataclasses
import json
import random
import shutil
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import runner  # noqa: E402
from decoder_checkpoints import save_tokenizer, tokenizer_checkpoint, train_tokenizer  # noqa: E402
from dist_finetune import Classifier  # noqa: E402
from dist_finetune.config import DataConfig, from_dict  # noqa: E402
from dist_finetune.data import DataError, load_data  # noqa: E402
from dist_finetune.encoding import (PAIR_SEPARATOR, PairSeparatorError, encode_pairs, fit_example,  # noqa: E402
                                    full_length, pair_separator)
from dist_finetune.errors import UserError  # noqa: E402
from dist_finetune.hf_tokenizer import HFTokenizer  # noqa: E402
from dist_finetune.tokenizer import GPT2_BPE  # noqa: E402
from dist_finetune.weights import WeightsError, read_export_info, save_export  # noqa: E402

WORDS = "the report covers the budget the travel plan the office move and the printer".split()
ANSWERS = {"yes": "yes, that is right", "no": "no, that is wrong"}


@pytest.fixture(scope="module")
def bpe():
    return train_tokenizer()


@pytest.fixture(scope="module")
def tokenizers_(bpe, tmp_path_factory) -> dict[str, HFTokenizer]:
    """Llama 3 style (<|begin_of_text|> first, through the post-processor) and Qwen3 style (no special tokens)."""
    tmp = tmp_path_factory.mktemp("tokenizers")
    return {"llama": HFTokenizer.from_folder(save_tokenizer(bpe, tmp / "llama", bos_template=True)),
            "qwen3": HFTokenizer.from_folder(save_tokenizer(bpe, tmp / "qwen3", bos_template=False,
                                                            pad_token="<pad>"))}


def write_split(path: Path, rows: int, seed: int) -> list[tuple[str, str, str]]:
    """Rows (question, answer, label): a long question, the label in the short answer (as test_text_pairs.py)."""
    rng = random.Random(seed)
    labels = ["yes", "no"] * (rows // 2)
    rng.shuffle(labels)
    table = [(" ".join(rng.choice(WORDS) for _ in range(30)), ANSWERS[label], label) for label in labels]
    runner.write_csv(path, ("question", "answer", "label"), table)
    return table


def test_gpt2_separator_is_its_paragraph_token():
    assert pair_separator(GPT2_BPE) == pair_separator() == PAIR_SEPARATOR == (628,)
    assert GPT2_BPE.encode("\n\n") == [628]
    assert encode_pairs(GPT2_BPE, ["yes, that is right"]) == GPT2_BPE.encode_batch(["yes, that is right"])


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_decoder_separator_is_the_tokenizers_blank_line_and_a_pair_is_cut_longest_first(family, tokenizers_):
    tok = tokenizers_[family]
    sep = pair_separator(tok)
    assert sep and list(sep) == tok.encode("\n\n", add_special_tokens=False) and 628 not in sep
    bos = [tok.bos_id] if family == "llama" else []  # Llama 3's post-processor puts <|begin_of_text|> first
    assert tok.encode("\n\n") == bos + list(sep)
    text = tok.encode(" ".join(WORDS * 3))
    pair = encode_pairs(tok, [ANSWERS["yes"]])[0]
    assert text[:len(bos)] == bos and pair == tok.encode(ANSWERS["yes"], add_special_tokens=False)  # one BOS only
    assert full_length(text, pair, sep) == len(text) + len(sep) + len(pair)
    roomy = len(text) + len(sep) + len(pair)
    assert fit_example(text, pair, roomy, separator=sep) == text + list(sep) + pair
    # longest first: the long question gives up tokens, the short answer keeps all of its own
    room = 2 * len(pair) + 2  # the answer fits in half of it
    assert fit_example(text, pair, room + len(sep), separator=sep) == text[:len(pair) + 2] + list(sep) + pair
    both = fit_example(text, text, 2 * 7 + len(sep), separator=sep)
    assert both == text[:7] + list(sep) + text[:7]


def test_a_tokenizer_that_encodes_a_blank_line_to_nothing_is_one_clear_error(bpe, tmp_path):
    from tokenizers import normalizers

    stripping = type(bpe).from_str(bpe.to_str())
    stripping.normalizer = normalizers.Strip()  # "\n\n" -> "": zero tokens
    tok = HFTokenizer.from_folder(save_tokenizer(stripping, tmp_path / "strip", bos_template=False,
                                                 pad_token="<pad>"))
    with pytest.raises(PairSeparatorError, match=r'encodes a blank line \("\\n\\n"\) to zero tokens') as caught:
        pair_separator(tok)
    assert isinstance(caught.value, UserError) and "\n" not in str(caught.value)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_load_data_joins_decoder_pairs_with_their_separator(family, tokenizers_, tmp_path):
    tok = tokenizers_[family]
    files = runner.split_files(tmp_path, write_split, (8, 4, 4))
    cfg = DataConfig(train_file=str(files["train"]), val_file=str(files["val"]), test_file=str(files["test"]),
                     text_column="question", text_pair_column="answer", max_length=48)
    bundle = load_data(cfg, context_length=128, tokenizer=tok)
    sep = list(pair_separator(tok))
    with files["train"].open(newline="") as f:
        answers = {row["question"]: row["answer"] for row in csv.DictReader(f)}
    assert len(bundle.train) == len(answers) == 8
    for ids, question in zip(bundle.train.token_ids, bundle.train.texts):
        text, pair = tok.encode(question), tok.encode(answers[question], add_special_tokens=False)
        assert len(text) > 48 and list(ids) == text[:48 - len(sep) - len(pair)] + sep + pair
    assert bundle.truncated["train"] == 8
    too_short = dataclasses.replace(cfg, max_length=len(sep) + 1)
    with pytest.raises(DataError, match="leaves no room for a text pair"):
        load_data(too_short, context_length=128, tokenizer=tok)


def test_the_first_texts_special_tokens_need_room_too(tokenizers_, tmp_path):
    """A Llama 3 tokenizer puts <|begin_of_text|> before the first text: the shortest max_length counts it, so the
    first text keeps a token of its own."""
    files = runner.split_files(tmp_path, write_split, (8, 4, 4))
    cfg = DataConfig(train_file=str(files["train"]), val_file=str(files["val"]), test_file=str(files["test"]),
                     text_column="question", text_pair_column="answer")
    least = len(pair_separator(tokenizers_["llama"])) + 3  # a token of each text, the separator, the BOS
    with pytest.raises(DataError, match=f"the tokenizer's 1 special token\\(s\\)\\); give at least {least}"):
        load_data(dataclasses.replace(cfg, max_length=least - 1), context_length=128, tokenizer=tokenizers_["llama"])
    bundle = load_data(dataclasses.replace(cfg, max_length=least), context_length=128, tokenizer=tokenizers_["llama"])
    assert all(len(ids) == least and ids[0] == tokenizers_["llama"].bos_id for ids in bundle.train.token_ids)
    load_data(dataclasses.replace(cfg, max_length=least - 1), context_length=128, tokenizer=tokenizers_["qwen3"])


def test_a_sentencepiece_style_tokenizer_is_refused_for_pairs(tmp_path):
    """Word starts marked with \u2581 (Llama 2, Mistral): texts encoded alone and joined would not read as one text."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.pre_tokenizer = pre_tokenizers.Split("\n", behavior="isolated")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<|begin_of_text|>", "<|end_of_text|>"])
    tok.train_from_iterator(["is it right\n\nyes it is", "no it is not\n\nright"] * 20, trainer)
    sp = HFTokenizer.from_folder(save_tokenizer(tok, tmp_path / "sp", bos_template=False))
    with pytest.raises(PairSeparatorError, match="marks word starts SentencePiece-style"):
        pair_separator(sp)


def test_decoder_configs_take_text_pairs():
    cfg = from_dict({"model": {"name": "auto", "weights": "/some/folder"},
                     "data": {"train_file": "t.csv", "text_pair_column": "b"}})
    assert cfg.data.text_pair_column == "b"


def test_gpt2_pair_export_still_records_628(tmp_path):
    import torch

    from dist_finetune.model import GPTClassifier, GPTConfig

    torch.manual_seed(0)
    model = GPTClassifier(GPTConfig(n_layer=1, n_head=2, n_embd=32, context_length=64), 2, "last_token")
    save_export(model, tmp_path / "export", "last_token", ["no", "yes"], max_length=32, padding="longest",
                text_pair_column="answer")
    config = json.loads((tmp_path / "export" / "model_config.json").read_text())
    assert config["pair_separator"] == [628] and config["tokenizer"] == "gpt2"
    assert read_export_info(tmp_path / "export").text_pair_column == "answer"
    clf = Classifier.load(tmp_path / "export", device="cpu")
    assert clf.info.pair_separator == (628,)
    assert len(clf.predict(["is it?"], pairs=[ANSWERS["yes"]])) == 1
    config["pair_separator"] = [198, 198]
    (tmp_path / "export" / "model_config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match=r"pair_separator \[198, 198\] is not this version's \[628\]"):
        read_export_info(tmp_path / "export")


def cli(module: str, *args: object, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [*runner.launcher(1), "-m", f"dist_finetune.{module}", *map(str, args)]
    proc = subprocess.run(cmd, cwd=runner.REPO, env=runner.child_env(), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-5000:]}"
    return proc


@pytest.mark.slow
def test_one_rank_decoder_trains_on_pairs_exports_and_predicts_as_evaluate(bpe, tmp_path):
    """A tiny Llama (Llama 3 tokenizer: <|begin_of_text|> first) on text pairs: the export records the tokenizer's
    separator, and predict on the export alone (CLI and Python) agrees with evaluate on the test file."""
    folder = tokenizer_checkpoint(tmp_path / "llama", "llama", tied=False, tok=bpe)
    data = runner.split_files(tmp_path, write_split, (32, 8, 12))
    base = {"seed": 123, "precision": "fp32", "model": {"name": "auto", "trainable": "all", "weights": str(folder)},
            "data": {"padding": "longest", "max_length": 24},
            "train": {"epochs": 1, "micro_batch_size": 8, "lr": 1e-3, "max_steps": 4, "log_every_steps": 1},
            "early_stopping": {"enabled": False}, "report": {"plots": False}}
    run = runner.train(tmp_path, "run", base=base, timeout=600, overrides=[
        *runner.split_overrides(data), "data.text_column=question", "data.text_pair_column=answer"])
    assert run.ok, run.output()
    export = run.dir / "export"
    config = json.loads((export / "model_config.json").read_text())
    separator = list(pair_separator(HFTokenizer.from_folder(export)))
    assert config["text_pair_column"] == "answer" and config["tokenizer"] == "tokenizer.json"
    assert config["pair_separator"] == separator != [628]

    cli("evaluate", "--run", run.dir, "--data", data["test"], "--out", tmp_path / "eval.json")
    result = json.loads((tmp_path / "eval.json").read_text())
    cli("predict", "--model", run.dir, "--input", data["test"], "--output", tmp_path / "pred.csv")
    with (tmp_path / "pred.csv").open(newline="") as f:
        out = list(csv.DictReader(f))
    labels = ["no", "yes"]
    confusion = [[sum(r["label"] == a and r["predicted_label"] == b for r in out) for b in labels] for a in labels]
    assert len(out) == result["examples"] == 12 and confusion == result["confusion_matrix"]
    assert result["accuracy"] == pytest.approx(run.summary()["test"]["accuracy"])

    clf = Classifier.load(run.dir, device="cpu")
    assert list(clf.info.pair_separator) == separator
    predictions = clf.predict([r["question"] for r in out], pairs=[r["answer"] for r in out])
    assert [p.label for p in predictions] == [r["predicted_label"] for r in out]

    tampered = Path(shutil.copytree(export, tmp_path / "tampered"))
    (tampered / "model_config.json").write_text(json.dumps({**config, "pair_separator": [628]}))
    with pytest.raises(WeightsError, match=r"pair_separator \[628\] is not this version's"):
        Classifier.load(tampered, device="cpu")
