"""Wall time of whole training runs, process start to summary.json, split into phases.

    python benchmarks/end_to_end.py --matrix quickstart|tiny|gpu [--only NAME ...] [--workdir DIR] [--json PATH]

Each run is `python -m dist_finetune.train --config ... output_dir=...` in a fresh process (a fresh
interpreter, so imports, DeepSpeed's set-up and any JIT builds are paid as a user pays them). The
phases come from the run's summary.json `timings` (start-up before `train()`, data, model, engine
initialisation, the training loop, evaluations inside it, checkpoints, the final evaluation, export);
`exit_seconds` is what is left of the process wall time (reports, plots, shutting down).
The chapter's plain fp32 loop (benchmarks/plain_loop.py) runs in this process as the same-run baseline
of both time and test accuracy.

The quickstart matrix is README's main command as a user runs it, warm (caches filled by earlier runs)
and as on a fresh install: empty caches for Python's bytecode, matplotlib's fonts and torch's compiled
extensions (PYTHONPYCACHEPREFIX, MPLCONFIGDIR, TORCH_EXTENSIONS_DIR), so everything a first run builds
is paid again.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

TINY_MODEL = ["model.name=custom", "model.n_layer=2", "model.n_head=2", "model.n_embd=64",
              "model.context_length=128", "model.weights=none"]
GPT2_RANDOM = ["model.name=gpt2", "model.weights=none"]  # no pretrained weights can be fetched there
# The chapter's batch and schedule, with the switches that cost nothing in results: evaluation at epoch
# ends in large batches, checks every 10 steps, one checkpoint kept.
LEAN = ["zero.stage=0", "eval.every_steps=null", "eval.batch_size=128", "train.nonfinite_check=deferred",
        "train.on_nonfinite=stop", "train.sync_every_steps=10", "checkpoint.keep_last=1"]


@dataclass(frozen=True)
class Run:
    name: str
    config: str | None  # a YAML under configs/, or None for the chapter's plain loop
    overrides: list[str] = field(default_factory=list)
    epochs: int = 5
    trainable: str = "all"  # for the plain loop
    fresh: bool = False  # empty caches, as on a fresh install


MATRICES: dict[str, list[Run]] = {
    # README's main command: the first run fills the caches the second (warm) one uses.
    "quickstart": [
        Run("quickstart, fresh install", "configs/quickstart.yaml", fresh=True),
        Run("quickstart, warm", "configs/quickstart.yaml"),
    ],
    # Seconds on a CPU: the harness itself is what the tests check.
    "tiny": [
        Run("chapter loop fp32, all layers", None, TINY_MODEL + ["precision=fp32"], epochs=1),
        Run("framework, fixed padding", "configs/gpt2_small_spam.yaml",
            TINY_MODEL + ["precision=fp32", "train.epochs=1", "model.trainable=all", "eval.every_steps=null",
                          "zero.stage=0", "train.lr=5e-4"]),
        Run("fast preset", "configs/gpt2_small_spam_fast.yaml",
            TINY_MODEL + ["precision=fp32", "train.epochs=1", "train.lr=1e-3"]),
    ],
    # GPT-2 124M with random weights on one GPU: the chapter's batch 8 and the fast preset.
    "gpu": [  # most wanted first: a job cut short keeps the runs before the cut
        Run("chapter loop fp32, all layers", None, GPT2_RANDOM, epochs=5),
        Run("fast preset, all layers", "configs/gpt2_small_spam_fast.yaml", GPT2_RANDOM),
        Run("chapter recipe, all layers, batch 8", "configs/gpt2_small_spam.yaml",
            GPT2_RANDOM + ["model.trainable=all", *LEAN]),
        Run("chapter loop fp32, last block", None, GPT2_RANDOM, epochs=5, trainable="last_block"),
        Run("chapter recipe, last block, batch 8", "configs/gpt2_small_spam.yaml", GPT2_RANDOM + LEAN),
    ],
}


def run_framework(run: Run, workdir: Path) -> dict[str, Any]:
    out = workdir / run.name.replace(" ", "_").replace(",", "")
    cmd = [sys.executable, "-m", "dist_finetune.train", "--config", run.config, "--overwrite",
           f"output_dir={out}", "report.progress_bar=off", *run.overrides]
    env = dict(os.environ)
    if run.fresh:
        workdir.mkdir(parents=True, exist_ok=True)
        caches = Path(tempfile.mkdtemp(prefix="fresh_caches_", dir=workdir))
        env.update(PYTHONPYCACHEPREFIX=str(caches / "pycache"), MPLCONFIGDIR=str(caches / "matplotlib"),
                   TORCH_EXTENSIONS_DIR=str(caches / "torch_extensions"))
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        return {"name": run.name, "error": f"exit {proc.returncode}: {tail[0]}"}
    summary = json.loads((out / "summary.json").read_text())
    timings = summary["timings"]
    accounted = (timings.get("startup_seconds") or 0.0) + summary["wall_seconds"]
    return {
        "name": run.name, "config": run.config, "overrides": run.overrides,
        "process_wall_seconds": round(wall, 3),
        "train_loop_seconds": timings["loop_train_seconds"],
        **timings, "exit_seconds": round(max(wall - accounted, 0.0), 3),
        "epochs": summary["epochs_completed"], "global_step": summary["global_step"],
        "samples_per_second": round(summary["samples_per_second"], 1),
        "test_accuracy": summary["test"]["accuracy"], "val_accuracy": summary["val"]["accuracy"],
        "stopped_early": summary["stopped_early"], "precision": summary["precision"],
        "peak_memory_bytes": summary["peak_memory_bytes"],
    }


def run_plain(run: Run) -> dict[str, Any]:
    import torch

    from dist_finetune.config import load_config
    from plain_loop import train_epochs

    cfg = load_config(None, [*run.overrides, f"model.trainable={run.trainable}"])  # it pads to the longest text
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = train_epochs(cfg, run.epochs, device)
    return {"name": run.name, "config": None, "overrides": run.overrides, **asdict(result),
            "train_loop_seconds": result.train_seconds}


def table(results: list[dict[str, Any]]) -> str:
    cols = [("process_wall_seconds", "wall s"), ("startup_seconds", "start-up"), ("data_seconds", "data"),
            ("engine_init_seconds", "engine"), ("train_loop_seconds", "train"), ("loop_eval_seconds", "evals"),
            ("checkpoint_seconds", "ckpt"), ("final_eval_seconds", "final eval"), ("export_seconds", "export"),
            ("exit_seconds", "rest"), ("test_accuracy", "test acc")]
    width = max(len(r["name"]) for r in results) + 2
    lines = [f"{'run':<{width}}" + "".join(f"{title:>11}" for _, title in cols)]
    for r in results:
        if "error" in r:
            lines.append(f"{r['name']:<{width}}  failed: {r['error']}")
            continue
        cells = []
        for key, _ in cols:
            v = r.get(key)
            cells.append(f"{'-':>11}" if v is None else f"{v:>11.3f}" if key == "test_accuracy" else f"{v:>11.2f}")
        lines.append(f"{r['name']:<{width}}" + "".join(cells))
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python benchmarks/end_to_end.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--matrix", choices=sorted(MATRICES), default="gpu")
    p.add_argument("--only", nargs="+", help="run only the runs with these names")
    p.add_argument("--workdir", type=Path, help="where the run folders go (default: a temporary folder)")
    p.add_argument("--json", type=Path, help="write the figures to this JSON file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runs = [r for r in MATRICES[args.matrix] if not args.only or r.name in args.only]
    if not runs:
        print(f"error: no run of matrix {args.matrix} is named {args.only}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="end_to_end_") as tmp:
        workdir = args.workdir or Path(tmp)
        results = []
        for run in runs:
            results.append(run_plain(run) if run.config is None else run_framework(run, workdir))
            print(f"{run.name}: {results[-1].get('error') or 'done'}", flush=True)
            write_json(args.json, args.matrix, results)  # after every run: a cut-short job keeps its figures
    print(table(results))
    return 1 if any("error" in r for r in results) else 0


def write_json(path: Path | None, matrix: str, results: list[dict[str, Any]]) -> None:
    if path is None:
        return
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"device": device, "date": datetime.date.today().isoformat(),
                                "matrix": matrix, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
