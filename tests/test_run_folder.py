"""The run folder's rules: nothing the user has is deleted, an old run is removed only once the new one
has passed every check, resume=auto deletes nothing, sweep names stay inside --out, one run per folder."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import runner
from dist_finetune import runs
from dist_finetune.sweep import GridError, parse_grid

BASE = {**runner.TINY, "train": {**runner.TINY["train"], "max_steps": 2}, "eval": {"max_batches": 2},
        "checkpoint": {"every_steps": 1, "keep_last": 5}}


def cli(module: str, args: list[str], cwd: Path = runner.REPO, env: dict[str, str] | None = None,
        timeout: float = 240) -> subprocess.CompletedProcess:
    """One process of a command, from `cwd` (the package found through PYTHONPATH)."""
    return subprocess.run([sys.executable, "-m", f"dist_finetune.{module}", *args], cwd=cwd,
                          env={**runner.child_env(), **(env or {})}, capture_output=True, text=True, timeout=timeout)


def train(tmp: Path, output_dir: Path | str, *extra: str, cwd: Path = runner.REPO,
          env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    config = runner.write_config(tmp / "base.yaml", BASE)
    flags = [e for e in extra if e.startswith("--")]
    overrides = [e for e in extra if not e.startswith("--")]
    return cli("train", ["--config", str(config), f"output_dir={output_dir}", *overrides, *flags], cwd=cwd, env=env)


def error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes | str]:
    """Every entry under `folder` (not following links) with its bytes."""
    out: dict[str, bytes | str] = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        out[key] = f"-> {os.readlink(path)}" if path.is_symlink() else "dir" if path.is_dir() else path.read_bytes()
    return out


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished run (two checkpoints, an export, a sample log), started with resume=auto on a folder
    that did not exist yet."""
    tmp = tmp_path_factory.mktemp("finished")
    proc = train(tmp, tmp / "run", "resume=auto", "report.sample_log=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (tmp / "run" / runs.LOCK).exists()  # a finished run keeps no lock
    return tmp / "run"


def copy_run(finished: Path, tmp: Path, name: str = "run") -> Path:
    shutil.copytree(finished, tmp / name, symlinks=True)
    return tmp / name


# ---------------------------------------------------------------- --overwrite replaces only a run folder


def refusal_case(case: str, tmp: Path, finished: Path) -> tuple[Path, Path, list[str], Path, dict, str]:
    """(folder that must survive, output_dir, extra flags, cwd, extra env, text the error names)."""
    tmp.mkdir()
    if case == "project checkout":
        (tmp / "proj" / ".git").mkdir(parents=True)
        (tmp / "proj" / "main.py").write_text("print('my work')\n")
        return tmp / "proj", tmp / "proj", [], runner.REPO, {}, "project checkout"
    if case in ("current folder", "parent of the current folder"):
        (tmp / "work" / "sub").mkdir(parents=True)
        (tmp / "work" / "notes.txt").write_text("mine\n")
        cwd = tmp / "work" if case == "current folder" else tmp / "work" / "sub"
        return tmp / "work", Path("." if case == "current folder" else ".."), [], cwd, {}, "current folder"
    if case == "home folder":
        (tmp / "home").mkdir()
        (tmp / "home" / ".bashrc").write_text("export A=1\n")
        return tmp / "home", tmp / "home", [], runner.REPO, {"HOME": str(tmp / "home")}, "home folder"
    if case == "folder without the marker":
        (tmp / "data").mkdir()
        (tmp / "data" / "train.csv").write_text("text,label\n")
        return tmp / "data", tmp / "data", [], runner.REPO, {}, "not created by dist_finetune"
    if case == "run folder with a user file":
        run = copy_run(finished, tmp)
        (run / "notes.txt").write_text("my notes\n")
        return run, run, [], runner.REPO, {}, "notes.txt"
    if case == "symlink to a run folder":
        run = copy_run(finished, tmp)
        (tmp / "link").symlink_to(run)
        return run, tmp / "link", [], runner.REPO, {}, "symbolic link"
    if case in INSIDE:
        run = copy_run(finished, tmp)
        (run / INSIDE[case]).parent.mkdir(exist_ok=True)  # eval/ exists once evaluate ran
        (run / INSIDE[case]).write_text("mine\n")
        return run, run, [], runner.REPO, {}, INSIDE[case]
    assert case == "a file"
    (tmp / "afile").write_text("data\n")
    return tmp, tmp / "afile", [], runner.REPO, {}, "is a file"


# A user's file inside a run's own folders, or a backup named like one of ours: never deleted.
INSIDE = {"user file in eval/": "eval/my_analysis.ipynb", "user file in checkpoints/": "checkpoints/NOTES.txt",
          "user file in a checkpoint": "checkpoints/step_0000002/notes.txt", "a manual backup": ".summary.json.orig"}
REFUSALS = ["project checkout", "current folder", "parent of the current folder", "home folder",
            "folder without the marker", "run folder with a user file", "symlink to a run folder", "a file",
            *INSIDE]


@pytest.mark.parametrize("case", REFUSALS)
def test_overwrite_refuses_what_training_did_not_create(tmp_path, finished, case):
    keep, output_dir, extra, cwd, env, reason = refusal_case(case, tmp_path / "case", finished)
    before = snapshot(keep)
    proc = train(tmp_path, output_dir, "--overwrite", *extra, cwd=cwd, env=env)
    line = error_line(proc)
    assert reason in line and "output_dir" in line, line
    assert snapshot(keep) == before


def test_an_empty_folder_needs_no_overwrite_and_gets_the_marker(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = train(tmp_path, tmp_path / "empty")
    assert proc.returncode == 0, proc.stderr[-3000:]
    marker = json.loads((tmp_path / "empty" / runs.MARKER).read_text())
    assert marker["version"] == runs.MARKER_VERSION and marker["created"]
    assert not (tmp_path / "empty" / runs.LOCK).exists()


# ---------------------------------------------------------------- the old run goes only when the new one starts


def test_a_failed_check_leaves_the_old_run_whole_and_a_good_overwrite_replaces_it(tmp_path, finished):
    run = copy_run(finished, tmp_path)
    before = snapshot(run)
    (tmp_path / "val.csv").write_text("text,label\nwin a prize,spam\nsee you,ham\n")
    typo = train(tmp_path, run, "--overwrite", f"data.train_file={tmp_path / 'trian.csv'}",
                 f"data.val_file={tmp_path / 'val.csv'}", f"data.test_file={tmp_path / 'val.csv'}")
    assert "trian.csv" in error_line(typo)
    assert snapshot(run) == before

    again = train(tmp_path, run, "--overwrite", "seed=7")
    assert again.returncode == 0, again.stderr[-3000:]
    names = {p.name for p in run.iterdir()}
    assert "samples" not in names  # the old run's sample log went with it
    assert not [n for n in names if n.startswith(runs.OURS_PREFIX) and n != runs.MARKER], names
    assert yaml.safe_load((run / "config.yaml").read_text())["seed"] == 7
    assert json.loads((run / "summary.json").read_text())["global_step"] == 2


# ---------------------------------------------------------------- a failed start does not block the rerun


def test_a_data_error_leaves_no_folder_and_the_corrected_rerun_needs_no_overwrite(tmp_path):
    (tmp_path / "mine.csv").write_text("text,label\n" + "".join(
        f"message {i} {'win a prize' if i % 2 else 'see you'},{'spam' if i % 2 else 'ham'}\n" for i in range(60)))
    bad = train(tmp_path, tmp_path / "run", f"data.train_file={tmp_path / 'mien.csv'}")
    assert "mien.csv" in error_line(bad) and not (tmp_path / "run").exists()
    good = train(tmp_path, tmp_path / "run", f"data.train_file={tmp_path / 'mine.csv'}")
    assert good.returncode == 0, good.stderr[-3000:]
    assert (tmp_path / "run" / "data_split.json").is_file() and (tmp_path / "run" / "summary.json").is_file()


def test_a_run_stopped_before_its_first_checkpoint_does_not_block_the_rerun(tmp_path):
    nan = {"DIST_FINETUNE_FAULTS": "nan_loss@step=1"}  # an error found after the run started
    stopped = train(tmp_path, tmp_path / "run", "train.on_nonfinite=stop", env=nan)
    assert stopped.returncode == 3 and "non-finite loss at step 1" in stopped.stderr, stopped.stderr[-3000:]
    left = {p.name for p in (tmp_path / "run").iterdir()}
    assert "config.yaml" in left and "checkpoints" not in left, left
    (tmp_path / "run" / "notes.txt").write_text("mine\n")  # a user's file: never taken without a word
    assert "notes.txt" in error_line(train(tmp_path, tmp_path / "run"))
    (tmp_path / "run" / "notes.txt").unlink()
    rerun = train(tmp_path, tmp_path / "run", "seed=7")  # the corrected config; no --overwrite
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "stopped before its first checkpoint" in rerun.stderr
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["seed"] == 7
    assert not [n for n in os.listdir(tmp_path / "run") if n.startswith(runs.OURS_PREFIX) and n != runs.MARKER]
    line = error_line(train(tmp_path, tmp_path / "run", "seed=8"))  # a run with checkpoints still needs it
    assert "already exists" in line and "--overwrite" in line


# ---------------------------------------------------------------- resume=auto deletes nothing


def test_resume_auto_with_only_damaged_checkpoints_stops_and_keeps_everything(tmp_path, finished):
    run = copy_run(finished, tmp_path)
    (run / "checkpoints" / "step_0000001" / "manifest.json").unlink()
    shard = run / "checkpoints" / "step_0000002" / "mp_rank_00_model_states.pt"
    shard.write_bytes(shard.read_bytes()[:1000])
    before = snapshot(run)
    line = error_line(train(tmp_path, run, "resume=auto"))
    assert "step_0000001 (no manifest.json" in line and "step_0000002 (mp_rank_00_model_states.pt has" in line
    assert "--overwrite" in line and "resume=PATH" in line
    assert snapshot(run) == before
    assert (run / "export" / "model.safetensors").is_file() and (run / "summary.json").is_file()


# ---------------------------------------------------------------- sweep names are plain folder names


@pytest.mark.parametrize("name", [".", "..", "a/b", "a\\b", "", "-x", "--overwrite", "..\\..", "x.log",
                                  "comparison.md", "a\n"])
def test_sweep_names_must_be_plain_folder_names(name):
    with pytest.raises(GridError):
        parse_grid({name: []})
    with pytest.raises(GridError):
        parse_grid([{"name": name, "overrides": []}])


def test_sweep_setting_named_dotdot_runs_nothing_and_deletes_nothing(tmp_path):
    (tmp_path / "victim.txt").write_text("a sibling of --out\n")
    base = runner.write_config(tmp_path / "base.yaml", BASE)
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump([{"name": "ok"}, {"name": ".."}]))
    before = snapshot(tmp_path)
    proc = cli("sweep", ["--base", str(base), "--grid", str(tmp_path / "grid.yaml"), "--out",
                         str(tmp_path / "out"), "--overwrite"])
    assert proc.returncode == 2 and "'..'" in proc.stderr, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert snapshot(tmp_path) == before  # no out/, no run, the sibling intact


# ---------------------------------------------------------------- one run per folder


def wait_for(condition, proc: subprocess.Popen, seconds: float = 240) -> None:
    deadline = time.time() + seconds
    while not condition():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "the run did not get there in time"
        time.sleep(0.1)


def test_a_folder_in_use_is_refused_and_a_killed_runs_lock_does_not_block(tmp_path):
    config = runner.write_config(tmp_path / "base.yaml", BASE)
    run = tmp_path / "run"
    env = {**runner.child_env(), "DIST_FINETUNE_FAULTS": "sleep@step=1,seconds=600"}  # stalls before step 1
    holder = subprocess.Popen([sys.executable, "-m", "dist_finetune.train", "--config", str(config),
                               f"output_dir={run}"], cwd=runner.REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for(lambda: (run / "config.yaml").is_file() and (run / runs.LOCK).is_file(), holder)
        named = f"pid {holder.pid}"
        for flags in (["--overwrite"], ["resume=auto"], []):
            line = error_line(train(tmp_path, run, *flags))
            assert "in use" in line and named in line and socket.gethostname() in line, (flags, line)
        line = error_line(cli("evaluate", ["--run", str(run)]))
        assert "in use" in line and named in line, line
        line = error_line(cli("export", ["--run", str(run), "--out", str(tmp_path / "exported")]))
        assert "in use" in line and named in line, line
        assert holder.poll() is None  # untouched by all of that
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.communicate(timeout=60)
    assert (run / runs.LOCK).is_file()  # left behind by the killed run
    # It stopped before its first checkpoint: resume=auto starts it again in its own folder.
    again = train(tmp_path, run, "resume=auto")
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((run / "summary.json").read_text())["global_step"] == 2
    assert not (run / runs.LOCK).exists()


# ---------------------------------------------------------------- the lock's rules, in-process


def write_lock(folder: Path, age: float, **record) -> Path:
    lock = folder / runs.LOCK
    lock.write_text(json.dumps({"started": time.time() - age, **record}))
    os.utime(lock, (time.time() - age, time.time() - age))
    return lock


def test_lock_from_another_host_is_stale_only_after_its_heartbeat_stops(tmp_path):
    write_lock(tmp_path, 10, host="node-elsewhere", pid=4242)
    with pytest.raises(runs.RunError, match=r"in use by another dist_finetune process \(host node-elsewhere, pid 4242"):
        runs.check_not_in_use(tmp_path)
    write_lock(tmp_path, runs.STALE_SECONDS + 60, host="node-elsewhere", pid=4242)
    runs.check_not_in_use(tmp_path)
    held = runs.RunLock.acquire(tmp_path)  # breaks the stale lock
    try:
        assert json.loads((tmp_path / runs.LOCK).read_text())["pid"] == os.getpid()
    finally:
        held.release()
    assert not (tmp_path / runs.LOCK).exists()


def test_lock_of_a_dead_process_on_this_host_or_an_earlier_restart_is_stale(tmp_path, monkeypatch):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_lock(tmp_path, 1, host=socket.gethostname(), pid=dead.pid)
    runs.check_not_in_use(tmp_path)
    write_lock(tmp_path, 1, host=socket.gethostname(), pid=os.getpid())
    with pytest.raises(runs.RunError, match=f"pid {os.getpid()}"):
        runs.check_not_in_use(tmp_path)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job7")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    launch = {"torchelastic_run_id": "job7", "torchelastic_restart": 0}
    write_lock(tmp_path, 1, host="node-elsewhere", pid=1, launch=launch)
    runs.check_not_in_use(tmp_path)  # the same launch before its restart: gone
    write_lock(tmp_path, 1, host="node-elsewhere", pid=1, launch={**launch, "torchelastic_restart": 1})
    runs.check_not_in_use(tmp_path)  # rank 0 of this very launch holds it (evaluate under torchrun): ours
    with pytest.raises(runs.RunError):
        runs.RunLock.acquire(tmp_path)  # but nobody takes it from a live holder


def test_lock_is_exclusive_refreshed_and_released(tmp_path, monkeypatch):
    monkeypatch.setattr(runs, "HEARTBEAT_SECONDS", 0.05)
    held = runs.RunLock.acquire(tmp_path)
    try:
        with pytest.raises(runs.RunError, match="in use"):
            runs.RunLock.acquire(tmp_path)
        os.utime(held.path, (time.time() - 1000, time.time() - 1000))
        time.sleep(0.5)
        assert time.time() - held.path.stat().st_mtime < 100  # the heartbeat touched it
    finally:
        held.release()
        held.release()  # idempotent
    assert not held.path.exists()


def test_what_counts_as_a_run_file():
    for name in ("config.yaml", "data_split.json", "checkpoints", "summary.json.tmp", ".summary.json.x1y2.tmp", ".export.old.abc",
                 runs.MARKER, runs.LOCK, f"{runs.LOCK}.stale.abc", ".dist_finetune_old.xyz", "eval"):
        assert runs.is_run_file(name), name
    for name in ("notes.txt", "config.yaml.bak", ".git", "data", "summary.json.mine"):
        assert not runs.is_run_file(name), name


def test_a_commit_killed_after_moving_the_old_run_aside_leaves_a_folder_overwrite_takes(tmp_path, finished):
    """The marker never leaves the folder: an old run moved aside by a killed commit is ours to replace."""
    run = copy_run(finished, tmp_path)
    aside = run / ".dist_finetune_old.k1ll3d"
    aside.mkdir()
    for name in ("summary.json", "checkpoints", "export"):
        (run / name).rename(aside / name)
    (run / "..dist_finetune_run.x7.tmp").write_text("{")  # a marker write cut short
    assert runs.foreign_files(run, sorted(p.name for p in run.iterdir())) == []
    proc = train(tmp_path, run, "--overwrite")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not aside.exists() and (run / runs.MARKER).is_file() and (run / "summary.json").is_file()


def test_a_folder_being_read_by_evaluate_or_export_cannot_be_replaced(tmp_path, finished):
    run = copy_run(finished, tmp_path)
    with runs.reading_run(run):
        with pytest.raises(runs.RunError, match=f"pid {os.getpid()}"):
            runs.RunLock.acquire(run)  # what a training run on this folder would try first
        proc = train(tmp_path, run, "--overwrite", "seed=7")
        assert f"pid {os.getpid()}" in error_line(proc)
    assert not (run / runs.LOCK).exists()


def test_evaluate_refuses_a_checkpoint_with_nonfinite_weights(tmp_path, finished):
    """Before: evaluate reported `loss: nan` with exit 0 for such a checkpoint."""
    import torch

    from dist_finetune.checkpoint import read_pointer, write_manifest
    from dist_finetune.safe_load import torch_load

    run = copy_run(finished, tmp_path)
    folder = run / "checkpoints" / read_pointer(run, "best")
    states = torch_load(folder / "mp_rank_00_model_states.pt")
    name = next(k for k, v in states["module"].items() if v.is_floating_point())
    states["module"][name].view(-1)[0] = float("nan")
    torch.save(states, folder / "mp_rank_00_model_states.pt")
    write_manifest(folder)
    line = error_line(cli("evaluate", ["--run", str(run)]))
    assert "non-finite weights" in line and str(folder) in line


def test_overwrite_takes_a_zero_run_with_deepspeeds_recovery_scripts(tmp_path):
    """DeepSpeed writes checkpoints/zero_to_fp32.py (and, in newer releases, zero_to_torch.py) beside
    ZeRO 1-3 checkpoints: they are run files."""
    first = train(tmp_path, tmp_path / "run", "zero.stage=2")
    assert first.returncode == 0, first.stderr[-3000:]
    again = train(tmp_path, tmp_path / "run", "--overwrite", "zero.stage=2")
    assert again.returncode == 0, again.stderr[-3000:]
