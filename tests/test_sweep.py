"""The sweep command: one row per setting, a broken setting fails alone."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

import runner
from dist_finetune.sweep import GridError, parse_grid


def test_grid_forms_and_errors():
    assert [s.name for s in parse_grid({"a": ["train.lr=1e-3"], "b": None})] == ["a", "b"]
    assert parse_grid([{"name": "x", "overrides": ["seed=1"]}])[0].overrides == ("seed=1",)
    for bad in ([], [{"name": "a/b"}], [{"name": "a"}, {"name": "a"}], [{"nam": "a"}], "x", {"a": "seed=1"}):
        with pytest.raises(GridError):
            parse_grid(bad)


@pytest.mark.slow
def test_sweep_of_three_settings_and_a_broken_one(tmp_path):
    base = runner.write_config(tmp_path / "base.yaml", {
        **runner.TINY, "train": {**runner.TINY["train"], "max_steps": 3}, "eval": {"max_batches": 2}})
    grid = [{"name": "full", "overrides": []},
            {"name": "head_only", "overrides": ["model.trainable=last_layer"]},
            {"name": "lora", "overrides": ["model.trainable=lora", "model.pooling=first"]},
            {"name": "broken", "overrides": ["model.pooling=middle"]}]
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid))
    out = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, "-m", "dist_finetune.sweep", "--base", str(base), "--grid",
                           str(tmp_path / "grid.yaml"), "--out", str(out)],
                          cwd=runner.REPO, env=runner.child_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout + proc.stderr  # one setting failed
    rows = list(csv.DictReader((out / "comparison.csv").open()))
    assert [r["setting"] for r in rows] == ["full", "head_only", "lora", "broken"]
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "failed"]
    assert "model.pooling" in rows[3]["error"]
    assert int(rows[1]["trainable_parameters"]) == 64 * 2 + 2
    assert int(rows[2]["trainable_parameters"]) < int(rows[0]["trainable_parameters"])
    for r in rows[:3]:
        assert 0 <= float(r["test_acc"]) <= 1 and float(r["samples_per_second"]) > 0
    table = (out / "comparison.md").read_text()
    assert table.count("| ok |") == 3 and "| failed |" in table and table in proc.stdout
    assert (out / "broken.log").is_file() and (out / "lora" / "summary.json").is_file()


def test_a_sweep_never_replaces_an_earlier_sweeps_results_or_a_users_files(tmp_path):
    base = runner.write_config(tmp_path / "base.yaml", {**runner.TINY, "train": {**runner.TINY["train"], "max_steps": 2}})
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump([{"name": "notes", "overrides": []}]))
    out = tmp_path / "sweep"
    args = ["--base", str(base), "--grid", str(tmp_path / "grid.yaml"), "--out", str(out)]

    def sweep(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "dist_finetune.sweep", *args, *extra], cwd=runner.REPO,
                              env=runner.child_env(), capture_output=True, text=True, timeout=600)

    out.mkdir()
    (out / "notes.log").write_text("precious\n")
    refused = sweep("--overwrite")
    assert refused.returncode == 2 and "notes.log" in refused.stderr, refused.stderr
    assert (out / "notes.log").read_text() == "precious\n" and not (out / "notes").exists()
    (out / "notes.log").unlink()
    assert sweep().returncode == 0
    log, table = (out / "notes.log").read_text(), (out / "comparison.md").read_text()
    again = sweep()
    assert again.returncode == 2 and "--overwrite" in again.stderr and "--resume" in again.stderr, again.stderr
    assert (out / "notes.log").read_text() == log and (out / "comparison.md").read_text() == table
    assert sweep("--overwrite").returncode == 0


def rows_of(out) -> dict[str, dict[str, str]]:
    return {r["setting"]: r for r in csv.DictReader((out / "comparison.csv").open())}


@pytest.mark.slow
def test_resume_keeps_finished_settings_continues_unfinished_and_runs_missing_ones(tmp_path):
    """A sweep that finished `a`, crashed `b` after a checkpoint and never got to `c`: a plain rerun is
    refused before anything runs; --resume keeps a (its row, log and run), continues b from its
    checkpoint (its log keeps the crash), runs c; a finished run of other settings is refused."""
    base = runner.write_config(tmp_path / "base.yaml", {
        **runner.TINY, "train": {**runner.TINY["train"], "max_steps": 4}, "eval": {"max_batches": 2},
        "checkpoint": {"every_steps": 2, "export": False}})
    out = tmp_path / "sweep"

    def sweep(grid: dict, *flags: str, faults: str = "") -> subprocess.CompletedProcess:
        (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid))
        env = {**runner.child_env(), **({"DIST_FINETUNE_FAULTS": faults} if faults else {})}
        return subprocess.run([sys.executable, "-m", "dist_finetune.sweep", "--base", str(base), "--grid",
                               str(tmp_path / "grid.yaml"), "--out", str(out), *flags], cwd=runner.REPO, env=env,
                              capture_output=True, text=True, timeout=600)

    a, b, c = ["model.trainable=last_layer"], ["train.lr=2e-3"], ["seed=5"]
    first = sweep({"a": a})
    assert first.returncode == 0, first.stdout + first.stderr
    a_row, a_log = rows_of(out)["a"], (out / "a.log").read_text()

    crashed = sweep({"a": a, "b": b}, "--resume", faults="exit@step=4")  # b dies after its step-2 checkpoint
    assert crashed.returncode == 1, crashed.stdout + crashed.stderr
    assert "a: finished earlier, kept" in crashed.stdout
    assert rows_of(out)["a"] == a_row and rows_of(out)["b"]["status"] == "failed"
    assert not (out / "b" / "summary.json").exists() and (out / "b" / "checkpoints" / "step_0000002").is_dir()
    tables, b_log = (out / "comparison.csv").read_text(), (out / "b.log").read_text()

    refused = sweep({"a": a, "b": b, "c": c})
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert str(out) in refused.stderr and "--resume" in refused.stderr and "--overwrite" in refused.stderr
    assert (out / "comparison.csv").read_text() == tables and not (out / "c").exists()

    changed = sweep({"a": ["model.trainable=all"], "b": b, "c": c}, "--resume")
    assert changed.returncode == 2 and str(out / "a") in changed.stderr and "model.trainable" in changed.stderr, \
        changed.stderr
    assert (out / "b.log").read_text() == b_log and not (out / "c").exists()

    resumed = sweep({"a": a, "b": b, "c": c}, "--resume")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    rows = rows_of(out)
    assert list(rows) == ["a", "b", "c"] and [r["status"] for r in rows.values()] == ["ok", "ok", "ok"]
    assert rows["a"] == a_row and (out / "a.log").read_text() == a_log
    log = (out / "b.log").read_text()
    assert log.startswith(b_log) and "resumed from step_0000002" in log[len(b_log):]
    assert json.loads((out / "b" / "summary.json").read_text())["global_step"] == 4
    assert (out / "c" / "summary.json").is_file()


@pytest.mark.slow
def test_ctrl_c_lets_the_running_setting_save_then_resume_continues_it(tmp_path):
    """Ctrl-C reaches the sweep and its running setting (one process group): the setting saves a checkpoint
    and the sweep exits 130 after it, instead of killing it mid-save; --resume continues from that checkpoint."""
    base = runner.write_config(tmp_path / "base.yaml", {
        **runner.TINY, "train": {**runner.TINY["train"], "max_steps": 3}, "checkpoint": {"export": False}})
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump({"a": ["seed=5"]}))
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "dist_finetune.sweep", "--base", str(base), "--grid", str(tmp_path / "grid.yaml"),
           "--out", str(out)]
    env = {**runner.child_env(), "DIST_FINETUNE_FAULTS": "sleep@step=1,seconds=3"}  # Ctrl-C lands in the stall
    proc = subprocess.Popen(cmd, cwd=runner.REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 300
        while not (out / "a.log").exists() or "plan:" not in (out / "a.log").read_text():
            assert time.monotonic() < deadline and proc.poll() is None, proc.stdout.read()
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        output = proc.communicate(timeout=300)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    log = (out / "a.log").read_text()
    assert proc.returncode == 130, output + log
    assert "checkpoint step_0000001 saved" in log, log
    assert (out / "a" / "checkpoints" / "latest").read_text().strip() == "step_0000001"
    resumed = subprocess.run([*cmd, "--resume"], cwd=runner.REPO, env=runner.child_env(), capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from step_0000001" in (out / "a.log").read_text()
    assert json.loads((out / "a" / "summary.json").read_text())["global_step"] == 3
