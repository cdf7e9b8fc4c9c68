"""End-to-end training in one process: the quickstart, its outputs, the export, user errors."""
from __future__ import annotations

import csv
import json

import pytest
import torch
import yaml

import runner
from dist_finetune.config import load_config
from dist_finetune.data import load_data
from dist_finetune.weights import load_export

SUMMARY_KEYS = {
    "train", "val", "test", "best_step", "global_step", "epochs_completed", "stopped_early", "world_size",
    "zero_stage", "precision", "wall_seconds", "train_seconds", "samples_per_second", "tokens_per_second",
    "peak_memory_bytes", "timings",
}


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory) -> runner.Run:
    tmp = tmp_path_factory.mktemp("quickstart")
    base = yaml.safe_load((runner.REPO / "configs" / "quickstart.yaml").read_text())
    log = tmp / "network.log"
    run = runner.train(tmp, "run", base=base, netguard_log=log, timeout=400)
    assert run.ok, run.output()
    run.netguard_log = log
    return run


@pytest.mark.slow
def test_quickstart_reaches_accuracy(quickstart):
    summary = quickstart.summary()
    assert summary["test"]["accuracy"] >= 0.95, summary
    assert summary["test"]["examples"] == 300 and summary["val"]["examples"] == 149
    assert SUMMARY_KEYS <= set(summary)
    assert summary["world_size"] == 1 and summary["precision"] == "fp32"
    assert summary["best_step"] is not None and summary["best_step"] <= summary["global_step"]


@pytest.mark.slow
def test_quickstart_used_no_network(quickstart):
    log = quickstart.netguard_log
    assert not log.exists() or log.read_text() == ""


@pytest.mark.slow
def test_quickstart_writes_every_report(quickstart):
    d = quickstart.dir
    cfg = load_config(d / "config.yaml")
    assert cfg.model.n_embd == 64 and cfg.output_dir == str(d)
    events = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    kinds = {e["event"] for e in events}
    assert {"train", "eval", "summary"} <= kinds
    evals = [e for e in events if e["event"] == "eval"]
    with (d / "history.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(evals) and rows[-1]["step"] == str(evals[-1]["step"])
    assert {"step", "epoch", "examples_seen", "train_loss", "val_loss", "val_accuracy"} <= set(rows[0])
    for png in ("loss.png", "accuracy.png"):
        assert (d / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (d / "checkpoints" / "latest").is_file() and (d / "checkpoints" / "best").is_file()
    best = (d / "checkpoints" / "best").read_text().strip()
    assert best == f"step_{quickstart.summary()['best_step']:07d}"
    run_state = json.loads((d / "checkpoints" / best / "run_state.json").read_text())
    assert run_state["labels"] == ["ham", "spam"] and run_state["world_size"] == 1
    assert (d / "checkpoints" / best / "manifest.json").is_file()


@pytest.mark.slow
def test_export_reproduces_test_accuracy_without_deepspeed(quickstart):
    model, labels = load_export(quickstart.dir / "export")
    cfg = load_config(quickstart.dir / "config.yaml")
    data = load_data(cfg.data, cfg.model.context_length)
    assert labels == data.label_map.to_json() or labels.get("labels") == data.label_map.to_json()
    correct = 0
    with torch.no_grad():
        for ids, label in data.test:
            logits = model(torch.tensor([ids]), torch.tensor([len(ids)]))
            correct += int(logits.argmax(-1).item() == label)
    assert correct / len(data.test) == pytest.approx(quickstart.summary()["test"]["accuracy"], abs=1e-12)


@pytest.mark.slow
def test_existing_run_folder_is_never_overwritten(quickstart, tmp_path):
    before = (quickstart.dir / "summary.json").read_bytes()
    config = runner.write_config(tmp_path / "c.yaml")
    proc = runner.subprocess.run(
        runner.command(1, config, [f"output_dir={quickstart.dir}"]), cwd=runner.REPO,
        env=runner.child_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "already exists" in proc.stderr and "--overwrite" in proc.stderr and "resume=auto" in proc.stderr
    assert (quickstart.dir / "summary.json").read_bytes() == before


def test_bad_config_fails_before_anything_runs(tmp_path):
    config = runner.write_config(tmp_path / "c.yaml")
    proc = runner.subprocess.run(
        runner.command(1, config, [f"output_dir={tmp_path / 'run'}", "train.lrr=1"]), cwd=runner.REPO,
        env=runner.child_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "train.lrr" in proc.stderr and "train.lr" in proc.stderr
    assert not (tmp_path / "run").exists()
