"""Text generation from the language-model head: parity with transformers, stopping rules, the command."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from dist_finetune.generate import generate
from dist_finetune.model import GPT, GPTConfig
from dist_finetune.tokenizer import EOT_ID, decode, encode
from dist_finetune.weights import WeightsError, load_language_model
from runner import REPO, child_env

CTX = 64
PROMPT = "Every effort moves"


@pytest.fixture(scope="module")
def hf() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    # initializer_range 0.3 instead of 0.02: with GPT-2's init a tiny random model's logits are nearly flat
    # and greedy decoding repeats one token; larger weights give varied tokens, a stronger parity check.
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=CTX, vocab_size=50257,
                     activation_function="gelu_new", resid_pdrop=0, embd_pdrop=0, attn_pdrop=0,
                     initializer_range=0.3, pad_token_id=EOT_ID, eos_token_id=EOT_ID, bos_token_id=EOT_ID)
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="module")
def folder(hf, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def lm(folder) -> GPT:
    return load_language_model(str(folder))


def hf_greedy(hf: GPT2LMHeadModel, ids: list[int], n: int) -> list[int]:
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        out = hf.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=n,
                          do_sample=False, pad_token_id=EOT_ID, eos_token_id=EOT_ID)
    return out[0, len(ids):].tolist()


def assert_same_greedy(ours: list[int], theirs: list[int]) -> None:
    """transformers keeps the <|endoftext|> it stops at (and pads after it); we stop before it."""
    assert theirs[: len(ours)] == ours
    assert len(theirs) == len(ours) or theirs[len(ours)] == EOT_ID


# ---------------------------------------------------------------- the function


def test_loaded_model_is_the_transformers_model(lm):
    assert lm.config == GPTConfig(vocab_size=50257, context_length=CTX, n_embd=64, n_layer=2, n_head=4)
    assert not lm.training


@pytest.mark.parametrize("prompt", [PROMPT, "Is the following text 'spam'? Answer with 'yes' or 'no':"])
def test_greedy_matches_transformers_generate(hf, lm, prompt):
    ids = encode(prompt)
    ours = generate(lm, ids, 30)
    assert len(ours) == 30 and len(set(ours)) > 5  # varied tokens: a real check
    assert_same_greedy(ours, hf_greedy(hf, ids, 30))


def test_greedy_stops_at_the_context_limit(hf, lm):
    ids = encode(PROMPT)
    ours = generate(lm, ids, 500)
    assert len(ids) + len(ours) == CTX
    assert_same_greedy(ours, hf_greedy(hf, ids, CTX - len(ids)))


def test_stops_at_endoftext():
    torch.manual_seed(0)
    model = GPT(GPTConfig(context_length=CTX, n_embd=64, n_layer=2, n_head=4)).eval()
    with torch.no_grad():  # every position's hidden state is the endoftext embedding: it always wins
        model.ln_f.weight.zero_()
        model.ln_f.bias.copy_(model.wte.weight[EOT_ID] * 10)
    assert generate(model, encode(PROMPT), 10) == []
    assert generate(model, encode(PROMPT), 10, eos_id=None) == [EOT_ID] * 10


def test_sampling_is_reproducible_and_top_k_1_is_greedy(lm):
    ids = encode(PROMPT)

    def sample(seed: int, **kw) -> list[int]:
        return generate(lm, ids, 20, temperature=1.0, generator=torch.Generator().manual_seed(seed), **kw)

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)
    assert sample(3, top_k=1) == generate(lm, ids, 20)


def test_zero_new_tokens_and_empty_prompt(lm):
    assert generate(lm, encode(PROMPT), 0) == []
    with pytest.raises(ValueError, match="no tokens"):
        generate(lm, [], 5)


def test_untied_lm_head_is_refused(hf, folder, tmp_path):
    sd = {k: v.clone() for k, v in hf.state_dict().items()}
    assert "lm_head.weight" in sd
    torch.save(sd, tmp_path / "pytorch_model.bin")  # tied: loads
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    assert load_language_model(str(tmp_path)).config.n_head == 4
    sd["lm_head.weight"] = sd["lm_head.weight"] + 1
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with pytest.raises(WeightsError, match="lm_head.weight differs from the token embedding"):
        load_language_model(str(tmp_path))


# ---------------------------------------------------------------- the command


def cli(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "dist_finetune.generate", *args], cwd=REPO, env=child_env(),
                          capture_output=True, timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode("utf-8"),
                                       proc.stderr.decode("utf-8"))


def test_cli_prints_the_greedy_continuation(folder, lm):
    proc = cli("--weights", str(folder), PROMPT, "--max-new-tokens", "12", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == decode(generate(lm, encode(PROMPT), 12)) + "\n"


@pytest.mark.parametrize("args, message", [
    (["--max-new-tokens", "0", PROMPT], "error: --max-new-tokens must be at least 1, got 0"),
    ([""], 'error: the prompt is empty: give the text to continue, e.g. "Every effort moves"'),
])
def test_cli_user_errors_are_one_line(folder, args, message):
    proc = cli("--weights", str(folder), *args)
    assert proc.returncode == 2
    assert proc.stderr.strip() == message and proc.stdout == ""


def test_cli_seeded_sampling_is_reproducible(folder):
    args = ["--weights", str(folder), PROMPT, "--temperature", "1.0", "--top-k", "40", "--seed", "7",
            "--max-new-tokens", "100"]
    first, second = cli(*args), cli(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout and first.stdout.strip()
    assert "seed 7" in first.stderr
    assert "stopped at the context limit" in first.stderr  # 3 + 100 tokens do not fit a context of 64
