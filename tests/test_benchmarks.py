"""benchmarks/throughput.py: the tiny matrix end to end on a CPU, and its FLOPs formula."""
from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

import runner
from dist_finetune.config import load_config
from dist_finetune.model import build_model, set_trainable

SCRIPT = runner.REPO / "benchmarks" / "throughput.py"


def load_throughput() -> ModuleType:
    spec = importlib.util.spec_from_file_location("throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run(tmp_path: Path, name: str, *args: str) -> dict:
    out = tmp_path / f"{name}.json"
    cmd = [sys.executable, str(SCRIPT), "--matrix", "tiny", "--steps", "2", "--warmup", "1", "--json", str(out), *args]
    proc = subprocess.run(cmd, cwd=runner.REPO, env=runner.child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    return json.loads(out.read_text())


@pytest.mark.slow
def test_tiny_matrix_runs_on_a_cpu(tmp_path: Path) -> None:
    names = [s.name for s in load_throughput().tiny_matrix(with_compile=False).settings]
    figures = run(tmp_path, "tiny")
    assert figures["peak_tflops"] is None and figures["torch"] and figures["deepspeed"] and figures["date"]
    results = {r["name"]: r for r in figures["results"]}
    assert list(results) == names
    for name, r in results.items():
        assert "error" not in r, (name, r)
        assert r["step_ms"] > 0 and r["samples_per_second"] > 0, (name, r)
        assert r["padded_tokens_per_second"] >= r["real_tokens_per_second"] > 0, (name, r)
        assert math.isfinite(r["first_loss"]) and math.isfinite(r["last_loss"]), (name, r)
        assert r["mfu"] is None and r["model_tflops_per_second"] > 0, (name, r)
        assert r["ratio_vs_baseline"] > 0, (name, r)
    assert results["baseline"]["ratio_vs_baseline"] == 1.0
    assert results["baseline"]["engine"] is False and results["engine-zero1"]["zero_stage"] == 1
    fixed = results["engine-zero0"]
    assert fixed["padded_tokens_per_second"] == pytest.approx(fixed["samples_per_second"] * 120)
    longest = results["engine-longest-8"]
    assert longest["padded_tokens_per_second"] < longest["samples_per_second"] * 120
    assert results["engine-tiny-llama"]["model"] == "auto (2 layers x 64)"  # a Llama decoder, GPT-2's batches


def test_gpu_matrix_has_the_decoder_families() -> None:
    """smollm2-135m, qwen3-0.6b and llama-3.2-1b beside GPT-2: presets with random weights, valid configs."""
    throughput = load_throughput()
    matrix = throughput.gpu_matrix()
    throughput.check_matrix(matrix, list(matrix.settings))
    decoders = {s.name: throughput.setting_config(matrix, s) for s in matrix.settings if "gpt2" not in
                throughput.setting_config(matrix, s).model.name}
    assert sorted(decoders) == ["llama-3.2-1b-bf16-64x128", "qwen3-0.6b-bf16-64x128", "smollm2-135m-bf16-64x128"]
    assert all(cfg.model.is_decoder and cfg.precision == "bf16" for cfg in decoders.values())


@pytest.mark.slow
def test_peak_tflops_gives_an_mfu(tmp_path: Path) -> None:
    figures = run(tmp_path, "peak", "--only", "baseline", "--peak-tflops", "1")
    [baseline] = figures["results"]
    assert figures["peak_tflops"] == 1.0
    assert baseline["mfu"] == pytest.approx(baseline["model_tflops_per_second"]) and baseline["mfu"] > 0


def tiny_counter(throughput: ModuleType, trainable: str):
    cfg = load_config(None, ["model.name=custom", "model.n_layer=3", "model.n_head=2", "model.n_embd=32",
                             "model.context_length=64"])
    model = build_model(cfg.model, 2)
    set_trainable(model, trainable)
    return throughput.FlopCounter.of(model)


def test_flops_formula() -> None:
    throughput = load_throughput()
    every = tiny_counter(throughput, "all")
    assert (every.n_layer, every.n_embd, every.first_trainable_block) == (3, 32, 0)
    assert every.block_params == 12 * 32 * 32 + 13 * 32  # qkv, proj, fc, proj weights and biases, two LayerNorms
    assert every.top_params == 2 * 32 + 32 * 2 + 2  # final LayerNorm, head
    for seq in (16, 64):
        assert every.backward_per_token(seq) == 2 * every.forward_per_token(seq)
    attention = every.forward_per_token(64) - every.forward_per_token(32)
    assert attention == 4 * 3 * 32 * 32  # 4 x n_layer x (64 - 32) x n_embd
    assert every.forward_per_token(32) - every.forward_per_token(16) == attention / 2

    last = tiny_counter(throughput, "last_block")
    assert last.first_trainable_block == 2
    assert last.forward_per_token(64) == every.forward_per_token(64)
    assert last.backward_per_token(64) == 2 * (2 * (last.block_params + last.top_params) + 4 * 64 * 32)
    assert last.backward_per_token(64) < every.backward_per_token(64)
    assert tiny_counter(throughput, "head").backward_per_token(64) == 2 * 2 * last.top_params
    assert every.batch(8, 64) == 8 * 64 * 3 * every.forward_per_token(64)


@pytest.mark.parametrize(("name", "peak"), [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.0),
    ("NVIDIA GH200 480GB", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L40S", 362.0),
    ("NVIDIA L4", 121.0), ("NVIDIA A10", 125.0), ("Tesla V100-SXM2-16GB", None),
])
def test_peak_by_device_name(name: str, peak: float | None) -> None:
    throughput = load_throughput()
    assert throughput.peak_tflops(name, None) == peak
    assert throughput.peak_tflops(name, 7.0) == 7.0


@pytest.mark.slow
def test_end_to_end_times_whole_runs_and_the_chapter_loop(tmp_path: Path) -> None:
    out = tmp_path / "e2e.json"
    cmd = [sys.executable, str(runner.REPO / "benchmarks" / "end_to_end.py"), "--matrix", "tiny",
           "--workdir", str(tmp_path / "runs"), "--json", str(out)]
    proc = subprocess.run(cmd, cwd=runner.REPO, env=runner.child_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    results = {r["name"]: r for r in json.loads(out.read_text())["results"]}
    chapter = results.pop("chapter loop fp32, all layers")
    assert chapter["train_seconds"] > 0 and 0 <= chapter["test_accuracy"] <= 1
    assert set(results) == {"framework, fixed padding", "fast preset"}
    for name, r in results.items():
        assert "error" not in r, (name, r)
        phases = [r[k] for k in ("startup_seconds", "data_seconds", "model_seconds", "engine_init_seconds",
                                 "loop_train_seconds", "loop_eval_seconds", "checkpoint_seconds",
                                 "final_eval_seconds", "export_seconds", "exit_seconds")]
        assert all(p >= 0 for p in phases) and r["startup_seconds"] > 0.2, (name, r)  # imports take time
        assert sum(phases) <= r["process_wall_seconds"] + 0.5, (name, r)
        assert r["epochs"] == 1 and r["test_accuracy"] > 0.8, (name, r)
        assert (tmp_path / "runs" / name.replace(" ", "_").replace(",", "") / "summary.json").exists()


@pytest.mark.slow
def test_zero3_memory_runs_every_mode_on_two_ranks(tmp_path: Path) -> None:
    out = tmp_path / "memory.json"
    proc = subprocess.run([sys.executable, "benchmarks/zero3_memory.py", "--preset", "tiny", "--json", str(out)],
                          cwd=runner.REPO, env=runner.child_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    results = json.loads(out.read_text())["results"]
    assert sorted(results) == ["zero2", "zero3_partitioned", "zero3_whole"]
    for rows in results.values():
        assert len(rows) == 2 and all(r["load_anon"] >= r["start_anon"] > 0 for r in rows)
    assert proc.stdout.count("| zero3_partitioned |") == 2
