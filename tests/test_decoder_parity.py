"""Llama / Qwen3 decoders against transformers on tiny random checkpoints this file creates (CPU, fp32,
offline): hidden states and LM logits within 1e-5, greedy tokens equal, the loader's checks and memory
discipline, and the checkpoint tokenizer's ids against AutoTokenizer on 1,000 mixed texts."""
from __future__ import annotations

import json
import random
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from dist_finetune import decoder_weights  # noqa: E402
from dist_finetune.decoder import Decoder, DecoderConfig, rope_inv_freq  # noqa: E402
from dist_finetune.decoder_weights import DecoderWeightsError, hf_name, load_decoder, load_into  # noqa: E402
from dist_finetune.hf_tokenizer import HFTokenizer  # noqa: E402
from decoder_checkpoints import (CASES, LLAMA3_ROPE, VOCAB, edit_json, hf_config,  # noqa: E402
                                make_checkpoint, mixed_text, save_tokenizer, train_tokenizer)

TOL = 1e-5


@pytest.fixture(scope="module", params=sorted(CASES))
def checkpoint(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    return request.param, folder, make_checkpoint(folder, request.param)


def padded_batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([23, 17, 9, 1])
    ids = torch.randint(0, VOCAB, (len(lengths), int(lengths.max())), generator=g)
    ids[torch.arange(ids.size(1))[None, :] >= lengths[:, None]] = 0  # right padding
    return ids, lengths


# ---------------------------------------------------------------- model parity


def test_checkpoint_layout(checkpoint) -> None:
    case, folder, _ = checkpoint
    _, tied, _, sharded = CASES[case]
    assert (folder / "model.safetensors.index.json").is_file() == sharded
    names = set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]) if sharded \
        else set(load_file(folder / "model.safetensors"))
    assert ("lm_head.weight" in names) == (not tied)


def test_hidden_states_and_logits_match_transformers(checkpoint) -> None:
    case, folder, hf = checkpoint
    ours = load_decoder(folder).eval()
    ids, lengths = padded_batch()
    real = torch.arange(ids.size(1))[None, :] < lengths[:, None]
    with torch.no_grad():
        out = hf(input_ids=ids, attention_mask=real.long(), output_hidden_states=True)
        hidden = ours(ids, lengths)
        logits = ours.lm_logits(hidden)
    hidden_diff = (hidden - out.hidden_states[-1])[real].abs().max().item()
    logits_diff = (logits - out.logits)[real].abs().max().item()
    print(f"{case}: max |hidden diff| {hidden_diff:.3g}, max |logits diff| {logits_diff:.3g}")
    assert hidden_diff <= TOL and logits_diff <= TOL
    assert out.logits[real].abs().max() > 1.0  # not a vacuous comparison of near-zero numbers


def greedy(model: Decoder, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    ids = prompt
    with torch.no_grad():
        for _ in range(steps):
            next_id = model.lm_logits(model(ids)[:, -1]).argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
    return ids[:, prompt.size(1):]


def test_greedy_tokens_match_transformers_generate(checkpoint) -> None:
    _, folder, hf = checkpoint
    ours = load_decoder(folder).eval()
    prompt = torch.randint(0, VOCAB, (3, 6), generator=torch.Generator().manual_seed(2))
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    with torch.no_grad():
        theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10, do_sample=False)
    assert torch.equal(greedy(ours, prompt, 10), theirs[:, prompt.size(1):])


def test_rope_frequencies_equal_transformers(checkpoint) -> None:
    _, folder, hf = checkpoint
    ours = load_decoder(folder)
    assert torch.equal(rope_inv_freq(ours.config), hf.model.rotary_emb.inv_freq)
    if ours.config.rope_scaling:  # the tiny case reaches all three bands of the Llama 3 scaling
        wavelen = 2 * torch.pi / rope_inv_freq(DecoderConfig(**{**ours.config.to_dict(), "rope_scaling": None}))
        old = LLAMA3_ROPE["original_max_position_embeddings"]
        assert (wavelen < old / 4).any() and (wavelen > old).any() and ((wavelen >= old / 4) & (wavelen <= old)).any()


def test_bf16_load_casts_weights_and_keeps_fp32_frequencies(checkpoint) -> None:
    _, folder, hf = checkpoint
    ours = load_decoder(folder, dtype=torch.bfloat16).eval()
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    assert torch.equal(ours._inv_freq_cpu, hf.model.rotary_emb.inv_freq)
    ids, lengths = padded_batch()
    with torch.no_grad():
        hidden = ours(ids, lengths).float()
        reference = load_decoder(folder)(ids, lengths)
    real = torch.arange(ids.size(1))[None, :] < lengths[:, None]
    assert (hidden - reference)[real].abs().max() < 0.1 * reference[real].abs().max()


def test_lm_head_can_be_left_out(checkpoint) -> None:
    case, folder, _ = checkpoint
    full, lean = load_decoder(folder), load_decoder(folder, lm_head=False)
    ids, lengths = padded_batch()
    with torch.no_grad():
        assert torch.equal(full(ids, lengths), lean(ids, lengths))
    tied = CASES[case][1]
    assert (lean.lm_head is None) and (full.lm_head is None) == tied
    if not tied:
        with pytest.raises(ValueError, match="lm_head=False"):
            lean.lm_logits(torch.zeros(1, 64))


# ---------------------------------------------------------------- configs of the real checkpoints

LLAMA_3_2_1B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 128000,
    "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
    "intermediate_size": 8192, "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05, "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                            "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "vocab_size": 128256}
SMOLLM2_135M = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 0,
    "eos_token_id": 0, "hidden_act": "silu", "hidden_size": 576, "initializer_range": 0.041666666666666664,
    "intermediate_size": 1536, "is_llama_config": True, "max_position_embeddings": 8192, "model_type": "llama",
    "num_attention_heads": 9, "num_hidden_layers": 30, "num_key_value_heads": 3, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05, "rope_interleaved": False, "rope_scaling": None, "rope_theta": 100000,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "vocab_size": 49152}
QWEN3_0_6B = {
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 1024, "initializer_range": 0.02,
    "intermediate_size": 3072, "max_position_embeddings": 40960, "max_window_layers": 28, "model_type": "qwen3",
    "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936}
REAL_CONFIGS = {"llama-3.2-1b": LLAMA_3_2_1B, "smollm2-135m": SMOLLM2_135M, "qwen3-0.6b": QWEN3_0_6B}


@pytest.mark.parametrize("name", sorted(REAL_CONFIGS))
def test_real_configs_build_the_same_architecture(name: str) -> None:
    """On the meta device (no memory): parameter names map one to one, counts and RoPE equal transformers'."""
    hf_dict = REAL_CONFIGS[name]
    config = DecoderConfig.from_hf(hf_dict)
    hf_cls = transformers.AutoConfig.for_model(hf_dict["model_type"]).__class__
    hf_config_obj = hf_cls.from_dict(dict(hf_dict))
    with torch.device("meta"):
        ours = Decoder(config)
        theirs = transformers.AutoModelForCausalLM.from_config(hf_config_obj)
    theirs_shapes = {n: tuple(p.shape) for n, p in theirs.named_parameters()}  # a tied lm_head is listed once
    assert {hf_name(n): tuple(p.shape) for n, p in ours.named_parameters()} == theirs_shapes
    assert (config.context_length, config.n_layer) == (hf_dict["max_position_embeddings"], hf_dict["num_hidden_layers"])
    their_rope = type(theirs.model.rotary_emb)(hf_config_obj)  # on the CPU, outside the meta device
    assert torch.equal(rope_inv_freq(config), their_rope.inv_freq)


@pytest.mark.parametrize("name", sorted(REAL_CONFIGS))
def test_config_round_trips(name: str) -> None:
    config = DecoderConfig.from_hf(REAL_CONFIGS[name])
    assert DecoderConfig.from_hf(config.to_hf()) == config
    assert DecoderConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    hf_cls = transformers.AutoConfig.for_model(config.family).__class__
    assert DecoderConfig.from_hf(hf_cls.from_dict(config.to_hf()).to_dict()) == config  # transformers 5 layout


@pytest.mark.parametrize("name", sorted(REAL_CONFIGS))
def test_presets_are_the_published_configs(name: str) -> None:
    from dist_finetune.config import DECODER_PRESETS

    assert DecoderConfig.from_hf(DECODER_PRESETS[name]) == DecoderConfig.from_hf(REAL_CONFIGS[name])


def test_transformers_5_rope_parameters_layout_reads_alike() -> None:
    saved = hf_config("llama", False, rope_scaling=LLAMA3_ROPE, rope_theta=500000.0).to_dict()
    assert "rope_parameters" in saved
    config = DecoderConfig.from_hf(saved)
    assert config.rope_theta == 500000.0
    assert config.rope_scaling == {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_type"}


@pytest.mark.parametrize("change, key", [
    ({"model_type": "mistral"}, "model_type"), ({"model_type": None}, "model_type"),
    ({"hidden_act": "gelu"}, "hidden_act"), ({"use_sliding_window": True}, "use_sliding_window"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type"), ({"hidden_size": None}, "hidden_size"),
    ({"num_key_value_heads": 5}, "num_key_value_heads"),
    ({"quantization_config": {"quant_method": "fp8"}}, "quantization_config"),
])
def test_unsupported_configs_are_refused_by_key(change: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key):
        DecoderConfig.from_hf({**QWEN3_0_6B, **change})


# ---------------------------------------------------------------- the loader


@pytest.fixture(scope="module")
def untied_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("untied")
    make_checkpoint(folder, "qwen3-untied")
    return folder


def rewritten(src: Path, dst: Path, edit) -> Path:
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_loader_reads_one_tensor_at_a_time(checkpoint, monkeypatch) -> None:
    """Host memory: the model plus one checkpoint tensor, one file open at a time (counted, not sampled)."""
    _, folder, _ = checkpoint
    probe = {"live": weakref.WeakSet(), "peak": 0, "open": 0, "peak_open": 0, "read": 0}
    real_safe_open = decoder_weights.safe_open

    class CountingHandle:
        def __init__(self, *args, **kwargs):
            self.inner = real_safe_open(*args, **kwargs)

        def __enter__(self):
            probe["open"] += 1
            probe["peak_open"] = max(probe["peak_open"], probe["open"])
            self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            probe["open"] -= 1
            return self.inner.__exit__(*exc)

        def keys(self):
            return self.inner.keys()

        def get_slice(self, name):
            return self.inner.get_slice(name)

        def get_tensor(self, name):
            tensor = self.inner.get_tensor(name)
            probe["live"].add(tensor)
            probe["read"] += 1
            probe["peak"] = max(probe["peak"], len(probe["live"]))
            return tensor

    monkeypatch.setattr(decoder_weights, "safe_open", CountingHandle)
    model = load_decoder(folder)
    assert probe["read"] == len(list(model.parameters())) and probe["peak"] == 1 and probe["peak_open"] == 1


def test_load_into_casts_to_the_models_dtype(untied_folder: Path) -> None:
    model = Decoder(DecoderConfig.from_hf(json.loads((untied_folder / "config.json").read_text()))).to(torch.bfloat16)
    load_into(model, untied_folder)
    expected = load_file(untied_folder / "model.safetensors")["model.layers.1.self_attn.k_norm.weight"]
    assert torch.equal(model.blocks[1].attn.k_norm.weight, expected.to(torch.bfloat16))


def test_wrong_model_type_is_one_clear_error(untied_folder: Path, tmp_path: Path) -> None:
    bad = rewritten(untied_folder, tmp_path / "bad", lambda t: None)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(DecoderWeightsError, match=r"config\.json: model_type 'gpt2' is not supported"):
        load_decoder(bad)
    (bad / "config.json").write_text("[]")
    with pytest.raises(DecoderWeightsError, match=r"config\.json: expected a JSON object, found list"):
        load_decoder(bad)


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"),
     r"model\.safetensors: missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"),
    (lambda t: t.update({"model.norm.weight": torch.ones(65)}),
     r"model\.safetensors: tensor 'model\.norm\.weight' has shape \(65,\), config\.json implies \(64,\)"),
    (lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(128)}),
     r"model\.safetensors: unexpected tensor 'model\.layers\.0\.self_attn\.q_proj\.bias'"),
])
def test_bad_tensors_are_one_clear_error(untied_folder: Path, tmp_path: Path, edit, message: str) -> None:
    with pytest.raises(DecoderWeightsError, match=message):
        load_decoder(rewritten(untied_folder, tmp_path / "bad", edit))


def test_ignorable_extras_load(untied_folder: Path, tmp_path: Path) -> None:
    folder = rewritten(untied_folder, tmp_path / "extra",
                       lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(16)}))
    load_decoder(folder)


def test_missing_files_name_the_file(untied_folder: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DecoderWeightsError, match=r"empty/config\.json: not found"):
        load_decoder(empty)
    (empty / "config.json").write_text((untied_folder / "config.json").read_text())
    with pytest.raises(DecoderWeightsError, match="neither model.safetensors nor model.safetensors.index.json"):
        load_decoder(empty)
    (empty / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-1.safetensors"}}))
    with pytest.raises(DecoderWeightsError, match=r"model-1\.safetensors: listed in .*index\.json but not found"):
        load_decoder(empty)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/tmp/outside.safetensors", "sub/model.safetensors",
                                   "..", 7])
def test_an_index_naming_a_file_outside_the_folder_is_refused(untied_folder: Path, tmp_path: Path, shard) -> None:
    """The index of a downloaded checkpoint is untrusted: its shards are file names beside it, nothing else."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text((untied_folder / "config.json").read_text())
    (tmp_path / "outside.safetensors").write_bytes((untied_folder / "model.safetensors").read_bytes())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"model.norm.weight": shard}}))
    with pytest.raises(DecoderWeightsError, match=r"index\.json: (shard .* is not a file name in|weight_map must)"):
        load_decoder(folder)


def test_an_index_whose_weight_map_is_not_an_object_is_one_clear_error(untied_folder: Path, tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text((untied_folder / "config.json").read_text())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["model.safetensors"]}))
    with pytest.raises(DecoderWeightsError, match=r"index\.json: weight_map must map tensor names to shard"):
        load_decoder(folder)


def test_a_decoder_download_fetches_its_tokenizer_and_shards(tmp_path: Path, monkeypatch) -> None:
    """model.download=true for a Llama / Qwen3 hub id: config.json, the (sharded) safetensors and the tokenizer
    files; a GPT-2 hub id keeps its two files."""
    hub = pytest.importorskip("huggingface_hub")
    from dist_finetune import weights

    asked = []

    def fake_download(repo_id, allow_patterns):
        asked.append(list(allow_patterns))
        (tmp_path / "snap").mkdir(exist_ok=True)
        (tmp_path / "snap" / "model.safetensors").write_bytes(b"")
        return str(tmp_path / "snap")

    monkeypatch.setattr(hub, "snapshot_download", fake_download)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    assert weights.resolve_weights("someone/SmolLM2-tiny", download=True, decoder=True) == tmp_path / "snap"
    assert {"config.json", "model.safetensors.index.json", "model-*.safetensors", "tokenizer.json",
            "tokenizer_config.json"} <= set(asked[0])
    assert weights.resolve_weights("someone/gpt2-tiny", download=True) == tmp_path / "snap"
    assert asked[1] == ["model.safetensors", "config.json"]


# ---------------------------------------------------------------- the tokenizer

@pytest.fixture(scope="module")
def trained_tokenizer():
    return train_tokenizer()



def tokenizer_folder(kind: str, tok, folder: Path) -> Path:
    if kind == "pad-right":  # SmolLM2 / Qwen3 style: no bos, an explicit pad token
        return save_tokenizer(tok, folder, bos_template=False, pad_token="<pad>")
    if kind == "llama3-bos":  # no pad token: eos, right side
        return save_tokenizer(tok, folder, bos_template=True)
    # add_bos_token in tokenizer_config.json (transformers 5 ignores it beside a tokenizer.json: no bos);
    # the pad token only in special_tokens_map.json; the left side
    save_tokenizer(tok, folder, bos_template=False)
    edit_json(folder / "tokenizer_config.json", add_bos_token=True, add_eos_token=False, padding_side="left")
    edit_json(folder / "special_tokens_map.json", pad_token={"content": "<pad>", "special": True})
    return folder


@pytest.mark.parametrize("kind", ["pad-right", "llama3-bos", "add-bos-flag-pad-left"])
def test_tokenizer_ids_equal_autotokenizer(kind: str, trained_tokenizer, tmp_path: Path) -> None:
    folder = tokenizer_folder(kind, trained_tokenizer, tmp_path / kind)
    rng = random.Random(2)
    texts = [""] + [mixed_text(rng) for _ in range(999)]
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    ours = HFTokenizer.from_folder(folder)
    expected = theirs(texts)["input_ids"]
    assert ours.encode_batch(texts) == expected
    assert [ours.encode(t) for t in texts[:50]] == expected[:50]
    assert [ours.decode(ids) for ids in expected] == [theirs.decode(ids) for ids in expected]
    starts_with_bos = kind == "llama3-bos"
    assert all((ids[:1] == [ours.bos_id]) == starts_with_bos for ids in expected)
    assert ours.bos_id == theirs.bos_token_id and ours.eos_id == theirs.eos_token_id
    if kind == "llama3-bos":
        assert theirs.pad_token is None and (ours.pad_token, ours.pad_id) == ("<|end_of_text|>", ours.eos_id)
    else:
        assert (ours.pad_token, ours.pad_id) == (theirs.pad_token, theirs.pad_token_id)
    assert ours.padding_side == theirs.padding_side == ("left" if kind.endswith("left") else "right")
    assert max(max(ids, default=0) for ids in expected) < ours.vocab_size


def test_tokenizer_errors_name_the_file(trained_tokenizer, tmp_path: Path) -> None:
    from dist_finetune.hf_tokenizer import TokenizerError

    with pytest.raises(TokenizerError, match=r"tokenizer\.json: not found"):
        HFTokenizer.from_folder(tmp_path)
    folder = save_tokenizer(trained_tokenizer, tmp_path / "t", bos_template=False, pad_token="<pad>")
    edit_json(folder / "tokenizer_config.json", pad_token="<nope>")
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json: the pad token '<nope>' is not in"):
        HFTokenizer.from_folder(folder)


def test_model_specific_tokenizer_class_keeps_tokenizer_json(trained_tokenizer, tmp_path: Path) -> None:
    """SmolLM2's tokenizer_config says GPT2Tokenizer, whose transformers 5 class rebuilds a plain ByteLevel
    pre-tokenizer and drops tokenizer.json's digit splitting (huggingface/transformers#45812). Ours reads
    tokenizer.json as written, as PreTrainedTokenizerFast.from_pretrained does."""
    folder = save_tokenizer(trained_tokenizer, tmp_path / "gpt2-class", bos_template=False, pad_token="<pad>")
    edit_json(folder / "tokenizer_config.json", tokenizer_class="GPT2Tokenizer")
    texts = [mixed_text(random.Random(3)) for _ in range(200)]
    as_written = transformers.PreTrainedTokenizerFast.from_pretrained(folder)(texts)["input_ids"]
    assert HFTokenizer.from_folder(folder).encode_batch(texts) == as_written


def test_vocab_size_covers_the_largest_id_when_ids_have_gaps(trained_tokenizer, tmp_path: Path) -> None:
    """A tokenizer.json whose ids skip some (a token given a far id): the model must hold the largest id, not
    merely as many rows as there are tokens."""
    folder = save_tokenizer(trained_tokenizer, tmp_path / "gap", bos_template=False, pad_token="<pad>")
    data = json.loads((folder / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    far = max(vocab, key=vocab.get)
    vocab[far] = 5000
    (folder / "tokenizer.json").write_text(json.dumps(data))
    tok = HFTokenizer.from_folder(folder)
    assert tok.tokenizer.token_to_id(far) == 5000 and tok.tokenizer.get_vocab_size(with_added_tokens=True) < 5000
    assert tok.vocab_size == 5001
