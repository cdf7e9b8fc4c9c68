"""One data file split into train / val (/ test): which rows go where, and the record of it in the run folder.

The split is stratified by label and seeded, computed the same way on every rank (no collective), and
written to `RUN/data_split.json` when the run starts. Resume, evaluate and a run that re-reads its data
take the rows from that record, never recompute them, and refuse a file whose bytes changed since.

    {"version": 1, "file": "data/mine.csv", "sha256": "...", "rows": 1000, "fractions": [0.7, 0.1, 0.2],
     "seed": 123, "indices": {"train": [0, 3, ...], "val": [...], "test": [...]}}

`indices` are 0-based positions among the file's data rows (the header is not counted: index 0 is
"row 1" in our messages, `df.iloc[0]` in pandas), ascending.
"""
from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UserError
from .files import atomic_write_text

SPLIT_FILE = "data_split.json"
SPLIT_NAMES = ("train", "val", "test")
VERSION = 1
_LARGEST = 2**31  # bytes: a bigger record is not ours
_SEARCH_ROWS = 100_000  # rows_needed searches below this many rows


class SplitError(UserError, ValueError):
    """The split cannot be made as configured, or its record does not fit the data (names the key or file, and
    the fix)."""


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cut(n: int, fractions: Sequence[float]) -> list[int]:
    """n rows in parts of the given fractions: floors, then the rows left over to the largest remainders
    (ties: the earlier part)."""
    exact = [n * f for f in fractions]
    counts = [math.floor(x + 1e-9) for x in exact]
    by_remainder = sorted(range(len(fractions)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    return counts


def stratified_split(labels: Sequence[Hashable], fractions: Sequence[float], seed: int) -> list[list[int]]:
    """Row positions of each part (ascending): every label's rows, shuffled by one RandomState(seed) in
    sorted label order, cut by `fractions`. The same labels, fractions and seed give the same parts on
    every machine (numpy's legacy RandomState stream is fixed)."""
    by_label: dict[Hashable, list[int]] = {}
    for i, label in enumerate(labels):
        by_label.setdefault(label, []).append(i)
    rng = np.random.RandomState(seed)
    parts: list[list[int]] = [[] for _ in fractions]
    for label in sorted(by_label):  # labels are all strings or all integers
        rows = by_label[label]
        order = rng.permutation(len(rows))
        start = 0
        for part, count in zip(parts, cut(len(rows), fractions)):
            part.extend(rows[j] for j in order[start:start + count])
            start += count
    return [sorted(part) for part in parts]


def rows_needed(fractions: Sequence[float]) -> int:
    """The fewest rows of one label that give every part at least one. ceil(1 / smallest fraction) rows always
    do; below that, rounding may give a part its row sooner, which is searched only where it is cheap."""
    enough = math.ceil(1 / min(fractions) - 1e-9)
    return next((n for n in range(len(fractions), min(enough, _SEARCH_ROWS)) if min(cut(n, fractions)) > 0),
                enough)


def check_every_label_in_every_part(labels: Sequence[Hashable], fractions: Sequence[float], file: str) -> None:
    names = SPLIT_NAMES[: len(fractions)]
    counts: dict[Hashable, int] = {}
    for label in labels:
        counts[label] = counts.get(label, 0) + 1
    for label in sorted(counts):
        parts = cut(counts[label], fractions)
        if min(parts) == 0:
            empty = names[parts.index(0)]
            raise SplitError(
                f"data.split: {list(fractions)} leaves label {label!r} ({counts[label]} row(s) in {file}) with no "
                f"rows in the {empty} split; each label needs at least {rows_needed(fractions)} rows with these "
                f"fractions. Add rows of that label, raise the {empty} fraction, or give the {empty} split its "
                f"own file (data.{empty}_file)."
            )


@dataclass(frozen=True)
class DataSplit:
    """Which rows of `file` each split holds (see the module docstring)."""

    file: str
    sha256: str
    rows: int
    fractions: tuple[float, ...]
    seed: int
    indices: dict[str, tuple[int, ...]]
    origin: str = ""  # the record's path, when read from a run folder (for messages)

    @classmethod
    def make(cls, file: str | Path, labels: Sequence[Hashable], fractions: Sequence[float], seed: int) -> DataSplit:
        check_every_label_in_every_part(labels, fractions, str(file))
        parts = stratified_split(labels, fractions, seed)
        return cls(str(file), file_sha256(file), len(labels), tuple(fractions), seed,
                   {name: tuple(part) for name, part in zip(SPLIT_NAMES, parts)})

    def to_json(self) -> dict[str, Any]:
        return {"version": VERSION, "file": self.file, "sha256": self.sha256, "rows": self.rows,
                "fractions": list(self.fractions), "seed": self.seed,
                "indices": {name: list(rows) for name, rows in self.indices.items()}}

    def write(self, run_dir: Path) -> None:
        atomic_write_text(Path(run_dir) / SPLIT_FILE, json.dumps(self.to_json()) + "\n")

    def check_source(self, path: str | Path, rows: int) -> None:
        """The file is byte for byte the one this split was made of."""
        now = file_sha256(path)
        if now != self.sha256 or rows != self.rows:
            raise SplitError(
                f"data.train_file {path} changed since the run split it: {self.origin or SPLIT_FILE} records {self.rows} rows with "
                f"sha256 {self.sha256[:12]}..., the file now has {rows} rows with sha256 {now[:12]}.... The run's "
                "splits cannot be rebuilt from it: put the original file back, evaluate the file as it is now "
                "with --data FILE, or train a new run (another output_dir, or --overwrite)."
            )


def read_split(run_dir: Path) -> DataSplit:
    """The split a run recorded; a missing or damaged record is one line naming the file and the fix."""
    path = Path(run_dir) / SPLIT_FILE
    fix = ("the run's splits of data.train_file cannot be rebuilt without it: train again (--overwrite), or "
           "evaluate a labelled file with --data FILE")
    if not path.is_file():
        raise SplitError(f"{path} is missing; {fix}")
    try:
        if path.stat().st_size > _LARGEST:
            raise ValueError("too large")
        data = json.loads(path.read_text(encoding="utf-8"))
        split = _from_json(data, str(path))
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError) as exc:
        raise SplitError(f"{path} is damaged ({' '.join(str(exc).split())[:120]}); {fix}") from None
    return split


def _from_json(data: Any, origin: str) -> DataSplit:
    if not isinstance(data, dict) or data.get("version") != VERSION:
        raise ValueError(f"not a version-{VERSION} split record")
    rows, seed, fractions = data["rows"], data["seed"], data["fractions"]
    if not (_is_int(rows) and rows >= 0 and _is_int(seed) and isinstance(data["file"], str)
            and isinstance(data["sha256"], str) and isinstance(fractions, list)
            and all(isinstance(f, (int, float)) and not isinstance(f, bool) for f in fractions)):
        raise ValueError("a field has the wrong type")
    indices = data["indices"]
    if not (isinstance(indices, dict) and tuple(indices) == SPLIT_NAMES[: len(fractions)]):
        raise ValueError(f"indices must name the splits {list(SPLIT_NAMES[:len(fractions)])}")
    seen: set[int] = set()
    for name, part in indices.items():
        if not (isinstance(part, list) and all(_is_int(i) and 0 <= i < rows for i in part)):
            raise ValueError(f"indices of {name} must be row positions below {rows}")
        if len(set(part)) < len(part):
            raise ValueError(f"a row is twice in {name}")
        if seen.intersection(part):
            raise ValueError(f"a row is in two splits ({name})")
        seen.update(part)
    return DataSplit(data["file"], data["sha256"], rows, tuple(float(f) for f in fractions), seed,
                     {name: tuple(part) for name, part in indices.items()}, origin)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
