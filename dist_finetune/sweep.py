"""`python -m dist_finetune.sweep --base CONFIG --grid GRID.yaml [--out DIR] [--nproc N]`

Runs one training per setting of the grid, in turn, each as its own process (`python -m
dist_finetune.train`, or torchrun with N ranks on 127.0.0.1), then prints a comparison table and
writes it to OUT/comparison.md and OUT/comparison.csv. A failed setting is a `failed` row with the
last error line of its log (OUT/NAME.log); the other settings still run.

GRID.yaml is a list of {name: ..., overrides: [key=value, ...]} or a mapping {name: [key=value, ...]}.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .cli import run_command
from .config import safe_load_unique
from .distributed import leave
from .errors import UserError
from .files import atomic_write_text

COLUMNS = ("setting", "status", "train_acc", "val_acc", "test_acc", "train_seconds", "samples_per_second",
           "trainable_parameters", "error")
NAME = re.compile(r"^[A-Za-z0-9._-]+$")


class GridError(UserError, ValueError):
    """A user error in the grid file; the message names the entry and the fix."""


@dataclass(frozen=True)
class Setting:
    name: str
    overrides: tuple[str, ...]


@dataclass
class Result:
    setting: str
    status: str
    values: dict[str, Any] = field(default_factory=dict)
    error: str = ""

    def row(self) -> dict[str, Any]:
        return {"setting": self.setting, "status": self.status, **self.values, "error": self.error}


RESERVED = ("comparison.md", "comparison.csv")  # the sweep's own files in --out


def _setting(name: Any, overrides: Any, where: str) -> Setting:
    """A name is a plain folder inside --out: never `.`/`..`, a path, an option-like `-x`, or the name
    of a file the sweep writes there (its tables, another setting's `NAME.log`)."""
    if not isinstance(name, str) or not NAME.fullmatch(name) or set(name) == {"."} or name.startswith("-") \
            or name in RESERVED or name.endswith(".log"):
        raise GridError(f"{where}: name {name!r} must be a plain folder name: letters, digits, '.', '_' or '-', "
                        "not '.' or '..', not starting with '-', not ending in .log, not comparison.md/.csv")
    if overrides is None:
        overrides = []
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise GridError(f"{where} ({name}): overrides must be a list of key=value strings")
    return Setting(name, tuple(overrides))


def parse_grid(raw: Any) -> list[Setting]:
    if isinstance(raw, dict):
        settings = [_setting(k, v, f"grid entry {k!r}") for k, v in raw.items()]
    elif isinstance(raw, list):
        settings = []
        for i, entry in enumerate(raw):
            if not isinstance(entry, dict) or "name" not in entry or set(entry) - {"name", "overrides"}:
                raise GridError(f"grid entry {i}: expected {{name: ..., overrides: [key=value, ...]}}, got {entry!r}")
            settings.append(_setting(entry["name"], entry.get("overrides"), f"grid entry {i}"))
    else:
        raise GridError("the grid must be a list of {name, overrides} or a mapping name -> [key=value, ...]")
    if not settings:
        raise GridError("the grid has no settings; add at least one")
    names = [s.name for s in settings]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise GridError(f"grid: setting names must be unique, repeated: {', '.join(dupes)}")
    return settings


def load_grid(path: Path) -> list[Setting]:
    if not path.is_file():
        raise GridError(f"grid file {path} not found")
    try:
        return parse_grid(safe_load_unique(path.read_text(encoding="utf-8"), str(path)))
    except yaml.YAMLError as exc:
        raise GridError(f"grid file {path} is not valid YAML: {exc}") from None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(base: Path, out: Path, setting: Setting, nproc: int, overwrite: bool = False) -> list[str]:
    launch = [sys.executable]
    if nproc > 1:
        launch += ["-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={nproc}",
                   "--master_addr=127.0.0.1", f"--master_port={_free_port()}"]
    flags = ["--overwrite"] if overwrite else []
    return [*launch, "-m", "dist_finetune.train", "--config", str(base), *flags,
            f"output_dir={out / setting.name}", *setting.overrides]


def last_error_line(log: str) -> str:
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    for line in reversed(lines):
        if "error" in line.lower() or "exception" in line.lower():
            return line[:300]
    return lines[-1][:300] if lines else "no output"


def read_summary(run_dir: Path) -> dict[str, Any]:
    s = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    return {"train_acc": s["train"]["accuracy"], "val_acc": s["val"]["accuracy"], "test_acc": s["test"]["accuracy"],
            "train_seconds": s["train_seconds"], "samples_per_second": s["samples_per_second"],
            "trainable_parameters": s["trainable_parameters"]}


LOG_HEADER = "# dist_finetune sweep setting "  # the first line of every log a sweep writes


def _ours(path: Path) -> bool:
    """A log or table an earlier sweep wrote (its first line says so)."""
    try:
        with path.open(encoding="utf-8", errors="replace") as f:
            first = f.readline()
    except OSError:
        return False
    return first.startswith(LOG_HEADER) or first.startswith("| setting |") or first.startswith("setting,status,")


def check_out(out: Path, settings: list[Setting], overwrite: bool) -> None:
    """Before any setting runs: the sweep's logs and tables replace only what an earlier sweep wrote, and
    only with --overwrite (the run folders themselves are checked by each training run)."""
    if out.exists() and not out.is_dir():
        raise GridError(f"--out {out} is a file; pass a folder for the sweep's runs, logs and tables")
    files = [out / f"{s.name}.log" for s in settings] + [out / name for name in RESERVED]
    present = [f for f in files if os.path.lexists(f)]
    foreign = [f.name for f in present if f.is_symlink() or not f.is_file() or not _ours(f)]
    if foreign:
        raise GridError(f"--out {out} holds {', '.join(foreign[:5])}, which no sweep wrote; the sweep would "
                        "replace it: move it away or choose another --out")
    if present and not overwrite:
        raise GridError(f"--out {out} holds an earlier sweep's logs or tables ({', '.join(f.name for f in present[:5])}); "
                        "pass --overwrite to replace them and its run folders, or choose another --out")


def run_setting(base: Path, out: Path, setting: Setting, nproc: int, overwrite: bool = False) -> Result:
    log_path = out / f"{setting.name}.log"
    cmd = command(base, out, setting, nproc, overwrite)
    with log_path.open("w", encoding="utf-8") as log:
        log.write(f"{LOG_HEADER}{setting.name}\n$ " + " ".join(cmd) + "\n")
        log.flush()
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy()).returncode
    text = log_path.read_text(encoding="utf-8", errors="replace")
    if rc != 0:
        return Result(setting.name, "failed", error=f"exit {rc}: {last_error_line(text)}")
    try:
        return Result(setting.name, "ok", read_summary(out / setting.name))
    except (OSError, KeyError, ValueError) as exc:
        return Result(setting.name, "failed", error=f"no usable summary.json ({exc})")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if value <= 1.0 else f"{value:.1f}"
    return "" if value is None else str(value)


def markdown(results: list[Result]) -> str:
    rows = [[_fmt(r.row().get(c)).replace("|", "\\|") for c in COLUMNS] for r in results]
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


def write_tables(results: list[Result], out: Path) -> str:
    table = markdown(results)
    atomic_write_text(out / "comparison.md", table)
    rows = io.StringIO()
    writer = csv.DictWriter(rows, fieldnames=COLUMNS)
    writer.writeheader()
    for r in results:
        writer.writerow({c: r.row().get(c, "") for c in COLUMNS})
    atomic_write_text(out / "comparison.csv", rows.getvalue())
    return table


def sweep(base: Path, settings: list[Setting], out: Path, nproc: int = 1, overwrite: bool = False) -> list[Result]:
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for i, setting in enumerate(settings, 1):
        print(f"[{i}/{len(settings)}] {setting.name}: {' '.join(setting.overrides) or '(base config)'}", flush=True)
        result = run_setting(base, out, setting, nproc, overwrite)
        print(f"[{i}/{len(settings)}] {setting.name}: {result.status} {result.error}".rstrip(), flush=True)
        results.append(result)
    return results


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dist_finetune.sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, type=Path, help="the base run config (YAML)")
    p.add_argument("--grid", required=True, type=Path, help="the settings: a YAML list of {name, overrides}")
    p.add_argument("--out", type=Path, default=Path("runs/sweep"), help="where runs, logs and tables go")
    p.add_argument("--nproc", type=int, default=1, help="processes per run (>1: torchrun on this machine)")
    p.add_argument("--overwrite", action="store_true", help="replace run folders a previous sweep left in --out")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_command(lambda: run(args))


def run(args: argparse.Namespace) -> int:
    if args.nproc < 1:
        raise GridError(f"--nproc must be >= 1, got {args.nproc}")
    if not args.base.is_file():
        raise GridError(f"--base {args.base} not found; pass a run config YAML")
    settings = load_grid(args.grid)
    check_out(args.out, settings, args.overwrite)
    results = sweep(args.base, settings, args.out, args.nproc, args.overwrite)
    print(write_tables(results, args.out), end="")
    print(f"tables: {args.out / 'comparison.md'} {args.out / 'comparison.csv'}")
    return 0 if all(r.status == "ok" for r in results) else 1


if __name__ == "__main__":
    leave(main())
