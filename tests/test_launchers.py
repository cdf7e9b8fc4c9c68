"""Every launcher for real: two torchrun agents, mpiexec, SLURM (both styles), preemption with and
without SLURM. Everything listens on 127.0.0.1; every process or job started here is cleaned up."""
from __future__ import annotations

import os
import re
import shlex
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


NEVER_SCHEDULED = ("PartitionConfig", "BadConstraints", "PartitionNodeLimit", "PartitionTimeLimit")


class Slurm:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.jobs: list[str] = []

    def submit(self, *sbatch_args: str, overrides: list[str], wait: bool,
               config: str = "configs/quickstart.yaml") -> tuple[str, subprocess.CompletedProcess]:
        return self.submit_line(["sbatch", "--gpus-per-node=0", *sbatch_args, "slurm/finetune.sh", config],
                                overrides=overrides, wait=wait)

    def submit_line(self, line: list[str], overrides: list[str], wait: bool,
                    env: dict[str, str] | None = None) -> tuple[str, subprocess.CompletedProcess]:
        """Submit `sbatch OPTIONS SCRIPT CONFIG` as given, from the repository; only the test's own
        options (where the log goes, wait, print the job id) go after `sbatch`, and overrides at the end."""
        assert line[0] == "sbatch", line
        cmd = ["sbatch", "--parsable", f"--chdir={runner.REPO}", f"--output={self.tmp}/slurm-%j.out",
               *(["--wait"] if wait else []), *line[1:], *overrides]
        proc = subprocess.run(cmd, cwd=runner.REPO, env=env or runner.child_env(), capture_output=True, text=True,
                              timeout=600)
        job = proc.stdout.strip().splitlines()[0].split(";")[0] if proc.stdout.strip() else ""
        if job:
            self.jobs.append(job)
        return job, proc

    def state(self, job: str) -> str:
        return self.state_and_reason(job)[0]

    def state_and_reason(self, job: str) -> tuple[str, str]:
        out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, timeout=30).stdout
        state, reason = re.search(r"JobState=(\w+)", out), re.search(r"Reason=(\w+)", out)
        return (state.group(1) if state else "UNKNOWN"), (reason.group(1) if reason else "")

    def wait_until_done(self, job: str, timeout: float = 300) -> str:
        """The job's final state; a job pending for a reason that never clears fails at once."""
        deadline = time.time() + timeout
        while True:
            state, reason = self.state_and_reason(job)
            if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
                return state
            assert reason not in NEVER_SCHEDULED, f"job {job} pends for good (reason {reason}): it asks for more than a node has"
            assert time.time() < deadline, f"job {job} still {state} ({reason}) after {timeout} s\n{self.log(job)}"
            time.sleep(1)

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


README_CPU_MARKER = "<!-- slurm-cpu-line"  # README.md: the next `sbatch` line is the CPU-node command


def readme_cpu_line() -> list[str] | None:
    """The README's SLURM command for CPU nodes, as written (without a leading `mkdir -p logs &&`)."""
    text = (runner.REPO / "README.md").read_text(encoding="utf-8")
    if README_CPU_MARKER not in text:
        return None
    after = text.split(README_CPU_MARKER, 1)[1].split("\n", 1)[1]  # the lines after the marker's
    line = next(ln for ln in after.splitlines() if "sbatch " in ln)
    words = shlex.split(line, comments=True)
    return words[words.index("sbatch"):]


@needs_slurm
def test_the_readmes_cpu_node_line_runs_on_a_two_cpu_node(slurm, tmp_path):
    """The line a user copies from the README (the torchrun style: one task running 2 gloo ranks) gets
    scheduled on this 2-CPU node and finishes; its ranks share the task's CPUs."""
    line = readme_cpu_line()
    if line is None:
        pytest.skip(f"README.md has no {README_CPU_MARKER} ...--> marker before the SLURM CPU-node command yet")
    run_dir = tmp_path / "run"
    env = runner.child_env()
    env.pop("OMP_NUM_THREADS")  # as in a user's shell: the script picks the threads per rank
    job, proc = slurm.submit_line(line, overrides=[*tiny(run_dir), "train.max_steps=5"], wait=False, env=env)
    assert proc.returncode == 0 and job, " ".join(line) + "\n" + proc.stderr
    assert slurm.wait_until_done(job) == "COMPLETED", " ".join(line) + "\n" + slurm.log(job)[-4000:]
    summary = runner.Run(run_dir, None).summary()
    assert summary["world_size"] == 2 and summary["global_step"] == 5
    assert "gpus/node=0 tasks/node=1 threads/rank=1" in slurm.log(job), slurm.log(job)


@needs_slurm
def test_sbatch_srun_style_one_task_per_rank(slurm, tmp_path):
    run_dir = tmp_path / "run"
    job, proc = slurm.submit("--ntasks-per-node=2", "--cpus-per-task=1",
                             overrides=[*tiny(run_dir), "train.max_steps=5"], wait=True)
    assert proc.returncode == 0, proc.stderr + slurm.log(job)
    summary = runner.Run(run_dir, None).summary()
    assert summary["world_size"] == 2 and summary["global_step"] == 5
    assert "tasks/node=2 threads/rank=1" in slurm.log(job)


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
