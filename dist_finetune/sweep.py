"""`python -m dist_finetune.sweep --base CONFIG --grid GRID.yaml [--out DIR] [--nproc N] [--resume | --overwrite]`

Runs one training per setting of the grid, in turn, each as its own process (`python -m
dist_finetune.train`, or torchrun with N ranks on 127.0.0.1), then prints a comparison table and
writes it to OUT/comparison.md and OUT/comparison.csv. A failed setting is a `failed` row with the
last error line of its log (OUT/NAME.log); the other settings still run.

An --out that holds an earlier sweep is refused before anything runs, unless --resume (keep the
settings it finished, continue the others from their checkpoints, run the missing ones) or
--overwrite (run every setting again).
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
from .config import load_config, read_yaml, safe_load_unique
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


def command(base: Path, out: Path, setting: Setting, nproc: int, overwrite: bool = False,
            resume: bool = False) -> list[str]:
    """The training command of one setting; with `resume`, it continues the setting's run folder from its
    latest checkpoint when it has one (train's resume=auto), else starts it."""
    launch = [sys.executable]
    if nproc > 1:
        launch += ["-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={nproc}",
                   "--master_addr=127.0.0.1", f"--master_port={_free_port()}"]
    flags = ["--overwrite"] if overwrite else []
    return [*launch, "-m", "dist_finetune.train", "--config", str(base), *flags,
            f"output_dir={out / setting.name}", *setting.overrides, *(["resume=auto"] if resume else [])]


def last_error_line(log: str) -> str:
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    for line in reversed(lines):
        if "error" in line.lower() or "exception" in line.lower():
            return line[:300]
    return lines[-1][:300] if lines else "no output"


def read_summary(run_dir: Path) -> dict[str, Any]:
    s = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    return {"train_acc": s["train"].get("accuracy"), "val_acc": s["val"].get("accuracy"),  # single_label only
            "test_acc": (s.get("test") or {}).get("accuracy"),  # a run without a test split: blank
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


def check_out(out: Path, settings: list[Setting], overwrite: bool, resume: bool = False) -> None:
    """Before any setting runs: the sweep's logs and tables replace only what an earlier sweep wrote, and an
    earlier sweep (its logs, tables or run folders) is kept or replaced only when asked: --resume or
    --overwrite (the run folders themselves are checked by each training run)."""
    if out.exists() and not out.is_dir():
        raise GridError(f"--out {out} is a file; pass a folder for the sweep's runs, logs and tables")
    files = [out / f"{s.name}.log" for s in settings] + [out / name for name in RESERVED]
    present = [f for f in files if os.path.lexists(f)]
    foreign = [f.name for f in present if f.is_symlink() or not f.is_file() or not _ours(f)]
    if foreign:
        raise GridError(f"--out {out} holds {', '.join(foreign[:5])}, which no sweep wrote; the sweep would "
                        "replace it: move it away or choose another --out")
    present += [out / s.name for s in settings if os.path.lexists(out / s.name)]
    if present and not (overwrite or resume):
        names = [f.name + ("/" if f.is_dir() else "") for f in present]
        raise GridError(f"--out {out} holds an earlier sweep ({', '.join(names[:5])}); pass "
                        "--resume to keep the settings it finished and run the rest, --overwrite to run every "
                        "setting again, or choose another --out")


def finished_result(base: Path, out: Path, setting: Setting, nproc: int) -> Result | None:
    """For --resume: the row of a setting an earlier sweep finished (its run folder has summary.json), read
    back from that run, once it is checked to be a run of this very setting (same base config and overrides,
    same number of processes); None when the setting has not finished."""
    run_dir = out / setting.name
    if not os.path.lexists(run_dir / "summary.json"):
        return None
    from .runs import result_changing_differences  # only here: it imports the model code

    fix = (f"pass --overwrite to run every setting again, delete {run_dir} to run this one again, or choose "
           "another --out")
    try:
        wanted = load_config(base, [f"output_dir={run_dir}", *setting.overrides])
        recorded = read_yaml(run_dir / "config.yaml")
        values = read_summary(run_dir)
        ranks = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))["world_size"]
    except (OSError, KeyError, TypeError, ValueError) as exc:
        raise GridError(f"--resume: {run_dir} holds a finished run whose records cannot be read or compared "
                        f"with setting {setting.name!r} ({' '.join(str(exc).split())[:200]}); {fix}") from None
    differences = result_changing_differences(recorded, wanted)
    if ranks != nproc:
        differences.append(f"processes: {ranks} -> {nproc} (--nproc)")
    if differences:
        raise GridError(f"--resume: {run_dir} is a finished run of other settings than {setting.name!r} now "
                        f"has ({'; '.join(differences[:3])}); {fix}")
    return Result(setting.name, "ok", values)


def run_to_its_end(proc: subprocess.Popen) -> int:
    """Wait for a setting's process. A Ctrl-C reached it too (one process group): it is saving a checkpoint,
    so let it finish (subprocess.run would kill it mid-save); a second Ctrl-C makes it exit at once."""
    try:
        return proc.wait()
    except KeyboardInterrupt:
        try:
            proc.wait()
        except KeyboardInterrupt:
            proc.kill()
            proc.wait()
        raise


def run_setting(base: Path, out: Path, setting: Setting, nproc: int, overwrite: bool = False,
                resume: bool = False) -> Result:
    """Run one setting, its output in OUT/NAME.log (with `resume`, added after an earlier attempt's)."""
    log_path = out / f"{setting.name}.log"
    cmd = command(base, out, setting, nproc, overwrite, resume)
    with log_path.open("a" if resume else "w", encoding="utf-8") as log:
        start = log.tell()
        log.write(f"{LOG_HEADER}{setting.name}\n$ " + " ".join(cmd) + "\n")
        log.flush()
        rc = run_to_its_end(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy()))
    with log_path.open("rb") as log:
        log.seek(start)
        text = log.read().decode("utf-8", errors="replace")  # this attempt's output only
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


def sweep(base: Path, settings: list[Setting], out: Path, nproc: int = 1, overwrite: bool = False,
          kept: dict[str, Result] | None = None) -> list[Result]:
    """Run the settings in turn; `kept` (--resume) holds the rows of settings finished earlier, which do not
    run again, and makes every other setting continue from its checkpoints if it has any."""
    resume = kept is not None
    kept = kept or {}
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for i, setting in enumerate(settings, 1):
        if setting.name in kept:
            print(f"[{i}/{len(settings)}] {setting.name}: finished earlier, kept ({out / setting.name})", flush=True)
            results.append(kept[setting.name])
            continue
        print(f"[{i}/{len(settings)}] {setting.name}: {' '.join(setting.overrides) or '(base config)'}", flush=True)
        result = run_setting(base, out, setting, nproc, overwrite, resume)
        print(f"[{i}/{len(settings)}] {setting.name}: {result.status} {result.error}".rstrip(), flush=True)
        results.append(result)
    return results


DESCRIPTION = "Train once per setting of a grid, in turn, and compare the results in one table."
EXAMPLES = """\
examples:
  python -m dist_finetune.sweep --base configs/quickstart.yaml --grid sweeps/quickstart_methods.yaml --out runs/sweep
  python -m dist_finetune.sweep --base configs/quickstart.yaml --grid sweeps/quickstart_methods.yaml --out runs/sweep --resume
  python -m dist_finetune.sweep --base configs/quickstart.yaml --grid sweeps/quickstart_methods.yaml --nproc 2 --out runs/sweep2

A grid file lists the settings, each a name and key=value changes to the base config:
  - name: last_layer
    overrides: [model.trainable=last_layer]
  - name: lora
    overrides: [model.trainable=lora, lora.rank=8]
(or a mapping, name: [key=value, ...]). Each setting trains in OUT/NAME, its output in OUT/NAME.log.
The table (one row per setting: status, train/val/test accuracy, training seconds, samples/s, trainable
parameters, error) is printed and written to OUT/comparison.md and OUT/comparison.csv. A setting that
fails is a "failed" row with its error; the others still run. Exit status: 0 every setting finished, 1
some failed, 2 a problem with the grid, the base config or --out (one "error:" line names it and the fix)."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dist_finetune.sweep", description=DESCRIPTION, epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, type=Path, metavar="CONFIG",
                   help="the run config (YAML) every setting starts from (required)")
    p.add_argument("--grid", required=True, type=Path, metavar="GRID",
                   help="YAML file of the settings to compare, each a name and key=value changes (required)")
    p.add_argument("--out", type=Path, default=Path("runs/sweep"), metavar="DIR",
                   help="folder for the settings' runs, their logs and the tables (default: runs/sweep)")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="processes per setting: N > 1 trains each setting with N processes on this machine "
                        "(torchrun) (default: 1)")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue an earlier sweep in --out: keep the settings it finished (their rows and "
                            "logs), run the others, continuing from their last checkpoint where they have one "
                            "(default: an earlier sweep in --out is refused)")
    again.add_argument("--overwrite", action="store_true",
                       help="run every setting again, replacing an earlier sweep's runs, logs and tables in --out "
                            "(default: an earlier sweep in --out is refused)")
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
    check_out(args.out, settings, args.overwrite, args.resume)
    kept = None
    if args.resume:  # every finished setting is checked before anything runs
        found = {s.name: finished_result(args.base, args.out, s, args.nproc) for s in settings}
        kept = {name: result for name, result in found.items() if result is not None}
    results = sweep(args.base, settings, args.out, args.nproc, args.overwrite, kept)
    print(write_tables(results, args.out), end="")
    print(f"tables: {args.out / 'comparison.md'} {args.out / 'comparison.csv'}")
    return 0 if all(r.status == "ok" for r in results) else 1


if __name__ == "__main__":
    leave(main())
