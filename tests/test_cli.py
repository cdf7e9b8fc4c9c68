"""The `dist-finetune` dispatcher and the one runner every command shares."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest
from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

import runner
from dist_finetune import cli
from dist_finetune.errors import UserError


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dist_finetune.cli", *args], cwd=runner.REPO,
                          env=runner.child_env(), capture_output=True, text=True, timeout=120)


def test_the_dispatcher_lists_every_command_and_runs_them(tmp_path):
    listing = run("--help")
    assert listing.returncode == 0
    for name in ("train", "evaluate", "predict", "export", "generate", "zeroshot", "sweep"):
        assert f"  {name}" in listing.stdout
    assert run().returncode == 2
    unknown = run("tran")
    assert unknown.returncode == 2 and "unknown command 'tran'" in unknown.stderr
    config = runner.write_config(tmp_path / "c.yaml")
    via_cli = run("train", "--config", str(config), "seed=7", "--print-config")
    direct = subprocess.run([sys.executable, "-m", "dist_finetune.train", "--print-config", "--config", str(config),
                             "seed=7"], cwd=runner.REPO, env=runner.child_env(), capture_output=True, text=True)
    assert via_cli.returncode == 0 and via_cli.stdout == direct.stdout and "seed: 7" in direct.stdout


@pytest.mark.skipif(shutil.which("dist-finetune") is None, reason="the console script is not installed")
def test_the_console_script_is_the_dispatcher():
    proc = subprocess.run(["dist-finetune", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "zeroshot" in proc.stdout


def test_a_user_error_is_one_line_and_its_exit_code(capsys):
    class Broken(UserError):
        exit_code = 3

    def body() -> int:
        raise Broken("data.csv, row 4: the label is empty; fill it in")

    assert cli.run_command(body) == 3
    assert capsys.readouterr().err == "error: data.csv, row 4: the label is empty; fill it in\n"


def test_anything_else_keeps_its_traceback():
    def body() -> int:
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        cli.run_command(body)


def test_a_reader_that_stops_early_is_no_traceback():
    """`evaluate ... | head -2`: the reader closes the pipe while the command still prints; the command ends
    quietly with 141 (128 + SIGPIPE, as a shell tool killed by the closed pipe), not with a traceback."""
    code = ("from dist_finetune.cli import run_command; from dist_finetune.distributed import leave; "
            "leave(run_command(lambda: [print('line', i) for i in range(100_000)] and 0))")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=runner.REPO, env=runner.child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline() == b"line 0\n"
    proc.stdout.close()
    err = proc.communicate(timeout=120)[1].decode()
    assert proc.returncode == 141 and "Traceback" not in err and "BrokenPipe" not in err, err


def test_under_torchrun_the_error_line_is_the_workers_recorded_failure(tmp_path, monkeypatch, capsys):
    """The error file holds our line where torch's own reader (the agent's ProcessFailure) looks for
    the traceback; a bug records its traceback there through torch's ErrorHandler."""
    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))

    def user_error() -> int:
        raise UserError("data.csv, row 4: the label is empty; fill it in")

    assert cli.run_command(user_error) == 2
    line = "error: data.csv, row 4: the label is empty; fill it in"
    assert capsys.readouterr().err == line + "\n"
    failure = ProcessFailure(local_rank=0, pid=1, exitcode=2, error_file=str(error_file))
    assert failure.message["extraInfo"]["py_callstack"] == line and failure.timestamp > 0

    def bug() -> int:
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        cli.run_command(bug)
    recorded = json.loads(error_file.read_text())["message"]
    assert "Traceback" in recorded["extraInfo"]["py_callstack"] and "KeyError" in recorded["message"]


@pytest.mark.slow
def test_torchrun_shows_a_ranks_user_error_as_the_root_cause_at_the_end(tmp_path):
    config = runner.write_config(tmp_path / "c.yaml", {
        **runner.TINY, "data": {**runner.TINY["data"], "train_file": str(tmp_path / "missing.csv"),
                                "val_file": str(tmp_path / "missing.csv"), "test_file": str(tmp_path / "missing.csv")}})
    proc = runner.run_to_end(runner.command(2, config, [f"output_dir={tmp_path / 'run'}"]), runner.child_env(),
                             timeout=300)
    console = proc.stdout + proc.stderr
    assert proc.returncode != 0, console
    message = f"{tmp_path / 'missing.csv'}: file not found (set by data.train_file)"
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert any(message in ln for ln in lines[-3:]), "\n".join(lines[-15:])
    root_cause = proc.stderr.split("Root Cause")[-1]
    assert "exitcode  : 2" in root_cause and re.search(r"traceback : error \(rank [01]\): " + re.escape(message),
                                                       root_cause), root_cause
    assert "To enable traceback" not in proc.stderr, proc.stderr[-3000:]


def test_device_choice():
    assert cli.pick_device("cpu").type == "cpu"
    if not __import__("torch").cuda.is_available():
        with pytest.raises(UserError, match="--device cuda: no CUDA device"):
            cli.pick_device("cuda")
