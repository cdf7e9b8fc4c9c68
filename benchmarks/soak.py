"""Soak run: a 2-rank quickstart-size job for many short epochs with frequent checkpoints and pruning,
sampling the ranks' memory, open files and the run folder's size as it goes.

    python benchmarks/soak.py [--epochs 8] [--nproc 2] [--out runs/soak] [key=value ...]

Prints one row per sample and the growth from the first to the last quarter of the run.
"""
from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
TINY = ["model.name=custom", "model.n_layer=2", "model.n_head=4", "model.n_embd=64", "model.context_length=128",
        "model.trainable=all", "model.pooling=last_token", "data.max_length=64", "data.padding=fixed",
        "precision=fp32", "train.lr=1e-3", "train.micro_batch_size=16", "checkpoint.every_steps=3",
        "checkpoint.keep_last=2", "eval.every_steps=6", "eval.max_batches=2", "early_stopping.patience=100000",
        "train.log_every_steps=20", "report.plots=false"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def sample(agent: psutil.Process, run_dir: Path) -> dict[str, float]:
    workers = [p for p in agent.children(recursive=True) if "dist_finetune" in " ".join(p.cmdline())]
    rss = fds = 0
    for p in workers:
        try:
            rss += p.memory_info().rss
            fds += p.num_fds()
        except psutil.NoSuchProcess:
            pass
    ckpts = run_dir / "checkpoints"
    folders = len([p for p in ckpts.iterdir() if p.is_dir()]) if ckpts.exists() else 0
    return {"t": 0.0, "ranks": len(workers), "rss_mib": rss / 2**20, "fds": fds,
            "run_mib": folder_bytes(run_dir) / 2**20, "ckpt_folders": folders}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--out", default="runs/soak")
    p.add_argument("--every", type=float, default=2.0, help="seconds between samples")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    run_dir = Path(args.out).resolve()
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={args.nproc}",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "dist_finetune.train",
           "--config", str(REPO / "configs" / "quickstart.yaml"), f"output_dir={run_dir}",
           f"train.epochs={args.epochs}", *TINY, *args.overrides]
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    agent = psutil.Process(proc.pid)
    rows = []
    while proc.poll() is None:
        row = sample(agent, run_dir)
        row["t"] = time.time() - start
        if row["ranks"]:
            rows.append(row)
        time.sleep(args.every)
    err = proc.stderr.read()
    if proc.returncode != 0:
        print(err[-3000:], file=sys.stderr)
        return proc.returncode
    print(f"{'t (s)':>7} {'ranks':>5} {'RSS MiB':>9} {'fds':>5} {'run MiB':>8} {'ckpts':>5}")
    for row in rows:
        print(f"{row['t']:7.1f} {row['ranks']:5d} {row['rss_mib']:9.1f} {row['fds']:5d} {row['run_mib']:8.1f} "
              f"{row['ckpt_folders']:5d}")
    quarter = max(1, len(rows) // 4)
    first, last = rows[quarter:2 * quarter], rows[-quarter:]
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)
    summary = (run_dir / "summary.json").read_text() if (run_dir / "summary.json").exists() else "{}"
    import json

    steps = json.loads(summary).get("global_step")
    print(f"\n{steps} optimizer steps in {time.time() - start:.0f} s; second quarter -> last quarter: "
          f"RSS {mean(first, 'rss_mib'):.1f} -> {mean(last, 'rss_mib'):.1f} MiB, "
          f"fds {mean(first, 'fds'):.1f} -> {mean(last, 'fds'):.1f}, "
          f"run folder max {max(r['run_mib'] for r in rows):.1f} MiB, "
          f"checkpoint folders max {max(r['ckpt_folders'] for r in rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
