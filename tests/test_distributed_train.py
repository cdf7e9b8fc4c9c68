"""Real multi-rank training: torchrun, gloo on 127.0.0.1, DeepSpeed ZeRO 0-3 (fp32, tiny model)."""
from __future__ import annotations

import json
import signal
import time

import pytest
import torch

import runner
from dist_finetune.checkpoint import consolidated_state_dict, read_pointer
from dist_finetune.weights import load_export

pytestmark = pytest.mark.slow
FOUR_STEPS = ["train.max_steps=4", "early_stopping.enabled=false", "checkpoint.export=false"]


def step_losses(run: runner.Run) -> list[float]:
    return [e["train_loss"] for e in run.events("train")]


def test_two_ranks_train_disjoint_shards_and_stop_together(tmp_path):
    # min_delta larger than any possible improvement: the second evaluation must stop the run.
    run = runner.train(tmp_path, "es", nproc=2, overrides=[
        "eval.every_steps=5", "early_stopping.patience=1", "early_stopping.min_delta=100",
        "report.sample_log=true", "train.epochs=3"])
    assert run.ok, run.output()
    summary = run.summary()
    assert summary["stopped_early"] is True and summary["world_size"] == 2
    assert summary["global_step"] == 10 and summary["best_step"] == 5
    logs = [[json.loads(x) for x in (run.dir / "samples" / f"rank{r}.jsonl").read_text().splitlines()]
            for r in range(2)]
    assert [b["step"] for b in logs[0]] == [b["step"] for b in logs[1]] == list(range(10))
    seen = [{i for b in log for i in b["indices"]} for log in logs]
    assert not seen[0] & seen[1]
    assert len(seen[0]) == len(seen[1]) == 10 * 8
    decisions = [e["decision"] for e in run.events("eval")]
    assert decisions == ["new_best", "stop"]
    assert run.proc.stdout.count("early stop at step 10: no improvement in val_loss by more than 100") == 1


FAST_PATH = ["data.padding=longest", "data.group_by_length=true", "train.nonfinite_check=deferred",
             "train.on_nonfinite=stop", "train.sync_every_steps=3", "train.log_every_steps=4",
             "precision=bf16_autocast", "eval.batch_size=64", "report.sample_log=true"]


def test_two_ranks_on_the_fast_path_group_lengths_and_agree(tmp_path):
    """Length-grouped shards, device-side sums, deferred checks every 3 steps, bf16 autocast: 2 ranks."""
    run = runner.train(tmp_path, "fast", nproc=2, overrides=[*FAST_PATH, "train.max_steps=20"])
    assert run.ok, run.output()
    summary = run.summary()
    assert summary["global_step"] == 20 and summary["precision"] == "bf16_autocast"
    assert summary["test"]["examples"] == 300 and summary["train"]["examples"] == 1045
    assert {"startup_seconds", "data_seconds", "engine_init_seconds", "loop_train_seconds",
            "final_eval_seconds"} <= set(summary["timings"])
    losses = step_losses(run)
    assert len(losses) == 5 and all(map(lambda x: x == x, losses))  # logged every 4 steps, finite
    logs = [[json.loads(x) for x in (run.dir / "samples" / f"rank{r}.jsonl").read_text().splitlines()]
            for r in range(2)]
    seen = [[i for b in log for i in b["indices"]] for log in logs]
    assert len(seen[0]) == len(seen[1]) == 20 * 8 and not set(seen[0]) & set(seen[1])
    from dist_finetune.config import load_config
    from dist_finetune.data import load_data
    data = load_data(load_config(run.dir / "config.yaml").data, 128)
    length = [len(ids) for ids in data.train.token_ids]
    # The two ranks' micro-batches of one step come from one length-sorted global batch: their spread of
    # lengths is far below that of 16 examples drawn at random.
    spread = lambda idx: max(length[i] for i in idx) - min(length[i] for i in idx)
    grouped = sum(spread(a["indices"] + b["indices"]) for a, b in zip(logs[0], logs[1])) / 20
    g = torch.Generator().manual_seed(0)
    shuffled = sum(spread(torch.randperm(len(length), generator=g)[:16].tolist()) for _ in range(200)) / 200
    assert grouped < 0.3 * shuffled, (grouped, shuffled)


def test_data_parallel_and_accumulation_are_equivalent(tmp_path):
    ranks = runner.train(tmp_path, "r2m4", nproc=2, overrides=[*FOUR_STEPS, "train.micro_batch_size=4"])
    accum = runner.train(tmp_path, "r1m4a2", overrides=[*FOUR_STEPS, "train.micro_batch_size=4",
                                                        "train.grad_accum_steps=2"])
    single = runner.train(tmp_path, "r1m8", overrides=[*FOUR_STEPS, "train.micro_batch_size=8"])
    for run in (ranks, accum, single):
        assert run.ok, run.output()
    reference = step_losses(single)
    assert len(reference) == 4
    for run in (ranks, accum):
        assert step_losses(run) == pytest.approx(reference, rel=1e-5, abs=1e-6)
        runner.assert_same_weights(runner.latest_weights(run.dir), runner.latest_weights(single.dir), atol=1e-5)


ZERO_COMMON = [*FOUR_STEPS, "train.micro_batch_size=4", "model.trainable=last_block"]


@pytest.fixture(scope="module")
def zero0(tmp_path_factory) -> runner.Run:
    """The ZeRO-0 reference the other stages are compared with, trained once."""
    run = runner.train(tmp_path_factory.mktemp("zero0"), "z0", nproc=2, overrides=[*ZERO_COMMON, "zero.stage=0"])
    assert run.ok, run.output()
    return run


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stages_give_the_same_weights(tmp_path, stage, zero0):
    other = runner.train(tmp_path, f"z{stage}", nproc=2, overrides=[*ZERO_COMMON, f"zero.stage={stage}"])
    assert other.ok, other.output()
    assert step_losses(other) == pytest.approx(step_losses(zero0), rel=1e-5, abs=1e-6)
    runner.assert_same_weights(runner.latest_weights(other.dir), runner.latest_weights(zero0.dir), atol=1e-5)


def test_killed_run_resumes_to_the_same_result(tmp_path):
    steps = ["train.max_steps=60", "eval.every_steps=10", "checkpoint.every_steps=10",
             "checkpoint.keep_last=10", "early_stopping.patience=100"]
    full = runner.train(tmp_path, "full", overrides=steps)
    assert full.ok, full.output()

    run_dir, proc = runner.start(tmp_path, "killed", overrides=steps)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        tag = read_pointer(run_dir, "latest")
        if tag is not None and int(tag.split("_")[1]) >= 20:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    killed_at = int(read_pointer(run_dir, "latest").split("_")[1])
    assert 20 <= killed_at < 60  # mid-epoch: an epoch is 130 steps

    resumed = runner.train(tmp_path, "killed", overrides=[*steps, "resume=auto"])
    assert resumed.ok, resumed.output()
    assert f"resumed from step_{killed_at:07d}" in resumed.proc.stdout
    runner.assert_same_weights(runner.latest_weights(resumed.dir), runner.latest_weights(full.dir))
    a, b = full.summary(), resumed.summary()
    for key in ("train", "val", "test", "best_step", "global_step", "stopped_early"):
        assert a[key] == b[key], key
    assert (full.dir / "history.csv").read_text() == (resumed.dir / "history.csv").read_text()


def test_resume_refuses_a_changed_config(tmp_path):
    first = runner.train(tmp_path, "run", overrides=["train.max_steps=2"])
    assert first.ok, first.output()
    again = runner.train(tmp_path, "run", overrides=["train.max_steps=2", "resume=auto", "train.lr=0.5"])
    assert again.proc.returncode == 2
    assert "train.lr" in again.proc.stderr and "0.5" in again.proc.stderr


@pytest.mark.parametrize("nproc,stage", [(2, 3), (3, 0)])
def test_sharded_evaluation_is_exact(tmp_path, nproc, stage):
    """149 validation examples, eval batch 2: uneven shards, so ranks run padded forwards too."""
    config = runner.write_config(tmp_path / "c.yaml")
    results = []
    for n in (1, nproc):
        out = tmp_path / f"eval{n}.json"
        script = str(runner.REPO / "tests" / "scripts" / "eval_shards.py")
        cmd = [*runner.launcher(n), script, str(config), str(out), "eval.batch_size=2", f"zero.stage={stage}"]
        proc = runner.run_to_end(cmd, runner.child_env(), timeout=300)
        assert proc.returncode == 0, proc.stderr[-4000:]
        results.append(json.loads(out.read_text()))
    one, many = results
    assert one["examples"] == many["examples"] == 149
    assert many["accuracy"] == one["accuracy"]
    assert many["loss"] == pytest.approx(one["loss"], rel=1e-6)


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_bf16_export_holds_the_fp32_master_weights(tmp_path, stage):
    run = runner.train(tmp_path, f"bf16z{stage}", nproc=2, overrides=[
        "precision=bf16", f"zero.stage={stage}", "train.max_steps=6", "eval.every_steps=3",
        "model.trainable=last_block", "train.micro_batch_size=4"])
    assert run.ok, run.output()
    assert run.summary()["precision"] == "bf16"
    model, _ = load_export(run.dir / "export")
    exported = {k: v for k, v in model.state_dict().items()}
    best = consolidated_state_dict(run.dir, read_pointer(run.dir, "best"))
    assert all(v.dtype == torch.float32 for v in exported.values())
    runner.assert_same_weights(exported, best)
    trained = exported["backbone.blocks.1.mlp.fc.weight"]
    # fp32 masters: not every value is representable in bf16 after a few AdamW steps
    assert not torch.equal(trained, trained.bfloat16().float())
