"""Llama / Qwen3 classifiers end to end on CPU: tiny random checkpoints (Llama untied with grouped-query attention,
Qwen3 tied) with a tiny trained tokenizer, trained on the bundled SMS set with model.name=auto, exported with the
tokenizer files, and `predict` on the export agreeing with `evaluate` on the test split; 2 ranks, ZeRO-3, LoRA."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import runner  # noqa: E402
from decoder_checkpoints import edit_json, tokenizer_checkpoint, train_tokenizer  # noqa: E402
from dist_finetune.config import ConfigError, DataConfig, from_dict  # noqa: E402
from dist_finetune.data import load_data  # noqa: E402

LABELS = ("ham", "spam")
BASE = {
    "seed": 123, "precision": "fp32",
    "model": {"name": "auto", "trainable": "all"},
    "data": {"padding": "longest", "max_length": 64},
    "train": {"epochs": 1, "micro_batch_size": 8, "lr": 1e-3, "max_steps": 6, "log_every_steps": 1},
    "early_stopping": {"enabled": False},
    "report": {"plots": False},
}


def cli(module: str, *args: object, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [*runner.launcher(1), "-m", f"dist_finetune.{module}", *map(str, args)]
    proc = subprocess.run(cmd, cwd=runner.REPO, env=runner.child_env(), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-5000:]}"
    return proc


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    tok, tmp = train_tokenizer(), tmp_path_factory.mktemp("checkpoints")
    return {"llama": tokenizer_checkpoint(tmp / "llama", "llama", tied=False, tok=tok),
            "qwen3": tokenizer_checkpoint(tmp / "qwen3", "qwen3", tied=True, tok=tok)}


@pytest.fixture(scope="module")
def test_csv(tmp_path_factory) -> Path:
    """The bundled collection's test split, as a labelled file for predict."""
    test = load_data(DataConfig(), context_length=128).test
    path = tmp_path_factory.mktemp("data") / "test.csv"
    pd.DataFrame({"text": test.texts, "label": [LABELS[y] for y in test.labels]}).to_csv(path, index=False)
    return path


def train(tmp: Path, folder: Path, name: str, overrides: list[str] = (), nproc: int = 1) -> runner.Run:
    base = {**BASE, "model": {**BASE["model"], "weights": str(folder)}}
    run = runner.train(tmp, name, overrides=list(overrides), nproc=nproc, base=base, timeout=600)
    assert run.ok, run.output()
    return run


def predict_agrees_with_evaluate(run: runner.Run, test_csv: Path, tmp: Path) -> float:
    """Predictions of the export alone give evaluate's confusion matrix on the test split; returns the accuracy."""
    export = run.dir / "export"
    assert (export / "tokenizer.json").is_file() and (export / "tokenizer_config.json").is_file()
    assert json.loads((export / "model_config.json").read_text())["tokenizer"] == "tokenizer.json"
    cli("evaluate", "--run", run.dir, "--out", tmp / "eval.json")
    result = json.loads((tmp / "eval.json").read_text())
    cli("predict", "--model", run.dir, "--input", test_csv, "--output", tmp / "pred.csv")
    out = pd.read_csv(tmp / "pred.csv", dtype=str, keep_default_na=False)
    confusion = [[int(((out["label"] == a) & (out["predicted_label"] == b)).sum()) for b in LABELS] for a in LABELS]
    assert len(out) == result["examples"] == 300 and confusion == result["confusion_matrix"]
    assert result["accuracy"] == run.summary()["test"]["accuracy"]
    return result["accuracy"]


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_one_rank_trains_exports_and_predicts_as_evaluate(family: str, folders, test_csv, tmp_path) -> None:
    run = train(tmp_path, folders[family], "run")
    saved = runner.yaml.safe_load((run.dir / "config.yaml").read_text())
    assert saved["model"]["pooling"] == "last_token"  # the decoders' default
    assert "weights: loaded" in run.proc.stdout + run.proc.stderr
    accuracy = predict_agrees_with_evaluate(run, test_csv, tmp_path)
    print(f"{family}: test accuracy {accuracy:.4f} (predict == evaluate on 300 texts)")
    refused = subprocess.run([*runner.launcher(1), "-m", "dist_finetune.export", "--run", str(run.dir), "--format",
                              "hf", "--out", str(tmp_path / "hf")], cwd=runner.REPO, env=runner.child_env(),
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "--format hf: the head's bias" in refused.stderr and "ForSequenceClassification" in refused.stderr


def test_last_n_blocks_of_a_decoder(folders) -> None:
    """model.name=auto learns n_layer from config.json: the policy is checked when the model is built."""
    from dist_finetune.model import build_model, set_trainable

    mc = from_dict({"model": {"name": "auto", "weights": str(folders["qwen3"]), "trainable": "last_1_blocks"}}).model
    model = build_model(mc, 2)
    set_trainable(model, mc.trainable)
    trained = {name.split(".")[1] if name.startswith("backbone.") else "head"
               for name, p in model.named_parameters() if p.requires_grad}
    assert trained == {"blocks", "ln_f", "head"}
    assert all(name.startswith(("backbone.blocks.1.", "backbone.ln_f.", "head.")) for name, p in
               model.named_parameters() if p.requires_grad)
    with pytest.raises(ConfigError, match="model.trainable: 'last_3_blocks' asks for 3 blocks but the model has 2"):
        set_trainable(model, "last_3_blocks")


def test_a_weights_folder_without_tokenizer_json_or_with_a_larger_tokenizer_is_one_clear_error(folders,
                                                                                                 tmp_path) -> None:
    from dist_finetune.families import load_tokenizer
    from dist_finetune.hf_tokenizer import TokenizerError
    from dist_finetune.weights import WeightsError

    folder = Path(shutil.copytree(folders["qwen3"], tmp_path / "no-tokenizer"))
    (folder / "tokenizer.json").unlink()
    mc = from_dict({"model": {"name": "auto", "weights": str(folder)}}).model
    with pytest.raises(TokenizerError, match=r"no-tokenizer/tokenizer\.json: not found"):
        load_tokenizer(mc)
    shutil.copy(folders["qwen3"] / "tokenizer.json", folder / "tokenizer.json")
    edit_json(folder / "config.json", vocab_size=100)  # the tokenizer has ~600 tokens
    with pytest.raises(WeightsError, match=r"tokenizer\.json: token ids up to \d+, beyond the model's vocab_size=100"):
        load_tokenizer(mc)


# Rank-8 adapters (A: in x 8, B: 8 x out) of 2 blocks, hidden 64, head_dim 16, 4 query and 2 KV heads, MLP 96,
# plus the 2-class head (64 x 2 + 2).
LORA_PARAMETERS = {"[q,v]": 2 * (8 * (64 + 64) + 8 * (64 + 32)) + 130,
                   "[attn,mlp]": 2 * (8 * (64 + 64) * 2 + 8 * (64 + 32) * 2 + 8 * (64 + 96) * 3) + 130}


@pytest.mark.slow
@pytest.mark.parametrize("family, targets", [("llama", "[q,v]"), ("qwen3", "[attn,mlp]")])
def test_two_ranks_zero3_lora(family: str, targets: str, folders, test_csv, tmp_path) -> None:
    run = train(tmp_path, folders[family], "run", nproc=2,
                overrides=["zero.stage=3", "model.trainable=lora", f"lora.targets={targets}"])
    summary = run.summary()
    assert (summary["world_size"], summary["zero_stage"]) == (2, 3)
    assert summary["trainable_parameters"] == LORA_PARAMETERS[targets]
    accuracy = predict_agrees_with_evaluate(run, test_csv, tmp_path)
    print(f"{family} lora {targets}, 2 ranks, ZeRO-3: test accuracy {accuracy:.4f}")


@pytest.mark.parametrize("change, key", [
    ({"causal_mask": False}, "model.causal_mask"), ({"qkv_bias": False}, "model.qkv_bias"),
    ({"weights": "none"}, "model.weights"), ({"n_layer": 2}, "model.n_layer"), ({"dropout": 0.1}, "model.dropout"),
])
def test_gpt2_only_keys_are_refused_by_name(change: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        from_dict({"model": {"name": "auto", "weights": "/some/folder", **change}})


def test_decoder_lora_groups_are_refused_for_gpt2() -> None:
    with pytest.raises(ConfigError, match="lora.targets: q"):
        from_dict({"model": {"trainable": "lora"}, "lora": {"targets": ["q", "attn"]}})


def test_a_decoder_run_needs_its_weights_folder_no_more(folders, tmp_path) -> None:
    """The run keeps its architecture (model_arch.json) and tokenizer (tokenizer/): with model.weights changed and
    then deleted, a resume (which says the saved architecture wins), evaluate and export give what they gave before,
    and the folder holds nothing --overwrite would not recognise as a run's."""
    from dist_finetune import runs
    from dist_finetune.decoder_weights import read_config

    weights = Path(shutil.copytree(folders["llama"], tmp_path / "weights"))
    run = train(tmp_path, weights, "run")
    for name in ("before", "after"):
        (tmp_path / name).mkdir()
    assert json.loads((run.dir / "model_arch.json").read_text()) == read_config(weights).to_dict()
    assert sorted(p.name for p in (run.dir / "tokenizer").iterdir()) == sorted(
        p.name for p in weights.iterdir() if p.name.startswith(("tokenizer", "special_tokens")))
    cli("evaluate", "--run", run.dir, "--out", tmp_path / "before" / "eval.json")
    edit_json(weights / "config.json", rms_norm_eps=0.25)  # the folder changed: the run must not notice
    (weights / "model.safetensors").unlink()  # a ZeRO 0-2 checkpoint holds every weight: the resume reads none
    resumed = train(tmp_path, weights, "run", overrides=["resume=auto"])
    said = resumed.proc.stdout + resumed.proc.stderr
    assert "weights: loaded" not in said and "resumed from step_" in said
    assert "its config.json now differs from the run's saved architecture (rms_norm_eps)" in said
    shutil.rmtree(weights)
    cli("evaluate", "--run", run.dir, "--out", tmp_path / "after" / "eval.json")
    cli("export", "--run", run.dir, "--out", tmp_path / "export")
    before, after = (json.loads((tmp_path / n / "eval.json").read_text()) for n in ("before", "after"))
    keys = ("accuracy", "confusion_matrix", "loss", "examples")
    assert [before[k] for k in keys] == [after[k] for k in keys]
    for name in ("model.safetensors", "model_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "export" / name).read_bytes() == (run.dir / "export" / name).read_bytes(), name
    assert runs.foreign_files(run.dir, sorted(p.name for p in run.dir.iterdir())) == []
