"""The zero-shot prompt baseline: answer-token scoring, prompts that fit the context, the command."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_finetune.model import GPT, GPTClassifier, GPTConfig
from dist_finetune.tokenizer import VOCAB_SIZE, encode
from dist_finetune.weights import load_language_model, save_export
from dist_finetune.zeroshot import (
    DEFAULT_TEMPLATE,
    SMS_ANSWERS,
    Template,
    ZeroShotError,
    answer_scores,
    answer_token_ids,
    build_prompts,
    label_map_of,
    main,
    metrics_of,
    parse_answers,
    score_prompts,
)
from runner import REPO, child_env

TINY = GPTConfig(context_length=64, n_embd=64, n_layer=2, n_head=4)
NO, YES = encode(" no")[0], encode(" yes")[0]


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    """A tiny random checkpoint in our export format (n_head from its model_config.json)."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny") / "export"
    save_export(GPTClassifier(TINY, 2), folder, "last", ["ham", "spam"])
    return folder


# ---------------------------------------------------------------- scoring


def test_scores_are_the_answer_logits_and_the_prediction_their_argmax():
    logits = torch.zeros(3, VOCAB_SIZE)
    logits[0, YES], logits[0, NO] = 2.0, 1.0  # spam, says yes
    logits[1, YES], logits[1, NO] = -1.0, 3.0  # ham, says no
    logits[2, YES], logits[2, NO] = 5.0, 0.0  # ham, says yes: wrong
    logits[:, 0] = 100.0  # the most likely token overall is no answer: ignored
    label_map, answers = label_map_of(dict(SMS_ANSWERS))
    assert label_map.labels == ("ham", "spam") and answers == {"ham": " no", "spam": " yes"}
    ids = answer_token_ids(answers)
    assert ids == [NO, YES]
    scores = answer_scores(logits, ids)
    assert scores.tolist() == [[1.0, 2.0], [3.0, -1.0], [0.0, 5.0]]
    result = metrics_of(scores, torch.tensor([1, 0, 0]), ["ham", "spam"])
    assert result["confusion_matrix"] == [[1, 1], [0, 1]]
    assert result["accuracy"] == pytest.approx(2 / 3)
    expected_loss = torch.nn.functional.cross_entropy(scores, torch.tensor([1, 0, 0]))
    assert result["loss"] == pytest.approx(float(expected_loss))
    assert [c["label"] for c in result["per_class"]] == ["ham", "spam"]


def test_a_model_that_always_says_yes_predicts_spam():
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    with torch.no_grad():  # every hidden state is the " yes" embedding: " yes" beats " no" everywhere
        model.ln_f.weight.zero_()
        model.ln_f.bias.copy_(model.wte.weight[YES] * 10)
    prompts, _ = build_prompts(["hello", "you won a prize, call now"], Template.parse(DEFAULT_TEMPLATE), 64)
    scores = score_prompts(model, prompts, [NO, YES])
    assert scores.argmax(-1).tolist() == [1, 1]
    result = metrics_of(scores, torch.tensor([0, 1]), ["ham", "spam"])
    assert result["confusion_matrix"] == [[0, 1], [0, 1]]


def test_batched_scores_use_each_prompts_last_token():
    torch.manual_seed(1)
    model = GPT(TINY).eval()
    prompts = [encode("a short one"), encode("a much longer prompt than the first of them"), encode("mid size text")]
    together = score_prompts(model, prompts, [NO, YES], batch_size=3)
    alone = torch.cat([score_prompts(model, [p], [NO, YES]) for p in prompts])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)
    with torch.no_grad():
        direct = model.lm_logits(model(torch.tensor([prompts[1]]))[0, -1])[[NO, YES]]
    torch.testing.assert_close(together[1], direct, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- prompts and answers


def test_prompt_is_the_filled_in_template_and_long_texts_lose_their_start():
    template = Template.parse("Q: '{text}' A:")
    short, long = "hi there", " ".join(f"w{i}" for i in range(100))
    prompts, truncated = build_prompts([short, long], template, 40)
    assert prompts[0] == encode("Q: 'hi there' A:")
    assert truncated == 1 and len(prompts[1]) == 40
    head, tail = encode("Q: '"), encode("' A:")
    assert prompts[1][:len(head)] == head and prompts[1][-len(tail):] == tail
    assert prompts[1][len(head):-len(tail)] == encode(long)[-(40 - len(head) - len(tail)):]


def test_default_template_is_the_chapters_question():
    assert DEFAULT_TEMPLATE.format(text="You are a winner") == (
        "Is the following text 'spam'? Answer with 'yes' or 'no': 'You are a winner'")


@pytest.mark.parametrize("call, message", [
    (lambda: Template.parse("no placeholder"), "--template must hold {text} exactly once"),
    (lambda: build_prompts(["x"], Template.parse("word " * 70 + "{text}"), 64), "leaving no room for the text"),
    (lambda: parse_answers(["spam"]), "is not LABEL=WORD"),
    (lambda: parse_answers(["spam= yes"]), "at least two labels"),
    (lambda: answer_token_ids({"spam": " yes please", "ham": " no"}), "' yes please' for label 'spam' is 2 GPT-2"),
    (lambda: answer_token_ids({"spam": " yes", "ham": " yes"}), "same answer token"),
])
def test_user_errors_name_the_flag(call, message):
    with pytest.raises(ZeroShotError, match=message.replace("{", r"\{").replace("}", r"\}").replace("?", r"\?")):
        call()


def test_integer_labels_sort_as_numbers():
    label_map, answers = label_map_of(parse_answers(["10= yes", "2= no"]))
    assert label_map.labels == (2, 10) and answers == {2: " no", 10: " yes"}


# ---------------------------------------------------------------- the command


def test_zero_shot_on_the_bundled_test_split_writes_its_metrics(export, tmp_path):
    out = tmp_path / "zs.json"
    proc = subprocess.run([sys.executable, "-m", "dist_finetune.zeroshot", "--weights", str(export), "--split", "test",
                           "--out", str(out), "--device", "cpu"],
                          cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["examples"] == 300 and report["split"] == "test"
    assert sum(map(sum, report["confusion_matrix"])) == 300
    assert report["labels"] == ["ham", "spam"] and report["answer_token_ids"] == [NO, YES]
    assert report["template"] == DEFAULT_TEMPLATE and report["method"] == "zero-shot"
    assert {"loss", "accuracy", "macro", "weighted", "per_class"} <= set(report)
    assert report["truncated"] > 0 and "their first tokens were dropped" in proc.stderr  # context 64
    assert "confusion matrix" in proc.stdout and f"wrote {out}" in proc.stdout


def test_zero_shot_on_a_file_with_its_own_answers(export, tmp_path, capsys, monkeypatch):
    data = tmp_path / "reviews.csv"
    data.write_text('review,sentiment\n"great film",pos\n"dull and long",neg\n"loved it",pos\n')
    monkeypatch.chdir(tmp_path)
    args = ["--weights", str(export), "--data", str(data), "--text-column", "review", "--label-column", "sentiment",
            "--template", "Review: {text}\nPositive?", "--device", "cpu"]
    assert main([*args, "--answers", "pos= yes", "neg= no"]) == 0
    report = json.loads((tmp_path / "zeroshot_reviews.json").read_text())
    assert report["labels"] == ["neg", "pos"] and report["examples"] == 3 and report["split"] is None
    capsys.readouterr()

    assert main([*args, "--overwrite"]) == 2  # pos / neg have no default answers
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "have no answer word" in err[0] and "--answers" in err[0]


def test_an_existing_report_is_replaced_only_with_overwrite(export, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    report = tmp_path / "zeroshot_val.json"
    report.write_text("{}\n")
    args = ["--weights", str(export), "--split", "val", "--device", "cpu"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "zeroshot_val.json already exists" in err[0] and "--overwrite" in err[0]
    assert report.read_text() == "{}\n"
    assert main([*args, "--overwrite"]) == 0
    assert json.loads(report.read_text())["split"] == "val"


def test_missing_weights_and_label_column_are_one_line_errors(export, tmp_path, capsys):
    assert main(["--weights", str(tmp_path / "nothing")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    data = tmp_path / "d.csv"
    data.write_text("text,y\nhello,ham\n")
    assert main(["--weights", str(export), "--data", str(data)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no column 'label'" in err[0] and "--label-column" in err[0]


def test_export_folder_loads_as_a_language_model(export):
    model = load_language_model(str(export))
    assert model.config == TINY
