"""Where log records go during training.

DeepSpeed's and torch.distributed's records (and our modules' own) reach a file per rank in the run
folder, `RUN/logs/train_rank{R}.log`, from INFO up; the console shows only WARNING and above from them,
or everything with `--verbose`. The console lines a run prints itself are copied into rank 0's file,
so the file tells the whole story in order.

The first records (the process group, DeepSpeed's import) come before the run folder may be written:
until `open_file` they wait in memory. The folder is written only once the run is committed (before
that it can still hold an old run that `--overwrite` replaces, or vanish again when set-up fails), so a
run that stops before training keeps its early records out of the folder; the console had the warnings.
"""
from __future__ import annotations

import collections
import contextlib
import io
import logging
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

LIBRARIES = ("DeepSpeed", "torch.distributed")  # loggers with handlers of their own: taken over
ECHO = "dist_finetune.console"  # our console lines, copied into the file (not printed a second time)
CONSOLE_FORMAT = "%(levelname)s %(name)s: %(message)s"
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
BUFFERED = 10_000  # records kept before the file opens (the oldest go first)


def log_file(run_dir: Path, rank: int) -> Path:
    return run_dir / "logs" / f"train_rank{rank}.log"


class _Console(logging.StreamHandler):
    """stderr; a progress bar on the terminal is cleared for the line and drawn again below it."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm = sys.modules.get("tqdm")  # a bar exists only once tqdm is imported
        if tqdm is None:
            return super().emit(record)
        with tqdm.tqdm.external_write_mode(file=self.stream):
            super().emit(record)


class _Buffer(logging.Handler):
    """Holds records until the run folder is there."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: collections.deque[logging.LogRecord] = collections.deque(maxlen=BUFFERED)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@dataclass
class _Routing:
    console: logging.Handler
    sink: logging.Handler  # the buffer, then the file
    loggers: list[logging.Logger] = field(default_factory=list)

    def attach(self, logger: logging.Logger) -> None:
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.addHandler(self.console)
        logger.addHandler(self.sink)
        self.loggers.append(logger)

    def replace_sink(self, sink: logging.Handler) -> None:
        for logger in self.loggers:
            logger.removeHandler(self.sink)
            logger.addHandler(sink)
        self.sink = sink


_routing: _Routing | None = None


def configure(verbose: bool) -> None:
    """At a command's start: the console handler, the buffer, Python warnings into logging."""
    global _routing
    console = _Console(sys.stderr)
    console.setLevel(logging.INFO if verbose else logging.WARNING)
    console.setFormatter(logging.Formatter(CONSOLE_FORMAT))
    console.addFilter(lambda record: record.name != ECHO)
    _routing = _Routing(console, _Buffer())
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    _routing.attach(root)
    for name in LIBRARIES[1:]:  # DeepSpeed's logger exists once it is imported: route_deepspeed()
        _route_library(logging.getLogger(name))
    warnings.showwarning = _show_warning


def _route_library(logger: logging.Logger) -> None:
    """`logger` and its descendants, which torch gives console handlers of their own, go through ours."""
    logger.setLevel(logging.INFO)
    logger.propagate = False  # its parent ("torch") prints on its own: ours are attached here instead
    _routing.attach(logger)
    prefix = f"{logger.name}."
    for name, child in list(logging.Logger.manager.loggerDict.items()):
        if name.startswith(prefix) and isinstance(child, logging.Logger) and child.handlers:
            for handler in list(child.handlers):
                child.removeHandler(handler)
            child.propagate = True


def route_deepspeed() -> None:
    """Once DeepSpeed may be imported (the device is chosen: DS_ACCELERATOR is set on CPU): its logger,
    made on import with a console handler of its own, goes through ours, at INFO."""
    if _routing is None:
        return
    from deepspeed.utils.logging import logger

    _route_library(logger)


def route_library(name: str) -> None:
    """A library that gives its logger a console handler of its own on import (MLflow): through ours."""
    if _routing is not None:
        _route_library(logging.getLogger(name))


def open_file(path: Path) -> None:
    """The run folder is committed: buffered records go into `path`, later ones too (appended on resume)."""
    if _routing is None:  # logging was not configured by a command (a test building a Trainer in-process)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter(FILE_FORMAT))
    old = _routing.sink
    for record in getattr(old, "records", ()):
        handler.handle(record)
    _routing.replace_sink(handler)
    old.close()


def echo(message: str, level: int = logging.INFO) -> None:
    """A line already printed on the console, copied into the log file."""
    logging.getLogger(ECHO).log(level, message)


class _LineWriter(io.TextIOBase):
    """A text stream whose lines (ended by newline or carriage return) become INFO records."""

    def __init__(self, logger: logging.Logger) -> None:
        self.logger, self.pending = logger, ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        *lines, self.pending = (self.pending + text).replace("\r", "\n").split("\n")
        for line in filter(str.strip, lines):
            self.logger.info(line.rstrip())
        return len(text)

    def flush(self) -> None:
        if self.pending.strip():
            self.logger.info(self.pending.rstrip())
        self.pending = ""


@contextlib.contextmanager
def captured_output(name: str) -> Iterator[None]:
    """What a library prints (DeepSpeed's checkpoint consolidation, its tqdm bars) goes to the log as
    records of logger `name` instead of the console; only when a command configured logging."""
    if _routing is None:
        yield
        return
    writer = _LineWriter(logging.getLogger(name))
    try:
        with contextlib.redirect_stdout(writer), contextlib.redirect_stderr(writer):
            yield
    finally:
        writer.flush()


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Python warnings as log records. Deprecation notices come from the libraries' internals and are
    for their maintainers: file only (the console shows them with --verbose)."""
    level = logging.INFO if issubclass(category, (DeprecationWarning, FutureWarning)) else logging.WARNING
    text = warnings.formatwarning(message, category, filename, lineno, line).rstrip()
    logging.getLogger("py.warnings").log(level, text)
