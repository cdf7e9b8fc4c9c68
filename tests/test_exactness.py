"""Results that must not depend on how a run was interrupted, accumulated or batched (issue: exactness).

Each test interrupts or perturbs a tiny real run (subprocesses, real DeepSpeed) on purpose and compares
it with the undisturbed run."""
from __future__ import annotations

import pytest
import torch

from dist_finetune.checkpoint import consolidated_state_dict

import runner

FAULTS = "DIST_FINETUNE_FAULTS"
# The bundled training split (1045 texts) at micro-batch 32: 32 optimizer steps an epoch.
EPOCH = ["train.micro_batch_size=32"]


def crash_then_resume(tmp_path, name: str, overrides: list[str], fault: str) -> runner.Run:
    crashed = runner.train(tmp_path, name, overrides, env={FAULTS: fault})
    assert crashed.proc.returncode != 0, crashed.output()
    resumed = runner.train(tmp_path, name, [*overrides, "resume=auto"])
    assert resumed.ok, resumed.output()
    return resumed


@pytest.mark.slow
@pytest.mark.parametrize("method", [["model.dropout=0.1"],
                                    ["model.trainable=lora", "lora.dropout=0.1", "lora.rank=4"]],
                         ids=["dropout", "lora_dropout"])
def test_resume_with_dropout_ends_with_the_same_weights(tmp_path, method):
    """The training loader draws from its own generator, so a resumed run's dropout masks are the
    uninterrupted run's (before: each iter(loader) drew from the restored global RNG)."""
    steps = ["train.max_steps=12", "checkpoint.every_steps=4", "eval.every_steps=4", "checkpoint.keep_last=5",
             "early_stopping.enabled=false", *method]
    full = runner.train(tmp_path, "full", steps)
    assert full.ok, full.output()
    resumed = crash_then_resume(tmp_path, "crashed", steps, "exit@step=7")
    assert "resumed from step_0000004" in resumed.proc.stdout
    runner.assert_same_weights(runner.latest_weights(resumed.dir), runner.latest_weights(full.dir))


@pytest.mark.slow
def test_preempted_at_an_epochs_last_step_keeps_its_evaluation(tmp_path):
    """SIGUSR1 arriving during the last step of epoch 1: the epoch-end evaluation happens before the save,
    and the resumed run's history equals the uninterrupted one's."""
    steps = [*EPOCH, "train.epochs=2", "early_stopping.enabled=false"]
    full = runner.train(tmp_path, "full", steps)
    assert full.ok, full.output()
    first = runner.train(tmp_path, "preempted", steps, env={FAULTS: "signal@step=32,name=USR1"})
    assert first.ok, first.output()
    assert [e["step"] for e in first.events("preempted")] == [32]
    resumed = runner.train(tmp_path, "preempted", [*steps, "resume=auto"])
    assert resumed.ok, resumed.output()
    assert (resumed.dir / "history.csv").read_text() == (full.dir / "history.csv").read_text()
    assert [e["step"] for e in resumed.events("eval")] == [32, 64]


@pytest.mark.slow
def test_a_dropped_nonfinite_micro_batch_keeps_accumulation_windows_aligned(tmp_path):
    """With accumulation 2, a non-finite loss drops its whole window: the update of that window is not
    applied (the weights after it equal those before it), the next window trains again, the epoch keeps
    all its optimizer steps and evaluations fall on whole windows."""
    common = ["train.grad_accum_steps=2", "train.micro_batch_size=16", "early_stopping.enabled=false",
              "train.on_nonfinite=skip"]
    steps = [*common, "train.max_steps=6", "checkpoint.every_steps=1", "checkpoint.keep_last=10"]
    run = runner.train(tmp_path, "skip", steps, env={FAULTS: "nan_loss@step=5"})
    assert run.ok, run.output()
    assert run.summary()["nonfinite_skipped"] == 1
    weights = {step: consolidated_state_dict(run.dir, f"step_{step:07d}") for step in (4, 5, 6)}
    runner.assert_same_weights(weights[4], weights[5])
    assert any(not torch.equal(weights[6][k], weights[5][k]) for k in weights[5])

    epoch = runner.train(tmp_path, "epoch", [*common, "train.epochs=1", "eval.every_steps=4"],
                         env={FAULTS: "nan_loss@step=5"})
    assert epoch.ok, epoch.output()
    assert epoch.summary()["global_step"] == 32  # 64 micro-batches = 32 windows: none lost, none shifted
    assert [e["step"] for e in epoch.events("eval")] == list(range(4, 33, 4))


def test_last_pooling_with_per_batch_padding_is_refused(tmp_path):
    """`pooling: last` with padding to the longest text reads a padding position whose state depends on
    who else is in the batch. (With data.padding=none every batch holds one unpadded text: exact.)"""
    run = runner.train(tmp_path, "longest", ["model.pooling=last", "data.padding=longest"])
    assert run.proc.returncode == 2, run.output()
    assert "model.pooling=last_token" in run.proc.stderr and "Traceback" not in run.proc.stderr
    assert not (tmp_path / "longest").exists()  # refused before anything was created


@pytest.mark.slow
def test_the_first_log_line_after_a_resume_averages_a_whole_window(tmp_path):
    """log every 4 steps, checkpoint every 2: the line at step 8 of a run resumed from step 6 reports the
    same mean loss over the same 4 micro-batches as the uninterrupted run."""
    steps = ["train.max_steps=8", "train.log_every_steps=4", "checkpoint.every_steps=2",
             "checkpoint.keep_last=8", "early_stopping.enabled=false"]
    full = runner.train(tmp_path, "full", steps)
    assert full.ok, full.output()
    resumed = crash_then_resume(tmp_path, "crashed", steps, "exit@step=7")
    a = {e["step"]: e for e in full.events("train")}
    b = {e["step"]: e for e in resumed.events("train")}
    assert b[8]["micro_batches"] == a[8]["micro_batches"] == 4
    assert b[8]["train_loss"] == pytest.approx(a[8]["train_loss"], rel=1e-12)
    assert b[8]["train_accuracy"] == a[8]["train_accuracy"]
