"""data.long_texts compared on long texts whose label sits past the first window: truncate, head_tail, chunk.

    python benchmarks/long_texts.py [--workdir /tmp/long_texts] [--max-length 32]

Two made-up sets of about 110-token texts (96 train, 32 val, 40 test): the sentence that decides the label is at
the end, or in the middle. Each mode trains the same tiny GPT-2 (2 layers, 64 wide, random init, fp32, one
process) for 3 epochs and prints test accuracy, windows and times.
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
FILLER = ("the meeting notes cover budget travel lunch schedule weather office parking printer coffee report "
          "team project update review plan agenda minutes draft").split()
ENDINGS = {"urgent": "please treat this as urgent and answer today", "later": "no rush at all and answer whenever"}
MODEL = {"name": "custom", "n_layer": 2, "n_head": 4, "n_embd": 64, "context_length": 128, "weights": "none",
         "pooling": "last_token", "trainable": "all"}


def text(rng: random.Random, label: str, where: str) -> str:
    filler = [rng.choice(FILLER) for _ in range(100)]
    if where == "middle":
        return " ".join(filler[:50]) + ". " + ENDINGS[label] + ". " + " ".join(filler[50:])
    return " ".join(filler) + ". " + ENDINGS[label]


def write_set(folder: Path, where: str) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, rows, seed in (("train", 96, 1), ("val", 32, 2), ("test", 40, 3)):
        rng = random.Random(seed)
        labels = ["urgent", "later"] * (rows // 2)
        rng.shuffle(labels)
        paths[split] = folder / f"{split}.csv"
        paths[split].write_text("text,label\n" + "".join(f"{text(rng, y, where)},{y}\n" for y in labels))
    return paths


def run(workdir: Path, where: str, mode: str, data: dict[str, Path], max_length: int) -> dict:
    config = {"seed": 123, "precision": "fp32", "model": MODEL, "report": {"plots": False, "progress_bar": "off"},
              "output_dir": str(workdir / f"{where}_{mode}"),
              "data": {"train_file": str(data["train"]), "val_file": str(data["val"]), "test_file": str(data["test"]),
                       "max_length": max_length, "long_texts": mode},
              "train": {"epochs": 3, "micro_batch_size": 8, "lr": 1e-3, "warmup_steps": 0},
              "eval": {"every_steps": 12}, "early_stopping": {"enabled": False}}
    path = workdir / f"{where}_{mode}.yaml"
    path.write_text(yaml.safe_dump(config))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "dist_finetune.train", "--config", str(path), "--overwrite"],
                          cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        return {"where": where, "mode": mode, "error": proc.stderr.strip().splitlines()[-1]}
    summary = json.loads((Path(config["output_dir"]) / "summary.json").read_text())
    return {"where": where, "mode": mode, "test_accuracy": summary["test"]["accuracy"],
            "train_windows": (summary.get("windows") or {}).get("train", 96), "steps": summary["global_step"],
            "train_seconds": summary["train_seconds"], "wall_seconds": round(wall, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=Path("/tmp/long_texts"))
    p.add_argument("--max-length", type=int, default=32)
    args = p.parse_args()
    print("| label sentence | long_texts | test accuracy | train windows | steps | train s | wall s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for where in ("end", "middle"):
        data = write_set(args.workdir / where, where)
        for mode in ("truncate", "head_tail", "chunk"):
            r = run(args.workdir, where, mode, data, args.max_length)
            if "error" in r:
                print(f"| {where} | {mode} | error: {r['error']} |||||")
                continue
            print(f"| {where} | {mode} | {r['test_accuracy']:.3f} | {r['train_windows']} | {r['steps']} | "
                  f"{r['train_seconds']:.2f} | {r['wall_seconds']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
