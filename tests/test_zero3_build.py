"""A Llama / Qwen3 backbone under ZeRO-3 is built partitioned across the ranks (deepspeed.zero.Init): each rank
holds about 1/world_size of it before deepspeed.initialize, every gathered weight equals the checkpoint's after
the shard-by-shard load, and the head's init is the one a whole build gives (the backbone's init draws from a
forked RNG). Real torchrun, real DeepSpeed, a sharded checkpoint made with transformers."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

import runner  # noqa: E402
from decoder_checkpoints import make_checkpoint  # noqa: E402

pytestmark = pytest.mark.slow
SCRIPT = runner.REPO / "tests" / "scripts" / "zero3_build.py"


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt") / "llama"
    make_checkpoint(folder, "llama-untied-llama3rope-bias-sharded")
    return folder


def build(folder, tmp, nproc: int, precision: str) -> list[dict]:
    out = tmp / f"out_{nproc}_{precision}"
    out.mkdir()
    cmd = [*runner.launcher(nproc), str(SCRIPT), str(folder), str(out), precision]
    proc = subprocess.run(cmd, cwd=runner.REPO, env=runner.child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return [json.loads((out / f"rank_{r}.json").read_text()) for r in range(nproc)]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_two_ranks_each_hold_half_the_backbone_and_load_it_exactly(sharded, tmp_path, precision: str) -> None:
    ranks = build(sharded, tmp_path, 2, precision)
    total = ranks[0]["counts"][1] - len(ranks[0]["head"]) * len(ranks[0]["head"][0]) - len(ranks[0]["head"])
    for r in ranks:
        assert r["partitioned"] and not r["head_partitioned"]
        assert r["dtypes"] == (["torch.float32"] if precision == "fp32" else ["torch.bfloat16"])
        # each parameter's share is ceil(numel / 2): half the backbone, plus at most one element a parameter
        assert total / 2 <= r["local_elements"] <= total / 2 + 64
        assert r["max_abs_diff"] == 0.0  # loaded exactly (in the run's dtype)
        assert r["counts"] == r["counts_whole"]  # whole counts, not this rank's share
        assert r["head"] == r["head_whole"]  # the same head init as without ZeRO-3
    assert ranks[0]["head"] == ranks[1]["head"]


def test_one_rank_holds_it_all(sharded, tmp_path) -> None:
    (r,) = build(sharded, tmp_path, 1, "fp32")
    assert r["partitioned"] and r["max_abs_diff"] == 0.0 and r["head"] == r["head_whole"]
    assert r["local_elements"] == r["counts"][1] - len(r["head"]) * len(r["head"][0]) - len(r["head"])


def test_a_zero3_resume_reads_no_weights_folder_and_equals_an_unbroken_run(tmp_path) -> None:
    """Frozen weights come back from the checkpoint (each rank's share, beside the optimizer state), not from
    model.weights: a run killed after step 4, resumed with its weights folder deleted (and model.weights naming
    another place, as after a move), ends bit-equal to one that
    never stopped; evaluate and export of it need no weights folder either."""
    import shutil

    from safetensors.torch import load_file

    from decoder_checkpoints import tokenizer_checkpoint, train_tokenizer

    weights = tokenizer_checkpoint(tmp_path / "llama", "llama", tied=False, tok=train_tokenizer())
    base = {"seed": 123, "precision": "fp32", "zero": {"stage": 3},
            "model": {"name": "auto", "trainable": "last_1_blocks", "weights": str(weights)},
            "data": {"padding": "longest", "max_length": 64},
            "train": {"epochs": 1, "micro_batch_size": 8, "lr": 1e-3, "max_steps": 6, "log_every_steps": 1},
            "checkpoint": {"every_steps": 3}, "early_stopping": {"enabled": False}, "report": {"plots": False}}
    unbroken = runner.train(tmp_path, "unbroken", nproc=2, base=base, timeout=600)
    assert unbroken.ok, unbroken.output()
    copy = shutil.copytree(weights, tmp_path / "copy")
    base["model"]["weights"] = str(copy)
    broken = runner.train(tmp_path, "broken", nproc=2, base=base, timeout=600,
                          env={"DIST_FINETUNE_FAULTS": "exit@step=5"})
    assert not broken.ok and [p.name for p in (broken.dir / "checkpoints").glob("step_*")] == ["step_0000003"]
    shutil.rmtree(copy)
    base["model"]["weights"] = str(tmp_path / "moved")  # a folder that moved (or went): the resume reads none
    resumed = runner.train(tmp_path, "broken", overrides=["resume=auto"], nproc=2, base=base, timeout=600)
    assert resumed.ok, resumed.output()
    said = resumed.proc.stdout + resumed.proc.stderr
    assert "resumed from step_0000003" in said and "weights: loaded" not in said
    a, b = (load_file(run.dir / "export" / "model.safetensors") for run in (unbroken, resumed))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    out = tmp_path / "eval.json"
    proc = subprocess.run([sys.executable, "-m", "dist_finetune.evaluate", "--run", str(resumed.dir), "--out", str(out)],
                          cwd=runner.REPO, env=runner.child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got, summary = json.loads(out.read_text()), json.loads((resumed.dir / "summary.json").read_text())["test"]
    assert (got["accuracy"], got["confusion_matrix"]) == (summary["accuracy"], summary["confusion_matrix"])


def test_bf16_lora_trains_on_a_partitioned_build(tmp_path) -> None:
    """bf16 under ZeRO-3: the backbone is built in bf16 and partitioned; the head and the LoRA adapters, made
    whole afterwards, must join it in bf16 (DeepSpeed casts nothing of a model built partitioned)."""
    from decoder_checkpoints import tokenizer_checkpoint, train_tokenizer

    weights = tokenizer_checkpoint(tmp_path / "qwen3", "qwen3", tied=True, tok=train_tokenizer())
    base = {"seed": 1, "precision": "bf16", "zero": {"stage": 3},
            "model": {"name": "auto", "trainable": "lora", "weights": str(weights)},
            "lora": {"targets": ["q", "v", "head"]}, "data": {"padding": "longest", "max_length": 48},
            "train": {"epochs": 1, "micro_batch_size": 8, "lr": 1e-3, "max_steps": 4, "log_every_steps": 1},
            "early_stopping": {"enabled": False}, "report": {"plots": False}}
    run = runner.train(tmp_path, "run", nproc=2, base=base, timeout=600)
    assert run.ok, run.output()
    summary = json.loads((run.dir / "summary.json").read_text())
    assert (summary["world_size"], summary["zero_stage"], summary["precision"]) == (2, 3, "bf16")
    assert (run.dir / "export" / "model.safetensors").is_file()
