"""A file we load never runs code; and the final evaluation of a ZeRO-3 run describes its best checkpoint.

A pickle can name any callable and unpickling calls it. Every file kind a run reads back (the RNG state,
DeepSpeed's model states, a ZeRO optimizer shard, pretrained weights) is replaced here by a pickle whose
`__reduce__` would create a marker file; the attacker also rewrites manifest.json so the checksums match.
Every command must refuse with one `error:` line naming the file, and the marker must never appear.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import runner
from dist_finetune import checkpoint, safe_load
from dist_finetune.weights import WeightsError, read_state_dict


class _Payload:
    """Unpickled, it calls `os.system("touch MARKER")` (or `open(MARKER, "w")`)."""

    def __init__(self, marker: Path, how: str) -> None:
        self.marker, self.how = marker, how

    def __reduce__(self):
        if self.how == "open":
            return open, (str(self.marker), "w")
        return os.system, (f"touch {self.marker}",)


def plant(path: Path, marker: Path, how: str = "system") -> None:
    """torch.save of the payload (a zip, as torch writes), or a bare pickle.dump for `open`."""
    obj = {"module": _Payload(marker, how)}
    if how == "open":
        path.write_bytes(pickle.dumps(obj))
    else:
        torch.save(obj, path)


def cli(module: str, *args: object, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [*runner.launcher(1), "-m", f"dist_finetune.{module}", *map(str, args)]
    return runner.run_to_end(cmd, runner.child_env(), timeout)


def assert_refused(proc: subprocess.CompletedProcess, file_name: str, marker: Path) -> None:
    """Exit 2, and stderr's only error is one `error...:` line that names the file; no traceback."""
    what = f"rc={proc.returncode}\n--- stdout\n{proc.stdout[-2000:]}\n--- stderr\n{proc.stderr[-4000:]}"
    assert proc.returncode == 2, what
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and file_name in errors[0], what
    assert "Traceback" not in proc.stderr and "\x1b[" not in proc.stderr, what
    assert "weights_only" not in proc.stderr, what  # no advice to turn the protection off
    assert not marker.exists(), "the payload ran"


# ---------------------------------------------------------------- the loaders themselves


def test_each_loader_refuses_a_payload_without_running_it(tmp_path):
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.utils import zero_to_fp32

    marker = tmp_path / "marker"
    engine = safe_load._WeightsOnlyLoads(TorchCheckpointEngine())  # what `install` puts on a DeepSpeed engine
    for how, named in (("system", "posix.system"), ("open", "open")):
        path = tmp_path / how / "payload.pt"
        path.parent.mkdir()
        plant(path, marker, how)
        for load in (safe_load.torch_load, lambda p: engine.load(str(p)), lambda p: safe_load.screen(p.parent)):
            with pytest.raises(safe_load.UnsafeFileError, match=named) as info:
                load(path)
            assert str(path) in str(info.value) and "\n" not in str(info.value)
        with safe_load.zero_to_fp32_weights_only(), pytest.raises(safe_load.UnsafeFileError, match=named):
            zero_to_fp32.parse_model_states([str(path)])
    assert zero_to_fp32.torch is torch  # the scoped swap is undone
    assert not marker.exists()


@pytest.mark.parametrize("name", ["pytorch_model.bin", "gpt2-small-124M.pth", "weights.pt"])
def test_pickled_code_as_pretrained_weights_is_one_line(tmp_path, name):
    marker = tmp_path / "marker"
    folder = tmp_path / "hub_like"
    folder.mkdir()
    plant(folder / name, marker, how="open" if name.endswith(".pt") else "system")
    with pytest.raises(WeightsError) as info:
        read_state_dict(folder if name == "pytorch_model.bin" else folder / name)
    message = str(info.value)
    assert str(folder / name) in message and "\n" not in message and "weights_only" not in message
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["folder", "file"])
def test_train_refuses_pickled_code_as_model_weights(tmp_path, kind):
    marker = tmp_path / "marker"
    folder = tmp_path / "weights"
    folder.mkdir()
    target = folder / ("pytorch_model.bin" if kind == "folder" else "model.pth")
    plant(target, marker)
    spec = folder if kind == "folder" else target
    run = runner.train(tmp_path, "run", overrides=[f"model.weights={spec}", "model.name=custom"])
    assert_refused(run.proc, str(target), marker)


# ---------------------------------------------------------------- a run's own checkpoint files


@pytest.fixture(scope="module")
def zero2_run(tmp_path_factory) -> runner.Run:
    tmp = tmp_path_factory.mktemp("trust")
    run = runner.train(tmp, "run", overrides=["zero.stage=2", "train.max_steps=4", "eval.every_steps=2",
                                              "eval.max_batches=2", "checkpoint.export=false"])
    assert run.ok, run.output()
    return run


KINDS = {  # file kind -> how to find it in a checkpoint folder, and the payload's callable
    "rng": ("rng_rank0.pt", "open"),
    "model_states": ("mp_rank_00_model_states.pt", "system"),
    "optimizer_shard": ("*optim_states.pt", "system"),
}


def tampered_copy(run: runner.Run, tmp: Path, kind: str, marker: Path) -> tuple[Path, str]:
    """A copy of the run whose every checkpoint holds the payload in place of one file, with manifests
    rewritten to match (so the pointers' targets pass verification)."""
    run_dir = tmp / "run"
    shutil.copytree(run.dir, run_dir)
    (tmp / "run.yaml").write_text((run.dir.parent / "run.yaml").read_text())
    pattern, how = KINDS[kind]
    names = set()
    for folder in sorted(checkpoint.checkpoint_dir(run_dir).glob("step_*")):
        (victim,) = folder.glob(pattern)
        plant(victim, marker, how)
        checkpoint.write_manifest(folder)
        assert checkpoint.verify(folder) is None
        names.add(victim.name)
    (name,) = names
    return run_dir, name


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_command_refuses_a_tampered_checkpoint(zero2_run, tmp_path, kind):
    marker = tmp_path / "marker"
    run_dir, name = tampered_copy(zero2_run, tmp_path, kind, marker)
    best = checkpoint.read_pointer(run_dir, "best")
    latest = checkpoint.read_pointer(run_dir, "latest")
    resume = runner.run_to_end(runner.command(1, tmp_path / "run.yaml", [
        f"output_dir={run_dir}", "resume=auto", "zero.stage=2", "train.max_steps=4", "eval.every_steps=2",
        "eval.max_batches=2", "checkpoint.export=false"]), runner.child_env(), 300)
    assert_refused(resume, f"{latest}/{name}", marker)
    assert_refused(cli("evaluate", "--run", run_dir), f"{best}/{name}", marker)
    assert_refused(cli("evaluate", "--run", run_dir, "--checkpoint", checkpoint.checkpoint_dir(run_dir) / latest),
                   f"{latest}/{name}", marker)
    assert_refused(cli("export", "--run", run_dir, "--out", tmp_path / "export"), f"{best}/{name}", marker)
    assert not (tmp_path / "export").exists()


def test_untampered_checkpoint_files_hold_only_tensors_and_plain_data(zero2_run):
    """What we save loads under weights_only with the allow-list alone, and our own files need none."""
    folder = checkpoint.checkpoint_dir(zero2_run.dir) / checkpoint.read_pointer(zero2_run.dir, "latest")
    safe_load.screen(folder)
    for path in (folder / "rng_rank0.pt", folder / "mp_rank_00_model_states.pt"):
        torch.load(path, weights_only=True)  # no allow-list needed
    json.loads((folder / "rng_rank0.json").read_text())


# ---------------------------------------------------------------- issue 14: ZeRO-3 final evaluation


def _stage3_best_before_last(tmp_path: Path, nproc: int) -> runner.Run:
    """Early stopping after two worse evaluations: the best checkpoint is never the last one."""
    run = runner.train(tmp_path, f"z3_{nproc}", nproc=nproc, overrides=[
        "zero.stage=3", "train.lr=0.02", "train.max_steps=40", "eval.every_steps=2", "early_stopping.patience=2",
        "checkpoint.export=false"])
    assert run.ok, run.output()
    summary = run.summary()
    assert summary["best_step"] != summary["global_step"], summary  # else the test would prove nothing
    assert checkpoint.read_pointer(run.dir, "best") != checkpoint.read_pointer(run.dir, "latest")
    return run


def _assert_summary_is_best(run: runner.Run, tmp_path: Path) -> None:
    summary = run.summary()
    for split in ("val", "test"):
        out = tmp_path / f"{split}.json"
        proc = cli("evaluate", "--run", run.dir, "--checkpoint", "best", "--split", split, "--out", out)
        assert proc.returncode == 0, proc.stderr[-3000:]
        result = json.loads(out.read_text())
        assert result["accuracy"] == summary[split]["accuracy"], split
        assert result["loss"] == pytest.approx(summary[split]["loss"], rel=1e-5), split


def test_zero3_final_evaluation_is_the_best_checkpoint_one_rank(tmp_path):
    _assert_summary_is_best(_stage3_best_before_last(tmp_path, 1), tmp_path)


@pytest.mark.slow
def test_zero3_final_evaluation_is_the_best_checkpoint_two_ranks(tmp_path):
    _assert_summary_is_best(_stage3_best_before_last(tmp_path, 2), tmp_path)
