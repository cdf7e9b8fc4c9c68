"""Files that appear whole: written under a temporary name beside the target, then renamed.

A reader (or a crash) sees either the old file or the new one, never half of one. Created files take the
usual permissions (0666 less the umask), like every other file of a run.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a plain `open(path, "w")` gives a new file: 0666 less the umask."""
    return 0o666 & ~_umask()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def temp_path_for(path: Path) -> Path:
    """A fresh name beside `path` for a writer that needs a path (pandas, safetensors, torch.save)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())
    return Path(tmp)


def publish(tmp: Path, path: Path) -> None:
    """Rename a finished temporary file (from `temp_path_for`) onto its final name."""
    os.replace(tmp, path)


def replace_dir(new: Path, target: Path) -> None:
    """Put the finished folder `new` (a sibling of `target`) in place of `target` as a whole: the old one
    is renamed aside first, then removed; at every moment `target` is either the old or the new folder
    (or, for an instant between two renames, absent: never a mix of both)."""
    new, target = Path(new), Path(target)
    if not target.exists():
        os.replace(new, target)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
    os.replace(target, aside / target.name)
    os.replace(new, target)
    shutil.rmtree(aside)  # ours: made just above, holding the folder we replaced


@contextmanager
def writing(path: Path, folder: Path | None = None) -> Iterator[Path]:
    """A temporary name beside `path` (or in `folder`, on the same file system) for a writer that needs a path
    (pandas, savefig, safetensors); renamed onto `path` when the block ends without error, removed otherwise. The
    file gets the usual permissions even when the writer replaced it with one of its own (safetensors' 0600)."""
    path = Path(path)
    tmp = temp_path_for(path if folder is None else Path(folder) / path.name)
    try:
        yield tmp
        os.chmod(tmp, file_mode())
        _fsync(tmp)
        publish(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def building_dir(target: Path) -> Iterator[Path]:
    """A fresh empty folder beside `target` to fill; it replaces `target` as a whole (`replace_dir`) when
    the block ends without error, and is removed otherwise."""
    target = Path(target)
    new = Path(tempfile.mkdtemp(prefix=f".{target.name}.new.", dir=target.parent))
    try:
        os.chmod(new, 0o777 & ~_umask())  # mkdtemp creates 0700
        yield new
        replace_dir(new, target)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)  # the fresh folder made above, never put in place
        raise
