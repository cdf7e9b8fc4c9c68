"""Faults caused on purpose: bad inputs, crashed and dead ranks, damaged checkpoints, non-finite
losses, a changed world size, unusable output folders. Each must end in a clear message or in the
same result as an undisturbed run, never in a raw stack trace or a hang."""
from __future__ import annotations

import json
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import torch

import runner
from dist_finetune import checkpoint, runs
from dist_finetune.config import load_config
from dist_finetune.model import GPTConfig, GPTClassifier
from dist_finetune.weights import save_export

ROWS = "win a free prize now,spam\nsee you at lunch,ham\n"
GOOD = "text,label\n" + ROWS
MANY = "text,label\n" + ROWS * 8  # 16 rows: enough for one micro-batch


def write(path: Path, content: str | bytes) -> str:
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


def data_files(tmp: Path, train: str | bytes = MANY, val: str | bytes = GOOD,
               test: str | bytes = GOOD) -> list[str]:
    tmp = Path(tempfile.mkdtemp(dir=tmp))  # each case its own files
    return [f"data.train_file={write(tmp / 'train.csv', train)}", f"data.val_file={write(tmp / 'val.csv', val)}",
            f"data.test_file={write(tmp / 'test.csv', test)}"]


def tiny_export(tmp: Path, num_classes: int) -> str:
    cfg = GPTConfig(n_layer=2, n_head=4, n_embd=64, context_length=128)
    save_export(GPTClassifier(cfg, num_classes, "last_token"), tmp / "export", "last_token",
                [f"c{i}" for i in range(num_classes)], max_length=64, padding="fixed")
    return str(tmp / "export")


def bad_input_cases(tmp: Path) -> dict[str, tuple[list[str], list[str]]]:
    """case -> (overrides, substrings the one-line error must contain)."""
    three = "text,label\n" + "a,x\nb,y\nc,z\n" * 4
    return {
        "missing file": (["data.train_file=/nonexistent/train.csv", "data.val_file=/nonexistent/v.csv",
                          "data.test_file=/nonexistent/t.csv"], ["/nonexistent/train.csv"]),
        "wrong delimiter": (data_files(tmp, train=MANY.replace(",", ";")),
                            ["train.csv", "columns found", "data.text_column"]),
        "missing text column": ([*data_files(tmp), "data.text_column=body"], ["'body'", "columns found"]),
        "missing label column": ([*data_files(tmp), "data.label_column=target"], ["'target'", "columns found"]),
        "empty text": (data_files(tmp, train=MANY + ",spam\n"), ["train.csv", "row 17", "empty"]),
        "NaN label": (data_files(tmp, train=MANY + "hello,\n"), ["train.csv", "row 17", "label is missing"]),
        "label unseen in training": (data_files(tmp, val=GOOD + "hi,eggs\n"), ["val.csv", "row 3", "'eggs'"]),
        "invalid UTF-8": (data_files(tmp, train=MANY.encode() + b"caf\xe9,ham\n"),
                          ["train.csv", "row 17", "UTF-8"]),
        "split emptier than world x micro": (data_files(tmp, train=GOOD),
                                             ["2 examples", "micro-batch of 8", "train.micro_batch_size"]),
        "class count differs from a loaded head": (
            [*data_files(tmp, train=three, val=three, test=three), f"model.weights={tiny_export(tmp, 2)}"],
            ["2 classes but the data has 3", "model.head=new"]),
        "typo in a config key": (["train.lr_rate=0.1"], ["train.lr_rate", "train.lr"]),
        "negative learning rate": (["train.lr=-0.001"], ["train.lr", "must be in (0, 10]"]),
        "ZeRO stage 4": (["zero.stage=4"], ["zero.stage", "0 | 1 | 2 | 3"]),
        "fp16 on CPU": (["precision=fp16", "train.max_steps=1"], ["precision", "fp16 needs a CUDA GPU"]),
        "resume from a folder that is not a run": ([f"resume={tmp}"], ["resume", "not a checkpoint folder"]),
        "output_dir under a file": ([f"output_dir={write(tmp / 'afile', 'x')}/run"], ["output_dir", "afile"]),
    }


CASES = ["missing file", "wrong delimiter", "missing text column", "missing label column", "empty text",
         "NaN label", "label unseen in training", "invalid UTF-8", "split emptier than world x micro",
         "class count differs from a loaded head", "typo in a config key", "negative learning rate",
         "ZeRO stage 4", "fp16 on CPU", "resume from a folder that is not a run", "output_dir under a file"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_stops_with_a_clear_message(tmp_path, case):
    cases = bad_input_cases(tmp_path)
    assert sorted(cases) == sorted(CASES)
    overrides, expected = cases[case]
    config = runner.write_config(tmp_path / "c.yaml")
    output = [] if any(o.startswith("output_dir=") for o in overrides) else [f"output_dir={tmp_path / 'run'}"]
    proc = runner.run_to_end(runner.command(1, config, [*output, *overrides]), runner.child_env(), timeout=180)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    error = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert error, proc.stderr[-3000:]
    for text in expected:
        assert text in error[0], error[0]


@pytest.mark.slow
def test_texts_longer_than_the_context_are_truncated_counted_and_warned(tmp_path):
    long_text = " ".join(["free prize"] * 200)
    rows = "text,label\n" + f"{long_text},spam\n{long_text} now,ham\n" * 8
    run = runner.train(tmp_path, "run", overrides=[*data_files(tmp_path, train=rows, val=rows, test=rows),
                                                   "data.max_length=None", "train.max_steps=1"])
    assert run.ok, run.output()
    assert "truncated" in run.proc.stderr + run.proc.stdout


def test_full_disk_is_found_before_training(tmp_path, monkeypatch):
    cfg = load_config(None, ["model.name=gpt2-xl", "model.trainable=all", f"output_dir={tmp_path}"])
    usage = runs.shutil.disk_usage(tmp_path)
    monkeypatch.setattr(runs.shutil, "disk_usage", lambda p: usage._replace(free=10 * 2**30))
    with pytest.raises(runs.ConfigError, match=r"GiB are needed .* only 10.0 GiB are free"):
        runs.check_free_space(cfg, tmp_path)


# ---------------------------------------------------------------- faults during training

SHORT = ["train.max_steps=20", "eval.every_steps=5", "checkpoint.every_steps=5", "checkpoint.keep_last=10",
         "early_stopping.patience=100"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> runner.Run:
    run = runner.train(tmp_path_factory.mktemp("ref"), "run", nproc=2, overrides=[*SHORT, "resume=auto"])
    assert run.ok, run.output()
    return run


@pytest.mark.slow
def test_killed_rank_restarts_resumes_and_matches(tmp_path, reference):
    import psutil

    config = runner.write_config(tmp_path / "c.yaml")
    run_dir = tmp_path / "run"
    # c10d rendezvous: each restart is a new round with a fresh store (a static one replays stale keys).
    port = runner.free_port()
    cmd = [runner.sys.executable, "-m", "torch.distributed.run", "--max-restarts=1", "--nnodes=1",
           "--nproc_per_node=2", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
           "--local_addr=127.0.0.1", "-m", "dist_finetune.train", "--config", str(config),
           f"output_dir={run_dir}", *SHORT, "resume=auto"]
    proc = subprocess.Popen(cmd, cwd=runner.REPO, env=runner.child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        while (checkpoint.read_pointer(run_dir, "latest") or "step_0") < "step_0000010":
            assert proc.poll() is None and time.time() < deadline, "the run ended before a rank could be killed"
            time.sleep(0.05)
        workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if "dist_finetune" in " ".join(p.cmdline())]
        assert len(workers) == 2
        workers[1].send_signal(signal.SIGKILL)
        out = proc.communicate(timeout=300)[0]
    finally:
        runner.kill_tree(proc.pid)
    assert proc.returncode == 0, out[-4000:]
    assert "resumed from step_" in out
    runner.assert_same_weights(runner.latest_weights(run_dir), runner.latest_weights(reference.dir))
    assert runner.Run(run_dir, None).summary()["test"] == reference.summary()["test"]


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncate a shard", "flip a byte", "no manifest (killed mid-save)"])
def test_damaged_latest_checkpoint_is_skipped_on_resume(tmp_path, damage):
    first = runner.train(tmp_path, "run", overrides=[*SHORT, "train.max_steps=10"])
    assert first.ok, first.output()
    latest = checkpoint.checkpoint_dir(first.dir) / "step_0000010"
    shard = latest / "mp_rank_00_model_states.pt"
    if damage == "truncate a shard":
        shard.write_bytes(shard.read_bytes()[:1000])
    elif damage == "flip a byte":
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    else:
        (latest / "manifest.json").unlink()
    again = runner.train(tmp_path, "run", overrides=[*SHORT, "train.max_steps=10", "resume=auto"])
    assert again.ok, again.output()
    assert f"checkpoint {latest} is incomplete or corrupted" in again.proc.stderr
    assert "resumed from step_0000005" in again.proc.stdout


@pytest.mark.slow
def test_nonfinite_loss_is_skipped_on_every_rank(tmp_path):
    run = runner.train(tmp_path, "run", nproc=2, overrides=["train.max_steps=6"],
                       env={"DIST_FINETUNE_FAULTS": "nan_loss@step=3,rank=1"})
    assert run.ok, run.output()
    events = run.events("nonfinite")
    assert [(e["step"], e["action"]) for e in events] == [(3, "skip")]
    assert all(torch.isfinite(torch.tensor(e["train_loss"])) for e in run.events("train"))
    assert run.summary()["global_step"] == 6


@pytest.mark.slow
def test_nonfinite_loss_with_stop_saves_and_exits_nonzero(tmp_path):
    run = runner.train(tmp_path, "run", nproc=2, overrides=["train.max_steps=6", "train.on_nonfinite=stop"],
                       env={"DIST_FINETUNE_FAULTS": "nan_loss@step=3,rank=0"})
    assert not run.ok
    assert "non-finite loss at step 3" in run.proc.stderr and "train.on_nonfinite=skip" in run.proc.stderr
    assert checkpoint.read_pointer(run.dir, "latest") == "step_0000002"
    assert not (run.dir / "summary.json").exists()


@pytest.mark.slow
def test_dead_peer_becomes_a_clear_error_within_the_timeout(tmp_path):
    start = time.time()
    run = runner.train(tmp_path, "run", nproc=2, overrides=["train.max_steps=6", "distributed.timeout_seconds=30"],
                       env={"DIST_FINETUNE_FAULTS": "exit@step=3,rank=1"}, timeout=240)
    assert not run.ok
    assert time.time() - start < 200
    assert "rank 0/2: a collective failed during training step 3" in run.proc.stderr, run.output()
    assert "distributed.timeout_seconds" in run.proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_resume_with_another_world_size_is_refused_with_the_way_out(tmp_path, before, after):
    first = runner.train(tmp_path, "run", nproc=before, overrides=["train.max_steps=2"])
    assert first.ok, first.output()
    again = runner.train(tmp_path, "run", nproc=after, overrides=["train.max_steps=2", "resume=auto"])
    assert not again.ok
    assert f"written by {before} ranks and this launch has {after}" in again.proc.stderr
    assert "python -m dist_finetune.export" in again.proc.stderr and "model.weights=" in again.proc.stderr
    # torchrun's agent prints its own traceback when a worker exits non-zero; ours must not
    assert f'File "{runner.REPO / "dist_finetune"}' not in again.proc.stderr


@pytest.mark.slow
def test_soak_keeps_disk_use_bounded(tmp_path):
    run = runner.train(tmp_path, "run", nproc=2, overrides=[
        "train.epochs=4", "train.micro_batch_size=32", "checkpoint.every_steps=2", "checkpoint.keep_last=2",
        "eval.every_steps=4", "eval.max_batches=2", "early_stopping.patience=1000", "train.log_every_steps=5"],
        timeout=600)
    assert run.ok, run.output()
    folders = [p.name for p in checkpoint.checkpoint_dir(run.dir).iterdir() if p.is_dir()]
    assert run.summary()["global_step"] >= 60
    assert len(folders) <= 3, folders  # keep_last + the best
    saves = sum(1 for line in (run.dir / "metrics.jsonl").read_text().splitlines()
                if json.loads(line)["event"] == "eval")
    assert saves >= 15


@pytest.mark.slow
def test_deferred_nonfinite_check_stops_before_saving_the_bad_update(tmp_path):
    run = runner.train(tmp_path, "run", nproc=2, env={"DIST_FINETUNE_FAULTS": "nan_loss@step=3,rank=1"},
                       overrides=["train.max_steps=12", "train.on_nonfinite=stop", "train.nonfinite_check=deferred",
                                  "train.sync_every_steps=4", "train.log_every_steps=5", "checkpoint.every_steps=2"])
    assert not run.ok
    assert "between steps 3 and 4" in run.proc.stderr and "train.nonfinite_check=micro_batch" in run.proc.stderr
    assert checkpoint.read_pointer(run.dir, "latest") == "step_0000002"
    assert not (run.dir / "checkpoints" / "step_0000004").exists()
    assert [e["action"] for e in run.events("nonfinite")] == ["stop"]
