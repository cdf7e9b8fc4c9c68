"""A bad state is never called good: non-finite gradients and parameters, Ctrl-C, a full disk.

Each test causes the fault on purpose in a real tiny run (subprocess, real DeepSpeed, real signals)."""
from __future__ import annotations

import resource
import signal
import subprocess
import time

import pytest
import torch

import runner
from dist_finetune.checkpoint import consolidated_state_dict, read_pointer

FAULTS = "DIST_FINETUNE_FAULTS"
SHORT = ["train.max_steps=4", "checkpoint.every_steps=1", "checkpoint.keep_last=10", "eval.every_steps=2",
         "early_stopping.enabled=false"]


def error_lines(run: runner.Run) -> list[str]:
    return [line for line in run.proc.stderr.splitlines() if line.startswith("error")]


def all_finite(state: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in state.values())


def test_nonfinite_gradients_with_a_finite_loss_drop_that_update(tmp_path):
    run = runner.train(tmp_path, "skip", SHORT, env={FAULTS: "nan_grad@step=3"})
    assert run.ok, run.output()
    weights = {step: consolidated_state_dict(run.dir, f"step_{step:07d}") for step in (2, 3, 4)}
    runner.assert_same_weights(weights[2], weights[3])  # the update of step 3 was not applied
    assert all(all_finite(w) for w in weights.values())
    assert run.summary()["nonfinite_skipped"] == 1
    assert [(e["step"], e["what"], e["action"]) for e in run.events("nonfinite")] == [(3, "gradient", "skip")]


def test_nonfinite_gradients_with_stop_exit_3_naming_a_finite_checkpoint(tmp_path):
    run = runner.train(tmp_path, "stop", [*SHORT, "train.on_nonfinite=stop"], env={FAULTS: "nan_grad@step=3"})
    assert run.proc.returncode == 3, run.output()
    (line,) = error_lines(run)
    assert "non-finite gradients at step 3" in line and "step_0000002" in line and "Traceback" not in run.proc.stderr
    assert "on_nonfinite=stop" not in line  # never advises the setting already in force
    assert read_pointer(run.dir, "latest") == "step_0000002"
    assert all_finite(consolidated_state_dict(run.dir, "step_0000002"))
    assert not (run.dir / "export").exists() and not (run.dir / "summary.json").exists()


@pytest.mark.parametrize("check", ["micro_batch", "deferred"])
def test_an_update_that_makes_the_parameters_nonfinite_is_never_saved(tmp_path, check):
    """Before: NaN weights (train.lr=.inf) became `best`, were exported, and predict printed nan
    probabilities with exit 0. An applied update cannot be dropped, so even on_nonfinite=skip stops."""
    policy = "skip" if check == "micro_batch" else "stop"
    run = runner.train(tmp_path, check, [*SHORT, f"train.nonfinite_check={check}", f"train.on_nonfinite={policy}"],
                       env={FAULTS: "nan_param@step=3"})
    assert run.proc.returncode == 3, run.output()
    (line,) = error_lines(run)
    assert "step_0000002" in line and ("non-finite at step 3" in line or "between steps 3 and 3" in line)
    assert read_pointer(run.dir, "latest") == "step_0000002"
    assert all_finite(consolidated_state_dict(run.dir, "step_0000002"))
    assert read_pointer(run.dir, "best") in (None, "step_0000002")
    assert not (run.dir / "export").exists() and not (run.dir / "summary.json").exists()


def test_an_absurd_learning_rate_is_refused_before_training(tmp_path):
    for lr in ("1e39", ".inf", "nan"):
        run = runner.train(tmp_path, f"lr{lr}", [f"train.lr={lr}"])
        assert run.proc.returncode == 2, run.output()
        (line,) = error_lines(run)
        assert "train.lr" in line and not run.dir.exists()


@pytest.mark.slow
def test_ctrl_c_saves_at_the_next_step_and_exits_130_then_resumes(tmp_path):
    steps = ["train.max_steps=6", "eval.every_steps=3", "early_stopping.enabled=false"]
    first = runner.train(tmp_path, "run", steps, env={FAULTS: "signal@step=2,name=INT"})
    assert first.proc.returncode == 130, first.output()
    assert read_pointer(first.dir, "latest") == "step_0000002"
    assert "Traceback" not in first.proc.stderr
    assert [e["signal"] for e in first.events("preempted")] == ["SIGINT"]
    resumed = runner.train(tmp_path, "run", [*steps, "resume=auto"])
    assert resumed.ok, resumed.output()
    assert resumed.summary()["global_step"] == 6


@pytest.mark.slow
def test_a_second_ctrl_c_exits_at_once(tmp_path):
    """Step 2 stalls for a minute (a slow step): the first Ctrl-C waits for it, the second does not."""
    config = runner.write_config(tmp_path / "c.yaml")
    cmd = runner.command(1, config, [f"output_dir={tmp_path / 'run'}", "train.max_steps=6"])
    proc = subprocess.Popen(cmd, cwd=runner.REPO, env={**runner.child_env(), FAULTS: "sleep@step=2,seconds=60"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (tmp_path / "run" / "metrics.jsonl").exists():
            time.sleep(0.05)  # step 1 was logged: step 2 is stalling now
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    finally:
        runner.kill_tree(proc.pid)
    assert proc.returncode == 130, err
    assert "interrupted again" in err and "Traceback" not in err
    assert read_pointer(tmp_path / "run", "latest") is None


def _limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (4 << 20, 4 << 20))  # 4 MiB: a checkpoint does not fit


def test_a_full_disk_while_saving_is_one_line_naming_the_last_complete_checkpoint(tmp_path):
    config = runner.write_config(tmp_path / "c.yaml")
    cmd = runner.command(1, config, [f"output_dir={tmp_path / 'run'}", *SHORT])
    proc = subprocess.run(cmd, cwd=runner.REPO, env=runner.child_env(), capture_output=True, text=True,
                          timeout=300, preexec_fn=_limit_file_size)
    run = runner.Run(tmp_path / "run", proc)
    assert proc.returncode == 2, run.output()
    (line,) = error_lines(run)
    assert "cannot write checkpoint step_0000001" in line and "resume=auto" in line
    assert "Traceback" not in proc.stderr
    assert read_pointer(run.dir, "latest") is None
