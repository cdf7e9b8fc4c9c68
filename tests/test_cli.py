"""The `dist-finetune` dispatcher and the one runner every command shares."""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

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


def test_device_choice():
    assert cli.pick_device("cpu").type == "cpu"
    if not __import__("torch").cuda.is_available():
        with pytest.raises(UserError, match="--device cuda: no CUDA device"):
            cli.pick_device("cuda")
