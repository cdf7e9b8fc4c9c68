"""`generate` and `zeroshot` on tiny random Llama / Qwen3 checkpoints with a trained tokenizer (CPU, fp32,
offline): greedy tokens equal to transformers' generate(do_sample=False), plain and in the checkpoint's
chat template (rendered as AutoTokenizer.apply_chat_template renders it), the eos ids it stops at, and
zeroshot's answer scores equal to transformers' next-token logits."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("jinja2")

from dist_finetune.generate import checkpoint_eos_ids, generate, load_lm  # noqa: E402
from dist_finetune.hf_tokenizer import TokenizerError  # noqa: E402
from dist_finetune.zeroshot import Template, answer_token_ids, build_prompts, score_prompts  # noqa: E402
from decoder_checkpoints import edit_json, tokenizer_checkpoint, train_tokenizer  # noqa: E402
from runner import REPO, child_env  # noqa: E402

PROMPTS = ["the model classifies spam", "Hello world", "café 2024 東京"]
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
LLAMA3_LIKE = """{{- bos_token }}
{%- for message in messages %}
    {%- if message['role'] not in ['user', 'assistant'] %}{{ raise_exception('unknown role') }}{% endif %}
    {%- if loop.index0 > 5 %}{% break %}{% endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""
TEMPLATES = {"llama": LLAMA3_LIKE, "qwen3": CHATML}


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer()


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def checkpoint(request, tok, tmp_path_factory) -> Path:
    """A tied Llama (Llama 3 style <|begin_of_text|>) or untied Qwen3 with a chat template."""
    folder = tokenizer_checkpoint(tmp_path_factory.mktemp(request.param), request.param, request.param == "llama", tok)
    edit_json(folder / "tokenizer_config.json", chat_template=TEMPLATES[request.param])
    return folder


def hf_greedy(folder: Path, ids: list[int], n: int) -> list[int]:
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        out = hf.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=n, do_sample=False,
                          pad_token_id=0)
    return out[0, len(ids):].tolist()


def assert_same_greedy(ours: list[int], theirs: list[int], eos_ids: tuple[int, ...]) -> None:
    """transformers keeps the eos token it stops at; we stop before it."""
    assert theirs[:len(ours)] == ours
    assert len(theirs) == len(ours) or theirs[len(ours)] in eos_ids


def hf_chat_text(folder: Path, prompt: str) -> str:
    auto = transformers.AutoTokenizer.from_pretrained(folder)
    return auto.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)


# ---------------------------------------------------------------- generate


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_matches_transformers(checkpoint, prompt):
    lm = load_lm(str(checkpoint))
    ids = lm.codec.encode_prompts([prompt])[0]
    assert ids == transformers.AutoTokenizer.from_pretrained(checkpoint)(prompt)["input_ids"]
    ours = generate(lm.model, ids, 40, eos_id=lm.eos_ids)
    assert_same_greedy(ours, hf_greedy(checkpoint, ids, 40), lm.eos_ids)


@pytest.mark.parametrize("prompt", PROMPTS + ["  spaces around  "])
def test_chat_template_renders_and_generates_as_transformers(checkpoint, prompt):
    lm = load_lm(str(checkpoint))
    text = hf_chat_text(checkpoint, prompt)
    assert lm.codec.chat(prompt) == text
    ids = lm.codec.encode_prompts([prompt], chat_template=True)[0]
    assert ids == transformers.AutoTokenizer.from_pretrained(checkpoint)(text, add_special_tokens=False)["input_ids"]
    ours = generate(lm.model, ids, 30, eos_id=lm.eos_ids)
    assert_same_greedy(ours, hf_greedy(checkpoint, ids, 30), lm.eos_ids)


def test_eos_ids_are_config_and_generation_config(checkpoint, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(checkpoint, folder)
    edit_json(folder / "config.json", eos_token_id=[2, 5])
    edit_json(folder / "generation_config.json", eos_token_id=[7, 2])
    lm = load_lm(str(folder))
    assert lm.eos_ids == (2, 5, 7) == checkpoint_eos_ids(folder, lm.model.config)
    (folder / "generation_config.json").unlink()
    assert checkpoint_eos_ids(folder, lm.model.config) == (2, 5)


def test_generation_stops_at_any_eos_id(checkpoint, tmp_path):
    lm = load_lm(str(checkpoint))
    ids = lm.codec.encode_prompts([PROMPTS[0]])[0]
    free = generate(lm.model, ids, 10, eos_id=None)
    stop = free[3]
    first = free.index(stop)
    assert generate(lm.model, ids, 10, eos_id=(999, stop)) == free[:first]
    folder = tmp_path / "ckpt"
    shutil.copytree(checkpoint, folder)
    edit_json(folder / "generation_config.json", eos_token_id=[2, stop])
    proc = cli("generate", "--weights", str(folder), PROMPTS[0], "--max-new-tokens", "10", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == lm.codec.decode(free[:first]) + "\n"
    if 2 not in free[:first + 1]:
        assert f"stopped at an eos token after {first} new token(s)" in proc.stderr


# ---------------------------------------------------------------- the commands


def cli(command: str, *args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", f"dist_finetune.{command}", *args], cwd=cwd, env=child_env(),
                          capture_output=True, timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode("utf-8"),
                                       proc.stderr.decode("utf-8"))


def test_cli_generates_the_greedy_continuation(checkpoint):
    lm = load_lm(str(checkpoint))
    for switch in ([], ["--chat-template"]):
        proc = cli("generate", "--weights", str(checkpoint), PROMPTS[1], "--max-new-tokens", "12", "--device", "cpu",
                   *switch)
        assert proc.returncode == 0, proc.stderr
        ids = lm.codec.encode_prompts([PROMPTS[1]], chat_template=bool(switch))[0]
        assert proc.stdout == lm.codec.decode(generate(lm.model, ids, 12, eos_id=lm.eos_ids)) + "\n"


def test_an_unsupported_model_type_is_named(checkpoint, tmp_path):
    from dist_finetune.weights import WeightsError

    folder = tmp_path / "mistral"
    shutil.copytree(checkpoint, folder)
    edit_json(folder / "config.json", model_type="mistral", sliding_window=4096)
    with pytest.raises(WeightsError, match=r"config\.json: model_type 'mistral' is not supported"):
        load_lm(str(folder))


def test_chat_template_without_one_is_a_one_line_error(checkpoint, tmp_path):
    folder = tmp_path / "base"
    shutil.copytree(checkpoint, folder)
    edit_json(folder / "tokenizer_config.json", chat_template=None)
    with pytest.raises(TokenizerError, match="no chat template"):
        load_lm(str(folder)).codec.chat("hi")
    proc = cli("generate", "--weights", str(folder), "hi", "--chat-template", "--device", "cpu")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().count("\n") == 0 and "has no chat template" in proc.stderr
    proc = cli("generate", "--weights", str(folder), "hi", "--n-head", "4")
    assert proc.returncode == 2 and "--n-head applies to GPT-2 weights only" in proc.stderr


@pytest.mark.parametrize("template, message", [
    ("{{ 1 / 0 }}", "ZeroDivisionError"),
    ("{{ messages[0]['content'] + 1 }}", "TypeError"),
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "unsafe|not safely|access to attribute"),
    ("{{ raise_exception('no users here') }}", "refuses the prompt: no users here"),
    ("{% for i in range(10**9) %}{% endfor %}", "range too big|OverflowError"),
])
def test_a_template_that_fails_or_escapes_is_one_line_error(template, message):
    """A checkpoint's chat template is untrusted: it renders sandboxed, and whatever it raises is one TokenizerError."""
    from dist_finetune.hf_tokenizer import render_chat

    with pytest.raises(TokenizerError, match=f"--chat-template: the checkpoint's chat template .*({message})"):
        render_chat(template, "hi", {"bos_token": "<s>"})


def test_a_template_that_loops_too_long_is_stopped(monkeypatch):
    import time

    from dist_finetune import hf_tokenizer

    monkeypatch.setattr(hf_tokenizer, "RENDER_SECONDS", 0.5)
    start = time.monotonic()
    with pytest.raises(TokenizerError, match="did not finish rendering in 0.5 s"):
        hf_tokenizer.render_chat("{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
                                 "hi", {})
    assert time.monotonic() - start < 5
    assert hf_tokenizer.render_chat("{{ messages[0]['content'] }}", "hi", {}) == "hi"  # the alarm is off again
    time.sleep(0.7)  # and no stray SIGALRM arrives later


# ---------------------------------------------------------------- zeroshot


def hf_next_logits(folder: Path, prompts: list[list[int]]) -> torch.Tensor:
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return torch.stack([hf(input_ids=torch.tensor([ids])).logits[0, -1] for ids in prompts])


@pytest.mark.parametrize("chat", [False, True])
def test_zeroshot_scores_are_transformers_next_token_logits(checkpoint, chat):
    lm = load_lm(str(checkpoint))
    texts = ["the quick brown fox", "Hello", "spam spam spam café " * 3, "x" * 400]
    prompts, truncated = build_prompts(texts, Template.parse("Is '{text}' spam?"), 96, lm.codec, chat)
    assert truncated == 1 and len(prompts[3]) == 96
    fits = lm.codec.encode_prompts([f"Is '{t}' spam?" for t in texts[:3]], chat)
    assert prompts[:3] == fits
    answers = answer_token_ids({"ham": " the", "spam": " model"}, lm.codec)
    scores = score_prompts(lm.model, prompts, answers, batch_size=3, pad_id=lm.codec.pad_id)
    expected = hf_next_logits(checkpoint, prompts)[:, answers]
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)


def test_zeroshot_command_on_a_decoder(checkpoint, tmp_path):
    data = tmp_path / "d.csv"
    data.write_text("text,label\nthe quick fox,a\nHello world,b\nspam café,a\n")
    out = tmp_path / "r.json"
    proc = cli("zeroshot", "--weights", str(checkpoint), "--data", str(data), "--answers", "a= the", "b= model",
               "--chat-template", "--device", "cpu", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["chat_template"] is True and len(report["answer_token_ids"]) == 2
    proc = cli("zeroshot", "--weights", str(checkpoint), "--data", str(data), "--answers", "a=the quick fox",
               "b= model", "--device", "cpu", "--out", str(tmp_path / "x.json"))
    assert proc.returncode == 2 and "tokenizer.json tokens; each answer must be a single token" in proc.stderr
