"""`predict --input FILE --output FILE`: the file in shards, on any number of ranks, resumable.

Shard i is rows [i * shard_rows, (i + 1) * shard_rows) of the input and belongs to rank i % world size. Every
rank reads the input sequentially, one shard at a time, predicts its own shards and writes each one whole as
OUTPUT.parts/shard_NNNNNN.EXT (in the output's format); rank 0 then joins the parts, in order, into OUTPUT.
Shards are by row, not by rank: an interrupted run resumes with any number of ranks, skipping every shard
whose part file exists (manifest.json beside the parts says which input, model and shard size they are of).
No process holds more than one shard (or, while joining, one part) in memory.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd
import torch

from . import files
# read_texts' own checks and messages, applied one shard at a time
from .data import DataError, _check_column, _check_not_empty, _check_path, _expected_layout, _Source, _text_value
from .distributed import (DistEnv, all_reduce_sum, broadcast_object, cpu_threads, discover, free_port,
                          init_distributed, set_activity)
from .errors import UserError
from .formats import FormatError, optional
from .table_chunks import Source, csv_header, join_parquet, join_text, one_type_per_column, parquet_columns, shards

SHARD_ROWS = 10_000
MAX_SHARD_ROWS = 10**12  # more would overflow pyarrow's batch size (a C long); one shard of a file anyway
MANIFEST = "manifest.json"
# A peer waits in a collective while rank 0 reads the whole input (validation) or joins the parts: hours for a
# file larger than memory. A rank that dies is noticed by the launcher, not by this timeout.
TIMEOUT_SECONDS = 24 * 3600.0
T = TypeVar("T")


# ---------------------------------------------------------------- command line


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="with --output: start N ranks on this machine (torchrun) that share the file's shards; "
                        "under torchrun, leave it out (default: 1)")
    p.add_argument("--shard-rows", type=int, default=SHARD_ROWS, metavar="N",
                   help=f"with --output: rows per shard, the unit of work of a rank and of a resume "
                        f"(default: {SHARD_ROWS})")


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.nproc < 1:
        p.error(f"--nproc must be >= 1, got {args.nproc}")
    if not 1 <= args.shard_rows <= MAX_SHARD_ROWS:
        p.error(f"--shard-rows must be from 1 to {MAX_SHARD_ROWS}, got {args.shard_rows}")
    if args.nproc > 1 and args.output is None:
        p.error("--nproc shares the rows of --input FILE between ranks: give --input and --output")


def without_nproc(argv: list[str]) -> list[str]:
    """The command line minus --nproc N (any spelling argparse accepts: --nproc=N, a prefix such as --np)."""
    out, skip = [], False
    for arg in argv:
        name = arg.split("=", 1)[0]
        if skip:
            skip = False
        elif len(name) > 3 and "--nproc".startswith(name):
            skip = "=" not in arg
        else:
            out.append(arg)
    return out


def spawn(argv: list[str] | None, nproc: int, device: str) -> int:
    """Run this very command under torchrun with `nproc` local ranks, and wait for them."""
    if argv is None:
        raise UserError("--nproc: the command line is unknown here; start the ranks with torchrun instead")
    if discover().world_size > 1:
        raise UserError("--nproc starts its own ranks, but this is already one of several ranks (torchrun, MPI or "
                        "SLURM): leave --nproc out; the launcher's ranks share the shards")
    gpus = torch.cuda.device_count() if device != "cpu" and torch.cuda.is_available() else 0
    if 0 < gpus < nproc:
        raise UserError(f"--nproc {nproc}: each rank takes a GPU of its own and this machine has {gpus}; pass "
                        f"--nproc {gpus}, or --device cpu for {nproc} CPU ranks")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={nproc}",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "dist_finetune.predict",
           *without_nproc(argv)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS") or str(cpu_threads(nproc))}
    proc = subprocess.Popen(cmd, env=env)
    with _forwarding_sigterm(proc):
        try:
            return proc.wait()
        except KeyboardInterrupt:  # the ranks got it too: let them stop (their finished shards stay)
            proc.wait()
            raise


@contextlib.contextmanager
def _forwarding_sigterm(proc: subprocess.Popen) -> Iterator[None]:
    """A SIGTERM sent to this process alone (a supervisor, `kill PID`) goes on to the launcher, which stops the
    ranks; this process then waits for them. Without it the ranks ran on, orphaned, beside a rerun."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: proc.send_signal(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ---------------------------------------------------------------- ranks


@dataclass(frozen=True)
class Ranks:
    """This process among the ranks sharing the file; one process needs no process group."""

    rank: int = 0
    size: int = 1
    env: DistEnv | None = None

    def decided(self, decide: Callable[[], T]) -> T:
        """Rank 0's `decide()` on every rank; a UserError it raises is raised by every rank."""
        result: Any = None
        if self.rank == 0:
            try:
                result = decide()
            except UserError as exc:
                result = exc
        if self.env is not None:
            result = broadcast_object(result, self.env)
        if isinstance(result, UserError):
            raise result
        return result

    def total(self, values: list[float]) -> list[float]:
        """Summed over the ranks; also the point where every rank has finished its shards."""
        return values if self.env is None else all_reduce_sum(values, self.env).tolist()


def join_ranks(device: str) -> Ranks:
    """A process group (gloo on CPU) only when launched with several ranks."""
    if discover().world_size <= 1:
        return Ranks()
    env = init_distributed(TIMEOUT_SECONDS, debug=device == "cpu")
    set_activity("bulk prediction")
    return Ranks(env.rank, env.world_size, env)


# ---------------------------------------------------------------- the whole input, checked first


@dataclass(frozen=True)
class Checked:
    rows: int
    columns: list[str] | None  # JSONL: every key of the file, in order of first appearance (else None)


def validate(source: Source, shard_rows: int) -> Checked:
    """One pass over the whole input before anything is predicted: its columns are there and no text is empty
    or missing (the error names the file, row and column, as read_texts does). Counts the rows."""
    _check_path(source.path, "--input")
    header = _header(source)
    rows, keys = 0, {}
    for shard in shards(source, shard_rows):
        if rows == 0:
            _check_columns(source, header if header is not None else list(shard.columns))
        _check_texts(source, shard, rows)
        rows += len(shard)
        keys.update(dict.fromkeys(shard.columns))
    if rows == 0:
        if header is None:  # JSONL: no object at all
            raise DataError(f"{source.path}: the file is empty; it needs "
                            f"{_expected_layout('jsonl', source.text_column, None)}.")
        _check_columns(source, header)
        _check_not_empty(str(source.path), 0)
    return Checked(rows, list(keys) if source.fmt == "jsonl" else None)


def _header(source: Source) -> list[str] | None:
    """The columns, where the file states them before its rows (not JSONL)."""
    if source.fmt == "jsonl":
        return None
    if source.fmt != "parquet":
        return csv_header(source.path, source.fmt, source.text_column)
    pq = optional("pyarrow.parquet", "parquet", f"{source.path}: reading a .parquet file")
    try:
        schema = pq.read_schema(source.path)
    except (OSError, ValueError) as e:
        raise FormatError(f"{source.path}: cannot be read as Parquet ({' '.join(str(e).split())[:160]}); check that "
                          "it is a whole Parquet file (re-export it).") from None
    return parquet_columns(source.path, schema)


def _check_columns(source: Source, columns: list[str]) -> None:
    _check_column(source.path, source.fmt, columns, source.text_column, "--text-column", "text")
    if source.pair_column is not None:
        _check_column(source.path, source.fmt, columns, source.pair_column, "--text-pair-column",
                      "second text of each pair")


def _check_texts(source: Source, shard: pd.DataFrame, start: int) -> None:
    for column in (source.text_column, source.pair_column):
        if column is None:
            continue
        for offset, value in enumerate(shard[column].tolist()):
            if not (isinstance(value, str) and value.strip()):
                _text_value(value, _Source(str(source.path), column, column), start + offset + 1)  # raises


# ---------------------------------------------------------------- the parts folder


@dataclass(frozen=True)
class Job:
    source: Source
    output: Path
    fmt: str  # the output's format
    shard_rows: int
    batch_size: int
    model: Path
    backend: str
    overwrite: bool

    @property
    def parts(self) -> Path:
        return self.output.with_name(self.output.name + ".parts")

    def part(self, index: int) -> Path:
        return self.parts / f"shard_{index:06d}{self.output.suffix}"

    def shard_index(self, name: str) -> int | None:
        """The index of a part file's name; None for any other name."""
        match = re.fullmatch(rf"shard_(\d{{6,}}){re.escape(self.output.suffix)}", name)
        return int(match.group(1)) if match else None

    def ours(self, name: str) -> bool:
        """A name predict writes in the parts folder: the manifest, a part, or a temporary file of one of them or of
        the joined output."""
        if name == MANIFEST or self.shard_index(name) is not None:
            return True
        written = rf"shard_\d{{6,}}{re.escape(self.output.suffix)}|{re.escape(MANIFEST)}|{re.escape(self.output.name)}"
        return re.fullmatch(rf"\.({written})\..+\.tmp", name) is not None


def job(args: argparse.Namespace, fmt: str, text_column: str, pair_column: str | None) -> Job:
    return Job(Source(args.input, text_column, pair_column), args.output, fmt, args.shard_rows, args.batch_size,
               args.model, getattr(args, "backend", "auto"), args.overwrite)


def shard_count(rows: int, shard_rows: int) -> int:
    return -(-rows // shard_rows)


def manifest(job: Job, rows: int) -> dict[str, Any]:
    """What the parts are predictions of; a rerun with another manifest cannot use them."""
    from .classifier import find_export

    model = find_export(job.model, job.backend)
    stat = job.source.path.stat()
    newest = max((p.stat().st_mtime_ns for p in model.iterdir() if p.is_file()), default=0)
    return {"input": str(job.source.path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "rows": rows, "text_column": job.source.text_column, "pair_column": job.source.pair_column,
            "model": str(model.resolve()), "model_mtime_ns": newest, "shard_rows": job.shard_rows}


def prepare(job: Job, rows: int) -> list[int]:
    """Rank 0, before any prediction: the parts folder, new or of this very job; the shards already done."""
    wanted = manifest(job, rows)
    if os.path.lexists(job.parts):
        found = _manifest_in(job)
        if found == wanted:
            _remove_ours(job, temporary_only=True)
            return sorted(finished(job))
        if not job.overwrite:
            changed = ", ".join(k for k in wanted if found.get(k) != wanted[k]) if found else "no manifest.json"
            raise DataError(f"--output {job.output}: {job.parts} holds the unfinished predictions of another run "
                            f"({changed} differ); pass --overwrite to start again, or delete {job.parts}")
        _remove_ours(job)
        job.parts.rmdir()
    job.parts.mkdir()
    files.atomic_write_text(job.parts / MANIFEST, json.dumps(wanted, indent=1) + "\n")
    return []


def _manifest_in(job: Job) -> dict[str, Any] | None:
    """The manifest of an existing parts folder (None if it has none), once the folder holds only our files."""
    parts = job.parts
    if parts.is_symlink() or not parts.is_dir():
        raise DataError(f"--output {job.output}: {parts} is in the way (predict keeps unfinished shards there); "
                        "move it away or choose another --output")
    foreign = sorted(n for n in os.listdir(parts) if not (job.ours(n) and (parts / n).is_file()
                                                          and not (parts / n).is_symlink()))
    if foreign:
        raise DataError(f"--output {job.output}: {parts} holds files predict did not write "
                        f"({', '.join(foreign[:5])}); move them away or choose another --output")
    try:
        found = json.loads((parts / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def finished(job: Job) -> set[int]:
    """The shards whose part file is there."""
    indices = (job.shard_index(name) for name in os.listdir(job.parts))
    return {i for i in indices if i is not None}


def _remove_ours(job: Job, temporary_only: bool = False) -> None:
    for name in os.listdir(job.parts):
        if job.ours(name) and (not temporary_only or name.endswith(".tmp")):
            (job.parts / name).unlink()


def forget_unstarted(job: Job) -> None:
    """After a failure that finished no shard: the parts folder goes (nothing there to resume)."""
    if job.parts.is_dir() and not finished(job):
        _remove_ours(job)
        try:
            job.parts.rmdir()
        except OSError:
            pass  # something else appeared there: left as it is


# ---------------------------------------------------------------- predicting this rank's shards


@dataclass
class Tally:
    rows: int = 0
    truncated: int = 0  # texts longer than max_length


class Progress:
    """Rank 0's bar over all rows: the rows of the part files present, written by any rank, counted each time
    rank 0 reaches a shard boundary (and once more when every rank is done)."""

    def __init__(self, job: Job, rows: int, show: bool):
        from tqdm import tqdm

        self.job, self.rows = job, rows
        self.bar = tqdm(total=rows, initial=self._done(), desc="predict", unit="text", dynamic_ncols=True,
                        file=sys.stderr) if show else None

    def _done(self) -> int:
        step = self.job.shard_rows
        return sum(min(step, self.rows - i * step) for i in finished(self.job))

    def update(self) -> None:
        if self.bar is not None:
            self.bar.n = self._done()
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def predict_own(job: Job, classifier: Any, ranks: Ranks, checked: Checked, done: set[int],
                progress: Progress) -> Tally:
    """Read the input up to this rank's last shard to do, predicting and writing each of its shards."""
    todo = {i for i in range(ranks.rank, shard_count(checked.rows, job.shard_rows), ranks.size) if i not in done}
    tally = Tally()
    if not todo:
        return tally
    last = max(todo)
    for index, frame in enumerate(shards(job.source, job.shard_rows, checked.columns)):
        if index in todo:
            truncated = _predict_shard(job, classifier, frame, index)
            tally.rows += len(frame)
            tally.truncated += truncated
        progress.update()
        if index == last:
            break
    return tally


def _predict_shard(job: Job, classifier: Any, frame: pd.DataFrame, index: int) -> int:
    """Write one shard's predictions as its part file (whole or not at all); the number of truncated texts."""
    from .predict import with_predictions, write_table  # predict imports this module

    source = job.source
    pairs = frame[source.pair_column].tolist() if source.pair_column is not None else None
    predictions = classifier.predict(frame[source.text_column].tolist(), job.batch_size, pairs=pairs)
    with one_type_per_column(job.output) if job.fmt == "parquet" else contextlib.nullcontext():
        write_table(with_predictions(frame, predictions, classifier.labels), job.part(index), job.fmt)
    return sum(p.truncated for p in predictions)


# ---------------------------------------------------------------- joining the parts


def join_parts(job: Job, count: int) -> None:
    """Rank 0, once every rank is done: the parts in order into OUTPUT (a temporary name in the parts folder, then a
    rename), one part in memory at a time; then the parts folder goes."""
    paths = [job.part(i) for i in range(count)]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise RuntimeError(f"{job.parts}: {missing[0]} is missing although every rank finished")
    with files.writing(job.output, job.parts) as tmp:  # killed while joining: a rerun removes the temporary file
        if job.fmt == "parquet":
            join_parquet(paths, tmp, job.output)
        else:
            join_text(paths, tmp, job.fmt)
    _remove_ours(job)
    try:
        job.parts.rmdir()
    except OSError:
        print(f"note: left {job.parts}: it holds files predict did not write", file=sys.stderr)


# ---------------------------------------------------------------- the command


def predict_file(job: Job, classifier: Any, ranks: Ranks) -> int:
    checked = ranks.decided(lambda: validate(job.source, job.shard_rows))
    done = set(ranks.decided(lambda: prepare(job, checked.rows)))
    count = shard_count(checked.rows, job.shard_rows)
    if done and ranks.rank == 0:
        print(f"resuming: {len(done)} of {count} shard(s) are already in {job.parts}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    progress = Progress(job, checked.rows, show=ranks.rank == 0)
    try:
        tally = predict_own(job, classifier, ranks, checked, done, progress)
    except BaseException:
        progress.close()
        _after_failure(job, ranks)
        raise
    predicted, truncated = (int(v) for v in ranks.total([tally.rows, tally.truncated]))  # every rank is done
    seconds = time.perf_counter() - start
    progress.update()
    progress.close()
    if ranks.rank == 0:
        _finish(job, classifier, checked.rows, count, (predicted, truncated), seconds, ranks.size)
    return 0


def check_unchanged(job: Job, rows: int) -> None:
    """Before the join: the input and the model are still those of the manifest (a file still being written, or
    replaced, while it was predicted would give rows that were never checked, or miss some)."""
    wanted = manifest(job, rows)
    found = _manifest_in(job) or {}
    changed = [k for k in wanted if found.get(k) != wanted[k]]
    if changed:
        raise DataError(f"--input {job.source.path} or --model {job.model} changed while predicting "
                        f"({', '.join(changed)} differ); once they stay as they are, run the command again with "
                        "--overwrite")


def _after_failure(job: Job, ranks: Ranks) -> None:
    if ranks.size == 1:  # no peer is writing parts now
        forget_unstarted(job)
    if job.parts.is_dir() and finished(job):
        print(f"note: the finished shards stay in {job.parts}; run the same command again to resume",
              file=sys.stderr, flush=True)


def _finish(job: Job, classifier: Any, rows: int, count: int, counts: tuple[int, int], seconds: float,
            size: int) -> None:
    from .predict import warn_truncated

    predicted, truncated = counts
    check_unchanged(job, rows)
    warn_truncated(truncated, predicted, classifier)
    join_parts(job, count)
    rate = (f"{predicted / max(seconds, 1e-9):.1f} texts/s over {size} rank(s)" if predicted
            else f"all {count} shard(s) were already done")
    print(f"wrote {rows} prediction(s) to {job.output} ({rate})")
