"""Finding, reading, converting and loading pretrained weights; the export folder."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel

from dist_finetune.model import GPTClassifier, GPTConfig
from dist_finetune.weights import (
    WeightsError,
    detect_format,
    infer_gpt_config,
    load_export,
    load_pretrained,
    read_state_dict,
    resolve_weights,
    save_export,
    to_canonical,
)

TINY = GPTConfig(vocab_size=50257, context_length=64, n_embd=64, n_layer=2, n_head=4)
C, N_LAYER, CTX = 64, 2, 64


def classifier(num_classes: int = 2, pooling: str = "last", **changes) -> GPTClassifier:
    torch.manual_seed(99)  # different from the checkpoint's seed: loading must matter
    return GPTClassifier(GPTConfig(**{**TINY.to_dict(), **changes}), num_classes, pooling).eval()


@pytest.fixture(scope="module")
def hf() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=N_LAYER, n_embd=C, n_head=4, n_positions=CTX, vocab_size=50257,
        activation_function="gelu_new", resid_pdrop=0, embd_pdrop=0, attn_pdrop=0,
    )
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 50257, (3, 24), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def reference(hf, ids) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden after ln_f, LM logits) from transformers."""
    with torch.no_grad():
        out = hf(ids, output_hidden_states=True)
    return out.hidden_states[-1], out.logits


@pytest.fixture(scope="module")
def hf_folder(hf, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(folder)
    assert (folder / "model.safetensors").is_file()
    return folder


def hf_state_dict(hf: GPT2LMHeadModel) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in hf.state_dict().items()}


def assert_matches(model: GPTClassifier, ids, reference) -> None:
    hidden_ref, logits_ref = reference
    with torch.no_grad():
        hidden = model.backbone(ids)
        torch.testing.assert_close(hidden, hidden_ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(model.backbone.lm_logits(hidden), logits_ref, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- Hugging Face checkpoints


def _safetensors_folder(hf, hf_folder, tmp):
    return hf_folder


def _safetensors_file(hf, hf_folder, tmp):
    return hf_folder / "model.safetensors"


def _bin_folder(hf, hf_folder, tmp):
    torch.save(hf.state_dict(), tmp / "pytorch_model.bin")
    shutil.copy(hf_folder / "config.json", tmp / "config.json")
    return tmp


def _prefix_stripped_with_buffers(hf, hf_folder, tmp):
    """The layout of the original openai gpt2 checkpoint: no prefix, causal-mask buffers kept."""
    sd = {k.removeprefix("transformer."): v for k, v in hf_state_dict(hf).items() if k != "lm_head.weight"}
    for i in range(N_LAYER):
        sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(CTX, CTX)).view(1, 1, CTX, CTX)
        sd[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(sd, tmp / "gpt2.pt")
    return tmp / "gpt2.pt"


def _prefixed_pth_wrapped(hf, hf_folder, tmp):
    torch.save({"state_dict": hf_state_dict(hf), "epoch": 3}, tmp / "ckpt.pth")
    return tmp / "ckpt.pth"


@pytest.mark.parametrize("form", [_safetensors_folder, _safetensors_file, _bin_folder,
                                  _prefix_stripped_with_buffers, _prefixed_pth_wrapped])
def test_hf_checkpoints_match_transformers(form, hf, hf_folder, ids, reference, tmp_path):
    spec = form(hf, hf_folder, tmp_path)
    model = classifier()
    head_before = model.head.weight.clone()
    report = load_pretrained(model, str(spec))
    assert report.format == "hf"
    assert report.source == Path(spec)
    assert not report.head_loaded and report.missing == ["head.weight", "head.bias"]
    assert report.unexpected == []
    assert len(report.loaded) == 4 + 12 * N_LAYER
    assert torch.equal(model.head.weight, head_before)
    assert_matches(model, ids, reference)


def test_hf_conversion_transposes_conv1d(hf):
    sd = to_canonical(hf_state_dict(hf))
    c_attn = hf.transformer.h[0].attn.c_attn.weight
    assert torch.equal(sd["backbone.blocks.0.attn.qkv.weight"], c_attn.T)
    assert sd["backbone.blocks.1.mlp.fc.weight"].shape == (4 * C, C)
    assert sd["backbone.blocks.1.mlp.proj.weight"].shape == (C, 4 * C)
    assert "lm_head.weight" not in sd


# ---------------------------------------------------------------- chapter (LLMs-from-scratch) checkpoints


def chapter_state_dict(hf: GPT2LMHeadModel) -> dict[str, torch.Tensor]:
    """The chapter's GPTModel names, built the way its load_weights_into_gpt does (split c_attn, .T)."""
    g = {k.removeprefix("transformer."): v.clone() for k, v in hf.state_dict().items()}
    sd = {
        "tok_emb.weight": g["wte.weight"],
        "pos_emb.weight": g["wpe.weight"],
        "final_norm.scale": g["ln_f.weight"],
        "final_norm.shift": g["ln_f.bias"],
        "out_head.weight": g["wte.weight"].clone(),
    }
    for i in range(N_LAYER):
        p, b = f"h.{i}.", f"trf_blocks.{i}."
        q_w, k_w, v_w = torch.split(g[p + "attn.c_attn.weight"], C, dim=-1)
        q_b, k_b, v_b = torch.split(g[p + "attn.c_attn.bias"], C, dim=-1)
        for name, w, bias in (("W_query", q_w, q_b), ("W_key", k_w, k_b), ("W_value", v_w, v_b)):
            sd[f"{b}att.{name}.weight"] = w.T.contiguous()
            sd[f"{b}att.{name}.bias"] = bias
        sd[b + "att.out_proj.weight"] = g[p + "attn.c_proj.weight"].T.contiguous()
        sd[b + "att.out_proj.bias"] = g[p + "attn.c_proj.bias"]
        sd[b + "att.mask"] = torch.triu(torch.ones(CTX, CTX), diagonal=1)
        sd[b + "ff.layers.0.weight"] = g[p + "mlp.c_fc.weight"].T.contiguous()
        sd[b + "ff.layers.0.bias"] = g[p + "mlp.c_fc.bias"]
        sd[b + "ff.layers.2.weight"] = g[p + "mlp.c_proj.weight"].T.contiguous()
        sd[b + "ff.layers.2.bias"] = g[p + "mlp.c_proj.bias"]
        sd[b + "norm1.scale"], sd[b + "norm1.shift"] = g[p + "ln_1.weight"], g[p + "ln_1.bias"]
        sd[b + "norm2.scale"], sd[b + "norm2.shift"] = g[p + "ln_2.weight"], g[p + "ln_2.bias"]
    return sd


@pytest.mark.parametrize("wrapped", [False, True])
def test_chapter_checkpoint_matches_transformers(wrapped, hf, ids, reference, tmp_path):
    sd = chapter_state_dict(hf)
    assert detect_format(sd) == "chapter"
    obj = {"model_state_dict": sd, "optimizer_state_dict": {}} if wrapped else sd
    torch.save(obj, tmp_path / "model.pth")
    model = classifier()
    report = load_pretrained(model, str(tmp_path / "model.pth"))
    assert report.format == "chapter"
    assert not report.head_loaded  # out_head with vocab rows is the (tied) LM head: dropped
    assert report.unexpected == []
    assert_matches(model, ids, reference)


@pytest.mark.parametrize("with_bias", [True, False])
def test_chapter_classifier_head_is_loaded(with_bias, hf, ids, reference, tmp_path):
    sd = chapter_state_dict(hf)
    gen = torch.Generator().manual_seed(3)
    sd["out_head.weight"] = torch.randn(2, C, generator=gen)
    if with_bias:
        sd["out_head.bias"] = torch.randn(2, generator=gen)
    torch.save(sd, tmp_path / "review_classifier.pth")
    model = classifier(num_classes=2, pooling="last")
    report = load_pretrained(model, str(tmp_path))  # a folder with a single .pth
    assert report.head_loaded
    assert report.missing == ([] if with_bias else ["head.bias"])
    bias = sd["out_head.bias"] if with_bias else torch.zeros(2)
    expected = reference[0][:, -1] @ sd["out_head.weight"].T + bias
    with torch.no_grad():
        torch.testing.assert_close(model(ids, torch.full((3,), ids.shape[1])), expected, atol=1e-5, rtol=0)


def test_chapter_without_qkv_bias(hf, tmp_path):
    sd = {k: v for k, v in chapter_state_dict(hf).items() if not (".W_" in k and k.endswith(".bias"))}
    torch.save(sd, tmp_path / "model.pth")
    load_pretrained(classifier(qkv_bias=False), str(tmp_path / "model.pth"))
    with pytest.raises(WeightsError, match="model.qkv_bias=false"):
        load_pretrained(classifier(qkv_bias=True), str(tmp_path / "model.pth"))


def test_detect_format(hf):
    sd = hf_state_dict(hf)
    assert detect_format(sd) == "hf"
    assert detect_format({k.removeprefix("transformer."): v for k, v in sd.items()}) == "hf"
    assert detect_format(to_canonical(sd)) == "ours"
    with pytest.raises(WeightsError, match="unrecognised state dict"):
        detect_format({"encoder.layer.0.weight": torch.zeros(1)})


# ---------------------------------------------------------------- errors a user can cause


def test_shape_mismatch_names_tensor_and_shapes(hf_folder):
    with pytest.raises(WeightsError) as err:
        load_pretrained(classifier(context_length=32), str(hf_folder))
    msg = str(err.value)
    assert "backbone.wpe.weight" in msg and "(64, 64)" in msg and "(32, 64)" in msg
    assert "model.name" in msg and "context_length=64" in msg


def test_more_layers_than_the_model_is_an_error(hf_folder):
    with pytest.raises(WeightsError, match=r"backbone\.blocks\.1\..*n_layer=2"):
        load_pretrained(classifier(n_layer=1), str(hf_folder))


def test_missing_backbone_tensor_is_named(hf, tmp_path):
    sd = hf_state_dict(hf)
    del sd["transformer.h.1.mlp.c_fc.bias"]
    save_file({k: v.contiguous() for k, v in sd.items() if k != "lm_head.weight"},
              str(tmp_path / "model.safetensors"))
    with pytest.raises(WeightsError, match=r"backbone\.blocks\.1\.mlp\.fc\.bias"):
        load_pretrained(classifier(), str(tmp_path))


def test_n_head_contradicting_config_json(hf_folder):
    with pytest.raises(WeightsError, match="n_head=4"):
        load_pretrained(classifier(n_head=8), str(hf_folder))


def test_unreadable_files(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="no weights found"):
        read_state_dict(tmp_path / "empty")
    two = tmp_path / "two"
    two.mkdir()
    torch.save({"a": torch.zeros(1)}, two / "a.pt")
    torch.save({"a": torch.zeros(1)}, two / "b.pt")
    with pytest.raises(WeightsError, match="several weight files"):
        read_state_dict(two)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError, match="junk.safetensors"):
        read_state_dict(tmp_path / "junk.safetensors")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "whole_model.pth")  # a pickled module, not weights
    with pytest.raises(WeightsError, match="whole_model.pth"):
        read_state_dict(tmp_path / "whole_model.pth")


# ---------------------------------------------------------------- resolving a spec


def _fake_snapshot(cache: Path, repo_id: str, rev: str, source: Path) -> Path:
    snapshot = cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / rev
    snapshot.mkdir(parents=True)
    for name in ("model.safetensors", "config.json"):
        shutil.copy(source / name, snapshot / name)
    return snapshot


def test_hub_cache_resolves_refs_main(hf_folder, ids, reference, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    abc = _fake_snapshot(tmp_path, "gpt2", "abc", hf_folder)
    _fake_snapshot(tmp_path, "gpt2", "zzz", hf_folder)  # newer, but refs/main names abc
    (tmp_path / "models--gpt2" / "refs").mkdir()
    (tmp_path / "models--gpt2" / "refs" / "main").write_text("abc")
    assert resolve_weights("gpt2") == abc
    model = classifier()
    assert load_pretrained(model, "gpt2").source == abc
    assert_matches(model, ids, reference)


def test_hub_cache_org_id_and_hf_home(hf_folder, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    snapshot = _fake_snapshot(tmp_path / "hub", "openai-community/gpt2", "r1", hf_folder)
    assert resolve_weights("openai-community/gpt2") == snapshot


def test_missing_hub_id_explains_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.delenv("DIST_FINETUNE_ALLOW_DOWNLOAD", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _refuse_download)
    with pytest.raises(WeightsError) as err:
        resolve_weights("gpt2-medium")
    msg = str(err.value)
    assert "local folder" in msg
    assert "huggingface-cli download gpt2-medium" in msg
    assert "model.download=true" in msg
    with pytest.raises(WeightsError, match="no such file or folder"):
        resolve_weights(str(tmp_path / "nowhere" / "model.safetensors"))


def _refuse_download(*args, **kwargs):
    raise AssertionError("snapshot_download must not be called without download=true")


@pytest.mark.parametrize("how", ["argument", "env"])
def test_download_only_when_asked(how, hf_folder, tmp_path, monkeypatch):
    """snapshot_download is the hub client, not the code under test: a stand-in records the call."""
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns):
        calls.append((repo_id, allow_patterns))
        return str(hf_folder) if "model.safetensors" in allow_patterns else str(tmp_path)

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    if how == "env":
        monkeypatch.setenv("DIST_FINETUNE_ALLOW_DOWNLOAD", "1")
    assert resolve_weights("gpt2", download=how == "argument") == hf_folder
    assert calls == [("gpt2", ["model.safetensors", "config.json"])]


# ---------------------------------------------------------------- inferring the architecture


def test_infer_gpt_config(hf_folder):
    sd = to_canonical(read_state_dict(hf_folder))
    assert infer_gpt_config(sd, source=hf_folder) == TINY
    assert infer_gpt_config(sd, n_head=4) == TINY
    with pytest.raises(WeightsError, match="n_head"):
        infer_gpt_config(sd)
    # GPT-2 small's shapes (no memory: expanded views); n_head then comes from the preset
    zero = torch.zeros(1)
    small = {"backbone.wte.weight": zero.expand(50257, 768), "backbone.wpe.weight": zero.expand(1024, 768)}
    small.update({f"backbone.blocks.{i}.attn.qkv.bias": zero.expand(3 * 768) for i in range(12)})
    assert infer_gpt_config(small) == GPTConfig()


# ---------------------------------------------------------------- export folder


def test_export_round_trip(tmp_path, ids):
    model = classifier(num_classes=3, pooling="mean")
    with torch.no_grad():
        model.head.bias.normal_()
    labels = ["ham", "spam", "other"]
    save_export(model, tmp_path / "export", "mean", labels, max_length=24, padding="longest")

    loaded, loaded_labels = load_export(tmp_path / "export")
    assert loaded_labels == labels and not loaded.training
    assert loaded.pooling == "mean" and loaded.config == model.config
    lengths = torch.tensor([24, 5, 1])
    with torch.no_grad():
        assert torch.equal(loaded(ids, lengths), model(ids, lengths))
    with safe_open(str(tmp_path / "export" / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    config = json.loads((tmp_path / "export" / "model_config.json").read_text())
    assert config == {"gpt": model.config.to_dict(), "num_classes": 3, "pooling": "mean", "tokenizer": "gpt2",
                      "pad_id": 50256, "max_length": 24, "padding": "longest", "long_texts": "truncate",
                      "head_tokens": None, "text_column": "text", "text_pair_column": None, "pair_separator": None}

    fresh = classifier(num_classes=3, pooling="mean")
    report = load_pretrained(fresh, str(tmp_path / "export"))
    assert report.format == "ours" and report.head_loaded and report.missing == []
    with torch.no_grad():
        assert torch.equal(fresh(ids, lengths), model(ids, lengths))

    with pytest.raises(WeightsError, match=r"head has 3 classes but the data has 2; set model.head=new"):
        load_pretrained(classifier(num_classes=2), str(tmp_path / "export"))
    other = load_pretrained(classifier(num_classes=2), str(tmp_path / "export"), head_policy="new")
    assert not other.head_loaded and set(other.unexpected) == {"head.weight", "head.bias"}


def test_export_is_fp32(tmp_path):
    model = classifier().to(torch.bfloat16)
    save_export(model, tmp_path, "last", {"ham": 0, "spam": 1})
    sd = read_state_dict(tmp_path)
    assert all(t.dtype == torch.float32 for t in sd.values())
    assert load_export(tmp_path)[1] == {"ham": 0, "spam": 1}


def test_load_export_refuses_a_hub_folder(hf_folder):
    with pytest.raises(WeightsError, match="model_config.json"):
        load_export(hf_folder)


def test_a_bias_free_head_round_trips_and_refuses_a_biased_one(hf, ids, tmp_path):
    """model.head_bias=false: no head.bias anywhere (export, reload), and a checkpoint whose head has a bias is
    refused rather than loaded without it."""
    torch.manual_seed(0)
    model = GPTClassifier(TINY, 3, pooling="last_token", head_bias=False).eval()
    assert model.head.bias is None
    save_export(model, tmp_path / "export", "last_token", ["a", "b", "c"], max_length=32)
    again, _ = load_export(tmp_path / "export")
    assert again.head.bias is None
    lengths = torch.full((ids.shape[0],), ids.shape[1])
    with torch.no_grad():
        assert torch.equal(again(ids, lengths), model(ids, lengths))
    sd = chapter_state_dict(hf)
    sd["out_head.weight"], sd["out_head.bias"] = torch.randn(3, C), torch.randn(3)
    torch.save(sd, tmp_path / "biased.pth")
    with pytest.raises(WeightsError, match="model.head_bias=false leaves out"):
        load_pretrained(GPTClassifier(TINY, 3, pooling="last", head_bias=False), str(tmp_path / "biased.pth"))


def test_a_bias_free_head_under_lora_exports_with_its_adapters(ids, tmp_path):
    from dist_finetune.config import LoraConfig
    from dist_finetune.exporter import save_model
    from dist_finetune.lora import apply_lora

    torch.manual_seed(0)
    model = GPTClassifier(TINY, 2, pooling="last_token", head_bias=False)
    apply_lora(model, LoraConfig(targets=("attn", "head")))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    for export in ("merge", "separate"):
        save_model(model.eval(), tmp_path / export, "last_token", ["a", "b"], 32, "fixed", LoraConfig(
            targets=("attn", "head"), export=export))
        again, _ = load_export(tmp_path / export)
        assert again.head_linear.bias is None
        lengths = torch.full((ids.shape[0],), ids.shape[1])
        with torch.no_grad():
            torch.testing.assert_close(again(ids, lengths), model(ids, lengths), atol=1e-5, rtol=0)
