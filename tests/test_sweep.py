"""The sweep command: one row per setting, a broken setting fails alone."""
from __future__ import annotations

import csv
import subprocess
import sys

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
    assert again.returncode == 2 and "--overwrite" in again.stderr, again.stderr
    assert (out / "notes.log").read_text() == log and (out / "comparison.md").read_text() == table
    assert sweep("--overwrite").returncode == 0
