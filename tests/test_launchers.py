"""Every launcher for real: two torchrun agents, mpiexec, SLURM (both styles), preemption with and
without SLURM. Everything listens on 127.0.0.1; every process or job started here is cleaned up."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

import runner
from dist_finetune.checkpoint import read_pointer

pytestmark = pytest.mark.slow
LONG = ["train.max_steps=40", "eval.every_steps=10", "early_stopping.patience=100"]


def kill_tree(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        runner.kill_tree(proc.pid)


def wait_for_steps(run_dir: Path, steps: int, proc_alive, timeout: float = 300) -> None:
    """Until the run has logged `steps` optimizer steps (log_every_steps=1)."""
    deadline = time.time() + timeout
    path = run_dir / "metrics.jsonl"
    while time.time() < deadline:
        assert proc_alive(), "the run ended before it could be signalled"
        if path.exists() and path.read_text().count('"event": "train"') >= steps:
            return
        time.sleep(0.1)
    raise AssertionError(f"{run_dir} did not reach step {steps} in {timeout} s")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> runner.Run:
    """The uninterrupted 2-rank run every preempted run must reproduce."""
    tmp = tmp_path_factory.mktemp("reference")
    run = runner.train(tmp, "full", nproc=2, overrides=LONG)
    assert run.ok, run.output()
    return run


def test_two_torchrun_agents_form_one_four_rank_job(tmp_path):
    config = runner.write_config(tmp_path / "c.yaml")
    port = runner.free_port()
    script = runner.REPO / "launch" / "torchrun_multi_node.sh"
    agents = []
    try:
        for node_rank in (0, 1):
            env = {**runner.child_env(), "NNODES": "2", "NODE_RANK": str(node_rank), "NPROC": "2",
                   "MASTER_PORT": str(port), "RDZV_ID": f"test-{port}"}
            agents.append(subprocess.Popen(
                ["bash", str(script), str(config), f"output_dir={tmp_path / 'run'}", "train.max_steps=3"],
                cwd=runner.REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        outputs = [a.communicate(timeout=300)[0] for a in agents]
    finally:
        for a in agents:
            kill_tree(a)
    assert [a.returncode for a in agents] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    summary = runner.Run(tmp_path / "run", None).summary()
    assert summary["world_size"] == 4 and summary["global_step"] == 3


@pytest.mark.skipif(shutil.which("mpiexec") is None, reason="no mpiexec (pip install mpich)")
def test_mpiexec_two_ranks(tmp_path):
    config = runner.write_config(tmp_path / "c.yaml")
    env = {**runner.child_env(), "NP": "2"}
    env.pop("MASTER_ADDR")  # rank 0 chooses the address and port and sends them over MPI
    proc = runner.run_to_end(["bash", str(runner.REPO / "launch" / "mpirun.sh"), str(config),
                              f"output_dir={tmp_path / 'run'}", "train.max_steps=3"], env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = runner.Run(tmp_path / "run", None).summary()
    assert summary["world_size"] == 2 and summary["global_step"] == 3


def test_sigusr1_to_a_torchrun_job_saves_and_rerun_resumes(tmp_path, reference):
    config = runner.write_config(tmp_path / "c.yaml")
    run_dir = tmp_path / "run"
    cmd = ["bash", str(runner.REPO / "launch" / "torchrun_single_node.sh"), str(config),
           f"output_dir={run_dir}", *LONG]
    env = {**runner.child_env(), "NPROC": "2"}
    proc = subprocess.Popen(cmd, cwd=runner.REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        wait_for_steps(run_dir, 8, lambda: proc.poll() is None)
        # As a scheduler does: the signal reaches every process of the job, and again during the save.
        for _ in range(5):
            for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
                try:
                    p.send_signal(signal.SIGUSR1)
                except psutil.NoSuchProcess:
                    pass
            time.sleep(0.05)
        out = proc.communicate(timeout=120)[0]
    finally:
        kill_tree(proc)
    assert proc.returncode == 0, out[-4000:]
    match = re.search(r"preempted \(signal 10\) at step (\d+)", out)
    assert match, out[-4000:]
    step = int(match.group(1))
    assert 8 <= step < 40 and read_pointer(run_dir, "latest") == f"step_{step:07d}"
    assert not (run_dir / "summary.json").exists()

    rerun = runner.run_to_end([*cmd, "resume=auto"], env, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert f"resumed from step_{step:07d}" in rerun.stdout
    runner.assert_same_weights(runner.latest_weights(run_dir), runner.latest_weights(reference.dir))
    assert runner.Run(run_dir, None).summary()["test"] == reference.summary()["test"]


# ---------------------------------------------------------------- SLURM


def slurm_ready() -> bool:
    if shutil.which("sbatch") is None:
        return False
    return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=30).returncode == 0


needs_slurm = pytest.mark.skipif(not slurm_ready() and not os.environ.get("CI"),
                                 reason="no SLURM cluster here (CI starts one with .ci/slurm-up.sh)")


class Slurm:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.jobs: list[str] = []

    def submit(self, *sbatch_args: str, overrides: list[str], wait: bool,
               config: str = "configs/quickstart.yaml") -> tuple[str, subprocess.CompletedProcess]:
        cmd = ["sbatch", "--parsable", f"--chdir={runner.REPO}", f"--output={self.tmp}/slurm-%j.out",
               "--gpus-per-node=0", *(["--wait"] if wait else []), *sbatch_args,
               str(runner.REPO / "slurm" / "finetune.sh"), config, *overrides]
        proc = subprocess.run(cmd, env=runner.child_env(), capture_output=True, text=True, timeout=600)
        job = proc.stdout.strip().splitlines()[0].split(";")[0] if proc.stdout.strip() else ""
        if job:
            self.jobs.append(job)
        return job, proc

    def state(self, job: str) -> str:
        out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, timeout=30).stdout
        match = re.search(r"JobState=(\w+)", out)
        return match.group(1) if match else "UNKNOWN"

    def node_idle(self) -> bool:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30).stdout
        return out.split() == ["idle"]

    def log(self, job: str) -> str:
        path = self.tmp / f"slurm-{job}.out"
        return path.read_text(errors="replace") if path.exists() else ""

    def cancel_all(self) -> None:
        for job in self.jobs:
            subprocess.run(["scancel", job], capture_output=True, timeout=30)


@pytest.fixture
def slurm(tmp_path):
    cluster = Slurm(tmp_path)
    yield cluster
    cluster.cancel_all()


def tiny(run_dir: Path) -> list[str]:
    """Shrink the quickstart to the tiny test model (the sbatch line passes overrides through)."""
    m = runner.TINY["model"]
    return [f"output_dir={run_dir}", "model.n_layer=2", f"model.n_embd={m['n_embd']}", f"model.n_head={m['n_head']}",
            "data.max_length=64", "data.padding=fixed", "model.pooling=last_token", "train.micro_batch_size=8",
            "train.lr=1e-3", "train.warmup_steps=0", "train.schedule=constant", "train.epochs=1",
            "train.log_every_steps=1", "report.plots=false"]


@needs_slurm
@pytest.mark.parametrize("style", ["torchrun", "srun"])
def test_sbatch_runs_the_quickstart(slurm, tmp_path, style):
    run_dir = tmp_path / "run"
    tasks = ["--ntasks-per-node=1", "--cpus-per-task=2"] if style == "torchrun" else \
        ["--ntasks-per-node=2", "--cpus-per-task=1"]
    job, proc = slurm.submit(*tasks, overrides=[*tiny(run_dir), "train.max_steps=5"], wait=True)
    assert proc.returncode == 0, proc.stderr + slurm.log(job)
    summary = runner.Run(run_dir, None).summary()
    assert summary["world_size"] == 2 and summary["global_step"] == 5
    log = slurm.log(job)
    assert f"tasks/node={1 if style == 'torchrun' else 2}" in log


@needs_slurm
def test_sbatch_job_preempted_requeues_resumes_and_matches(slurm, tmp_path, reference):
    run_dir = tmp_path / "run"
    config = runner.write_config(tmp_path / "c.yaml")  # the reference run's config
    job, proc = slurm.submit("--ntasks-per-node=1", "--cpus-per-task=2", config=str(config),
                             overrides=[f"output_dir={run_dir}", *LONG], wait=False)
    assert proc.returncode == 0 and job, proc.stderr
    deadline = time.time() + 300
    while slurm.state(job) != "RUNNING":
        assert time.time() < deadline, slurm.log(job)
        time.sleep(0.5)
    wait_for_steps(run_dir, 8, lambda: slurm.state(job) == "RUNNING")
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, timeout=30)
    deadline = time.time() + 300
    while "requeueing job" not in slurm.log(job):
        assert time.time() < deadline, slurm.log(job)
        time.sleep(0.5)
    # The requeued job waits for its begin time; start it at once, but only after the node has
    # finished cleaning up the first run (slurmd refuses to launch a job it is still killing).
    while not (slurm.state(job) == "PENDING" and slurm.node_idle()):
        assert time.time() < deadline, slurm.log(job)
        time.sleep(0.5)
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True, timeout=30)
    while slurm.state(job) not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
        assert time.time() < deadline, slurm.log(job)
        time.sleep(1)
    log = slurm.log(job)
    assert slurm.state(job) == "COMPLETED", log[-4000:]
    assert "restart 1:" in log and re.search(r"resumed from step_\d+", log), log[-4000:]
    preempted_at = int(re.search(r"preempted \(signal 10\) at step (\d+)", log).group(1))
    assert 8 <= preempted_at < 40
    summary = runner.Run(run_dir, None).summary()
    assert summary["global_step"] == 40 and summary["world_size"] == 2
    runner.assert_same_weights(runner.latest_weights(run_dir), runner.latest_weights(reference.dir))
    assert summary["test"] == reference.summary()["test"]
