"""Start real training processes for the tests: one plain process, or torchrun with N ranks."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
NETGUARD = Path(__file__).resolve().parent / "netguard"

# A tiny GPT-2 on the bundled SMS split: fast enough for many runs on two cores.
TINY: dict[str, Any] = {
    "seed": 123,
    "precision": "fp32",
    "model": {"name": "custom", "n_layer": 2, "n_head": 4, "n_embd": 64, "context_length": 128,
              "weights": "none", "pooling": "last_token", "trainable": "all"},
    "data": {"padding": "fixed", "max_length": 64},
    "train": {"epochs": 1, "micro_batch_size": 8, "lr": 1e-3, "warmup_steps": 0, "log_every_steps": 1},
    "report": {"plots": False},
}


@dataclass
class Run:
    dir: Path
    proc: subprocess.CompletedProcess

    @property
    def ok(self) -> bool:
        return self.proc.returncode == 0

    def summary(self) -> dict[str, Any]:
        return json.loads((self.dir / "summary.json").read_text())

    def events(self, kind: str) -> list[dict[str, Any]]:
        lines = (self.dir / "metrics.jsonl").read_text().splitlines()
        return [e for e in map(json.loads, lines) if e["event"] == kind]

    def output(self) -> str:
        return f"--- stdout\n{self.proc.stdout[-4000:]}\n--- stderr\n{self.proc.stderr[-6000:]}"


def tiny_export(folder: Path, seed: int = 0) -> Path:
    """A random quickstart-shaped ham/spam classifier exported to `folder` (serving and predict tests)."""
    import torch

    from dist_finetune.model import GPTClassifier, GPTConfig
    from dist_finetune.weights import save_export

    torch.manual_seed(seed)
    model = GPTClassifier(GPTConfig(n_layer=2, n_head=4, n_embd=64, context_length=128), 2, "last_token")
    save_export(model, folder, "last_token", ["ham", "spam"], max_length=32, padding="longest")
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_csv(path: Path, header: tuple[str, ...], rows: list[tuple]) -> Path:
    import csv

    with path.open("w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    return path


def split_files(tmp: Path, write, sizes: tuple[int, int, int]) -> dict[str, Path]:
    """train / val / test files of `sizes` rows, each written by write(path, rows, seed) with its own seed."""
    files = {}
    for seed, (split, rows) in enumerate(zip(("train", "val", "test"), sizes), 1):
        files[split] = tmp / f"{split}.csv"
        write(files[split], rows, seed)
    return files


def split_overrides(data: dict[str, Path]) -> list[str]:
    return [f"data.{split}_file={data[split]}" for split in ("train", "val", "test")]


def write_config(path: Path, base: dict[str, Any] | None = None) -> Path:
    path.write_text(yaml.safe_dump(base or TINY))
    return path


def child_env(netguard_log: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(NETGUARD), str(REPO), env.get("PYTHONPATH", "")])
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               MASTER_ADDR="127.0.0.1", PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(key, None)
    if netguard_log is not None:
        env["NETGUARD_LOG"] = str(netguard_log)
    return env


def launcher(nproc: int) -> list[str]:
    """A plain Python process, or torchrun with `nproc` ranks on 127.0.0.1 and a free port."""
    if nproc == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={nproc}",
            "--master_addr=127.0.0.1", f"--master_port={free_port()}"]


def command(nproc: int, config: Path, overrides: list[str]) -> list[str]:
    return [*launcher(nproc), "-m", "dist_finetune.train", "--config", str(config), *overrides]


def train(tmp: Path, name: str, overrides: list[str] = (), nproc: int = 1, base: dict | None = None,
          timeout: float = 300, netguard_log: Path | None = None, env: dict[str, str] | None = None) -> Run:
    """Run a whole training to the end; a run that hangs fails the test at `timeout`."""
    run_dir = tmp / name
    config = write_config(tmp / f"{name}.yaml", base)
    cmd = command(nproc, config, [f"output_dir={run_dir}", *overrides])
    return Run(run_dir, run_to_end(cmd, {**child_env(netguard_log), **(env or {})}, timeout))


def run_to_end(cmd: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """subprocess.run, but a timeout kills the whole process tree (torchrun's workers run in their
    own sessions and would outlive their agent) before failing the test."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, err = proc.communicate()
        raise AssertionError(f"{' '.join(cmd)} did not finish in {timeout} s\n{out[-3000:]}\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def kill_tree(pid: int) -> None:
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


def start(tmp: Path, name: str, overrides: list[str] = (), nproc: int = 1,
          base: dict | None = None) -> tuple[Path, subprocess.Popen]:
    run_dir = tmp / name
    config = write_config(tmp / f"{name}.yaml", base)
    cmd = command(nproc, config, [f"output_dir={run_dir}", *overrides])
    proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    return run_dir, proc


def latest_weights(run_dir: Path) -> dict:
    """The fp32 weights of a run's latest checkpoint, read from its files."""
    from dist_finetune.checkpoint import consolidated_state_dict, read_pointer

    return consolidated_state_dict(run_dir, read_pointer(run_dir, "latest"))


def assert_same_weights(a: dict, b: dict, atol: float = 0.0, fp32: bool = False) -> None:
    """The same tensor names, equal to `atol` (0: bit for bit); `fp32`: every tensor of `a` is float32."""
    import torch

    assert a.keys() == b.keys()
    for name in a:
        if fp32:
            assert a[name].dtype == torch.float32, name
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=lambda m: f"{name}: {m}")
