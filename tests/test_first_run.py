"""A new user's first run: CPU threads per rank, nothing compiled that the run does not use."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import runner
from dist_finetune import distributed

CORES = len(os.sched_getaffinity(0))


@pytest.mark.parametrize(("omp", "ranks", "expected"), [
    ("3", 1, 3), ("3", 8, 3), (None, 1, CORES), (None, CORES, 1), (None, 4 * CORES, 1), ("", 1, CORES),
    ("zero", 1, CORES),
])
def test_cpu_threads(monkeypatch: pytest.MonkeyPatch, omp: str | None, ranks: int, expected: int) -> None:
    if omp is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    assert distributed.cpu_threads(ranks) == expected


@pytest.mark.parametrize(("tasks", "node", "expected"), [
    ("2", "0", 2), ("4(x3)", "2", 4), ("2(x2),1", "2", 1), ("2(x2),1", "1", 2), ("garbage", "0", 1),
])
def test_slurm_tasks_on_this_node(tasks: str, node: str, expected: int) -> None:
    env = {"SLURM_STEP_TASKS_PER_NODE": tasks, "SLURM_NODEID": node}
    assert distributed._slurm_tasks_on_node(env) == expected


PROBE = """
import torch
from dist_finetune.distributed import init_distributed, shutdown
env = init_distributed()
print("threads", torch.get_num_threads(), "ranks_on_node", env.world_size)
shutdown()
"""


def test_a_rank_takes_its_share_of_the_cores() -> None:
    """Launched as 1 of CORES ranks on this node (torchrun's variables), without OMP_NUM_THREADS."""
    env = runner.child_env()
    env.pop("OMP_NUM_THREADS")
    env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE=str(CORES),
               MASTER_PORT=str(runner.free_port()))
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, cwd=runner.REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "threads 1 " in out.stdout


def test_first_run_compiles_nothing_and_prints_no_deepspeed_noise(tmp_path: Path) -> None:
    """A fresh install's first run: DeepSpeed's CPU shared-memory op (used only by its inference
    all-reduce) is not built, and DeepSpeed is told the accelerator instead of guessing aloud."""
    extensions = tmp_path / "torch_extensions"
    extensions.mkdir()
    env = runner.child_env()
    env["TORCH_EXTENSIONS_DIR"] = str(extensions)
    env.pop("DS_ACCELERATOR", None)
    cfg = runner.write_config(tmp_path / "config.yaml")
    cmd = runner.command(1, cfg, [f"output_dir={tmp_path / 'run'}", "train.max_steps=2", "eval.every_steps=null"])
    out = runner.run_to_end(cmd, env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert list(extensions.iterdir()) == [], "something was compiled"
    console = out.stdout + out.stderr
    assert "built successfully" not in console
    assert "Setting accelerator to CPU" not in console
