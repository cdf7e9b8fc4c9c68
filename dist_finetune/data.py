"""Classification data: read CSV / TSV / JSONL / Parquet files, a saved `datasets` folder (formats.py) or
the bundled SMS Spam Collection, validate every
row before training, map labels to ids, tokenize once, truncate, and build the loaders.

Every user error is a `DataError` whose message names the file, the 1-based data row ("row N", the
header not counted) with its line in the file ("line L", the header is line 1) and the column where
that applies, and says what to do about it.

Cells are read as written: a label is the text in the file (`007` and `7` are two labels; `NA` is
refused unless data.na_labels=true), JSON numbers stay numbers.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from .config import SPLIT_DEFAULT, SPLIT_DEFAULT_VAL, DataConfig
from .formats import folder_sha256, read_dataset_dir, read_parquet
from .encoding import (PAIR_SEPARATOR, encode_pairs, fit_example, full_length, min_pair_length, pair_separator,
                       special_count, windows)
from .regression import TargetScale
from .tokenizer import GPT2_BPE, PAD_ID
from .errors import UserError
from .splits import DataSplit, SplitError, check_every_label_in_every_part, stratified_split

SPLITS = ("train", "val", "test")
BUNDLED_SMS_PATH = Path(__file__).resolve().parent / "datasets" / "sms_spam_collection" / "SMSSpamCollection"
FORMATS: dict[str, str] = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".txt": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
}
_FORMAT_NAMES = {"csv": "comma-separated", "tsv": "tab-separated", "jsonl": "JSON Lines", "parquet": "Parquet",
                 "dataset": "a saved dataset"}
_SUPPORTED = (".csv (comma-separated), .tsv / .tab / .txt (tab-separated), .jsonl / .ndjson (JSON Lines), "
              ".parquet (Parquet)")
_INT_RE = re.compile(r"[+-]?\d+")
_BAD_BYTE_MARK = "\U0010fffe"  # a Unicode noncharacter: stands in for undecodable bytes
BALANCE_SEED = 123  # data.balance=undersample on user files: which rows of the larger labels are kept
# What pandas (and many tools) read as a missing value: labels only with data.na_labels=true.
NA_SPELLINGS = frozenset({
    "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>", "N/A", "NA",
    "NULL", "NaN", "None", "n/a", "nan", "null",
})


class DataError(UserError, ValueError):
    """A user error in the data; the message names the file, the row and column, and the fix."""


# ---------------------------------------------------------------- labels


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class LabelMap:
    """Sorted class labels (all strings, or all ints); a label's id is its position."""

    labels: tuple
    _index: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        labels = tuple(int(x) if _is_int(x) or _is_numpy_int(x) else x for x in self.labels)
        if not labels:
            raise ValueError("LabelMap needs at least one label")
        if not (all(_is_int(x) for x in labels) or all(isinstance(x, str) for x in labels)):
            raise ValueError(f"LabelMap labels must be all strings or all integers, got {list(labels)!r}")
        if list(labels) != sorted_labels(set(labels)):
            raise ValueError(f"LabelMap labels must be sorted (sorted_labels) and unique, got {list(labels)!r}")
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "_index", {label: i for i, label in enumerate(labels)})

    @property
    def is_int(self) -> bool:
        return _is_int(self.labels[0])

    def to_id(self, label: Any) -> int:
        key = _coerce_label(label, self.is_int)
        if key not in self._index:
            raise DataError(f"unknown label {label!r}; known labels: {list(self.labels)!r}")
        return self._index[key]

    def from_id(self, index: int) -> str | int:
        return self.labels[index]

    def to_json(self) -> list:
        return list(self.labels)

    @classmethod
    def from_json(cls, data: list) -> LabelMap:
        if not isinstance(data, list):
            raise ValueError(f"a label map is a JSON list of labels, got {type(data).__name__}")
        return cls(tuple(data))

    def __len__(self) -> int:
        return len(self.labels)

    def same_classes(self, other: LabelMap) -> bool:
        """The same classes in the same order, an integer label equal to its exact text (`7` == "7"):
        a run whose CSV labels were read as integers before labels were kept as written still matches."""
        as_text = [[str(label) for label in m.labels] for m in (self, other)]
        return as_text[0] == as_text[1]


def _is_numpy_int(value: Any) -> bool:
    return getattr(getattr(value, "dtype", None), "kind", None) in ("i", "u")


def _label_order(label: Any) -> tuple:
    """Integers in numeric order; strings that spell integers first, by number then text (`2` < `007`
    < `10`), then the other strings."""
    if _is_int(label):
        return (0, label, "")
    if _INT_RE.fullmatch(label):
        return (0, int(label), label)
    return (1, 0, label)


def sorted_labels(labels: Any) -> list:
    """The order of a label map (a label's id is its position)."""
    return sorted(labels, key=_label_order)


def _coerce_label(label: Any, as_int: bool) -> Any:
    """Numpy ints become ints. A label map's kind bridges only exact spellings: the text `7` is the
    integer label 7 (not `07` or ` 7`), and the integer 7 is the string label `7`."""
    if isinstance(label, bool):
        raise DataError(f"label {label!r} is a boolean; labels are strings or integers")
    if _is_numpy_int(label):
        label = int(label)
    if as_int and isinstance(label, str) and _INT_RE.fullmatch(label) and str(int(label)) == label:
        return int(label)
    if not as_int and _is_int(label):
        return str(label)
    return label


# ---------------------------------------------------------------- datasets


class ClassificationDataset(Dataset):
    """Token ids (already truncated), label ids and the raw texts of one split."""

    def __init__(self, token_ids: list[list[int]], labels: list[int], texts: list[str],
                 doc_ids: list[int] | None = None) -> None:
        if not len(token_ids) == len(labels) == len(texts):
            raise ValueError("token_ids, labels and texts must have the same length")
        self.token_ids = token_ids
        self.labels = labels
        self.texts = texts
        # data.long_texts=chunk: each item is a window; doc_ids[i] is the text (row) window i came from, in order
        self.doc_ids = doc_ids

    @property
    def documents(self) -> int:
        return len(self.labels) if self.doc_ids is None else (self.doc_ids[-1] + 1 if self.doc_ids else 0)

    def __getitem__(self, i: int) -> tuple[list[int], int]:
        return self.token_ids[i], self.labels[i]

    def __len__(self) -> int:
        return len(self.labels)

    def num_tokens(self) -> int:
        return sum(len(ids) for ids in self.token_ids)


@dataclass
class DataBundle:
    train: ClassificationDataset
    val: ClassificationDataset
    test: ClassificationDataset | None  # None: the run has no test split
    label_map: LabelMap
    max_length: int
    truncated: dict[str, int]  # per split present
    split: DataSplit | None = None  # how data.train_file was split (written to the run folder), if it was
    scale: TargetScale | None = None  # task=regression: the targets' mean and deviation (label_map: their names)

    def windows(self) -> dict[str, int] | None:
        """data.long_texts=chunk: the windows of each split (None: one item per text)."""
        if self.train.doc_ids is None:
            return None
        return {name: len(getattr(self, name)) for name in self.splits()}

    def splits(self) -> tuple[str, ...]:
        """The splits the run has: train, val, and test unless it has none."""
        return tuple(name for name in SPLITS if getattr(self, name) is not None)


# ---------------------------------------------------------------- reading


@dataclass(frozen=True)
class _Source:
    """Where rows came from, to name them in messages."""

    name: str
    text_column: str = "text"
    label_column: str = "label"
    lines: tuple[int, ...] | None = None  # file line of each data row (the header is line 1), where known
    na_labels: bool = False  # data.na_labels: NA / NaN / None ... are labels
    rows: tuple[int, ...] | None = None  # a split of a file: each of its rows' row number in the file
    pair_column: str | None = None  # data.text_pair_column: the second text of each row
    targets: tuple[str, ...] | None = None  # task=regression: the numeric target columns (label: their values)
    separator: str | None = None  # task=multi_label: what joins a cell's labels (label: a tuple of labels)

    def at(self, row: int, column: str | None = None) -> str:
        if self.rows is not None:
            row = self.rows[row - 1]
        where = f"{self.name}, row {row}"
        if self.lines is not None:
            where += f" (line {self.lines[row - 1]})"
        return where + (f", column {column!r}" if column is not None else "")


@dataclass(frozen=True)
class _Table:
    frame: pd.DataFrame  # columns text, label; validated
    source: _Source


def read_table(path: str | Path, text_column: str, label_column: str, na_labels: bool = False) -> pd.DataFrame:
    """One CSV / TSV / JSONL file as a validated frame with columns `text` and `label`."""
    table = _read_file(path, text_column, label_column, na_labels=na_labels)
    check_label_spellings([table])
    return table.frame


def target_columns(label_column: str | Sequence[str]) -> tuple[str, ...]:
    """task=regression: the target columns, sorted by name (the order of the model's outputs)."""
    return (label_column,) if isinstance(label_column, str) else tuple(sorted(label_column))


def _read_file(path: str | Path, text_column: str, label_column: str | Sequence[str], key: str | None = None,
               column_keys: tuple[str, str] = ("data.text_column", "data.label_column"),
               na_labels: bool = False, pair_column: str | None = None,
               pair_key: str = "data.text_pair_column", regression: bool = False,
               separator: str | None = None) -> _Table:
    path = Path(path)
    targets = target_columns(label_column) if regression else None
    first_label = targets[0] if targets else label_column
    typed_labels = not regression and separator is None  # numbers, label lists: our own checks, per cell
    frame, fmt, lines = _read_frame(path, text_column, label_column if typed_labels else None, key)
    wanted = [(text_column, column_keys[0], "text")]
    wanted += [(c, column_keys[1], "numeric target") for c in targets] if targets else [
        (label_column, column_keys[1], "labels")]
    wanted += [(pair_column, pair_key, "second text of each pair")] if pair_column is not None else []
    for column, column_key, what in wanted:
        _check_column(path, fmt, list(frame.columns), column, column_key, what)
    source = _Source(str(path), text_column, first_label, lines, na_labels, pair_column=pair_column, targets=targets,
                     separator=separator)
    return _Table(_validated_frame(frame, source), source)


def _validated_frame(frame: pd.DataFrame, source: _Source) -> pd.DataFrame:
    pairs = frame[source.pair_column].tolist() if source.pair_column is not None else None
    if source.targets is not None:
        return _validated_targets(frame, source, pairs)
    return _validated(frame[source.text_column].tolist(), frame[source.label_column].tolist(), source, pairs)


def _validated_targets(frame: pd.DataFrame, source: _Source, pairs: list | None) -> pd.DataFrame:
    """Columns text, label (a tuple of floats: the targets' values, in target_columns order) and pair."""
    texts = [_text_value(v, source, row) for row, v in enumerate(frame[source.text_column].tolist(), 1)]
    columns = [[_target_value(v, source, row, c) for row, v in enumerate(frame[c].tolist(), 1)]
               for c in source.targets]
    return _with_pairs(pd.DataFrame({"text": pd.Series(texts, dtype=object),
                                     "label": pd.Series(list(zip(*columns)) if texts else [], dtype=object)}),
                       source, pairs)


def _with_pairs(frame: pd.DataFrame, source: _Source, pairs: list | None) -> pd.DataFrame:
    """The frame, with column pair (each row's validated second text) for text pairs."""
    if pairs is not None:
        frame["pair"] = pd.Series([_text_value(v, source, row, source.pair_column)
                                   for row, v in enumerate(pairs, 1)], dtype=object)
    return frame


def _label_set(value: Any, source: _Source, row: int) -> tuple:
    """task=multi_label: a cell's labels, in label order, each once; an empty cell is no label."""
    where, separator = source.at(row, source.label_column), source.separator
    if _is_missing(value) or (isinstance(value, str) and not value.strip()):
        return ()
    if isinstance(value, (list, tuple)) or hasattr(value, "tolist") and not isinstance(value, str):
        parts = list(value.tolist() if hasattr(value, "tolist") else value)
        for part in parts:
            if isinstance(part, str) and separator in part:
                raise DataError(f"{where}: label {part!r} holds data.label_separator {separator!r}, so it could not be "
                                "written in a CSV cell; rename the label or choose another data.label_separator.")
    elif isinstance(value, str):
        parts = value.split(separator)
        if any(not part.strip() for part in parts):
            raise DataError(f"{where}: {value!r} has an empty label between the {separator!r} separators; remove the "
                            "extra separator.")
    else:
        parts = [value]
    labels = [_label_value(part, source, row) for part in parts]
    return tuple(sorted_labels(set(labels))) if labels else ()


def _target_value(value: Any, source: _Source, row: int, column: str) -> float:
    where = source.at(row, column)
    if _is_missing(value) or (isinstance(value, str) and not value.strip()):
        raise DataError(f"{where}: the target is missing. Fill it in or delete the row.")
    if isinstance(value, bool):
        raise DataError(f"{where}: target {value!r} is not a number. Write the number.")
    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise DataError(f"{where}: target {value!r} is not a number (task=regression needs numeric targets). "
                        "Write the number, e.g. 3.5.") from None
    if not math.isfinite(number):
        raise DataError(f"{where}: target {value!r} is not a finite number. Write a finite number.")
    return number


def _read_frame(path: Path, text_column: str, label_column: str | None,
                key: str | None) -> tuple[pd.DataFrame, str, tuple[int, ...] | None]:
    """The file's whole table as read (every column), its format, and JSONL line numbers."""
    fmt = _check_path(path, key)
    if fmt == "parquet":
        return read_parquet(path, text_column, label_column), fmt, None
    text = _decode_utf8(path, _read_bytes(path), fmt)
    if not text.strip():
        raise DataError(f"{path}: the file is empty; it needs {_expected_layout(fmt, text_column, label_column)}.")
    if fmt == "jsonl":
        frame, lines = _parse_jsonl(path, text)
        return frame, fmt, lines
    records = _csv_records(text, fmt)
    if records:
        _check_unique_columns(path, records[0][1])
    frame = _parse_delimited(path, text, fmt)
    lines = tuple(line for line, _ in records[1:])
    return frame, fmt, lines if records and len(lines) == len(frame) else None


def _csv_records(text: str, fmt: str) -> list[tuple[int, list[str]]]:
    """(first line, fields) of every non-blank record, header first, as Python's csv module reads them
    (pandas' own reader keeps no line numbers and renames a repeated column); [] if it cannot."""
    reader = csv.reader(io.StringIO(text), delimiter="," if fmt == "csv" else "\t")
    records, end = [], 0
    try:
        for fields in reader:
            start, end = end + 1, reader.line_num
            if fields:
                records.append((start, fields))
    except csv.Error:
        return []
    return records


def _check_unique_columns(path: Path, header: list[str]) -> None:
    seen: set[str] = set()
    for column in header:
        if column and column in seen:
            raise DataError(f"{path}: the header names the column {column!r} twice; rename one of them "
                            "(only one can be read).")
        seen.add(column)


def _check_path(path: Path, key: str | None) -> str:
    set_by = f" (set by {key})" if key else ""
    if not path.exists():
        raise DataError(
            f"{path}: file not found{set_by}; relative paths are resolved from {Path.cwd()}. "
            f"Check the path{'' if key and key.startswith('-') else ' in the config'}."
        )
    if not path.is_file():
        target = key if key and key.startswith("-") else "the config"
        raise DataError(f"{path}: is not a file{set_by}; point {target} at a data file.")
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(
            f"{path}: unknown data format {path.suffix or '(no extension)'!r}; supported extensions: "
            f"{_SUPPORTED}. Convert the file or rename it with the right extension."
        )
    return fmt


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read the file ({e.strerror or e}); check its permissions.") from None


def _decode_utf8(path: Path, raw: bytes, fmt: str) -> str:
    body = raw[3:] if raw.startswith(b"\xef\xbb\xbf") else raw
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as e:
        line = body.count(b"\n", 0, e.start) + 1
        line_start = body.rfind(b"\n", 0, e.start) + 1
        where = f"line {line}, byte {e.start - line_start + 1} of the line"
        cell = _locate_bad_cell(body.decode("utf-8", errors="surrogateescape"), fmt)
        if cell is not None:
            where = f"row {cell[0]}, column {cell[1]!r} ({where})"
        raise DataError(
            f"{path}: invalid UTF-8 at {where}: byte 0x{body[e.start]:02x} ({e.reason}). "
            "The file must be UTF-8; re-save it as UTF-8 (it was probably written as Latin-1 or "
            "Windows-1252)."
        ) from None


def _locate_bad_cell(text: str, fmt: str) -> tuple[int, str] | None:
    """(row, column) of the first cell holding an undecodable byte, if the file still parses.

    `text` was decoded with errors="surrogateescape"; the escaped bytes are swapped for a marker
    character absent from the file, so that pandas (which cannot encode lone surrogates) can parse it.
    """
    if _BAD_BYTE_MARK in text:
        return None
    text = re.sub("[\udc80-\udcff]", _BAD_BYTE_MARK, text)
    try:
        if fmt == "jsonl":
            return _locate_bad_jsonl(text)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            frame = pd.read_csv(io.StringIO(text), **_csv_options(fmt))
    except Exception:  # noqa: BLE001 - only a refinement of the message; the line number stands
        return None
    for row, record in enumerate(frame.itertuples(index=False), 1):
        for column, value in zip(frame.columns, record):
            if isinstance(value, str) and _BAD_BYTE_MARK in value:
                return row, str(column)
    return None


def _locate_bad_jsonl(text: str) -> tuple[int, str] | None:
    row = 0
    for line in text.split("\n"):
        if not line.strip():
            continue
        row += 1
        if _BAD_BYTE_MARK in line:
            record = json.loads(line)
            names = [k for k, v in record.items() if isinstance(v, str) and _BAD_BYTE_MARK in v]
            return (row, names[0]) if names else None
    return None


def _csv_options(fmt: str) -> dict[str, Any]:
    # index_col=False: a row with one field too many is an error, not silently the index column.
    return dict(
        sep="," if fmt == "csv" else "\t", dtype=str, keep_default_na=False, na_filter=False, index_col=False
    )


def _parse_delimited(path: Path, text: str, fmt: str) -> pd.DataFrame:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", pd.errors.ParserWarning)  # "... leads to a loss of data"
            return pd.read_csv(io.StringIO(text), **_csv_options(fmt))
    except pd.errors.ParserWarning:
        raise DataError(
            f"{path}: cannot be read as {_FORMAT_NAMES[fmt]}: a row has more fields than the header line. "
            "Check the quoting (fields holding the separator must be in double quotes)."
        ) from None
    except (pd.errors.ParserError, ValueError) as e:
        raise DataError(
            f"{path}: cannot be read as {_FORMAT_NAMES[fmt]} ({_one_line(e)}). Check the quoting and "
            "that every row has as many fields as the header."
        ) from None


def _parse_jsonl(path: Path, text: str) -> tuple[pd.DataFrame, tuple[int, ...]]:
    records: list[dict] = []
    lines: list[int] = []
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        record = json_line(path, number, line)
        if not isinstance(record, dict):
            raise DataError(
                f"{path}, line {number}: expected a JSON object, got a {type(record).__name__}. Each "
                'line must hold one JSON object, e.g. {"text": "...", "label": "..."}.'
            )
        records.append(record)
        lines.append(number)
    columns = list(dict.fromkeys(k for record in records for k in record))
    frame = pd.DataFrame({c: pd.Series([r.get(c) for r in records], dtype=object) for c in columns})
    return frame, tuple(lines)


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def json_line(path: Path, number: int, line: str) -> Any:
    """One JSONL line's value. Besides bad JSON, a line nested too deep to read and a lone surrogate escape
    (\\ud800: no character, no UTF-8 file or output can hold it) are one DataError naming the line."""
    each = 'Each line must hold one JSON object, e.g. {"text": "...", "label": "..."}.'
    try:
        value = json.loads(line, object_pairs_hook=_unique_keys(path, number))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}, line {number}: not valid JSON ({e.msg} at character {e.colno}). {each}") from None
    except RecursionError:
        raise DataError(f"{path}, line {number}: the JSON is nested too deeply to read. {each}") from None
    if _SURROGATE_ESCAPE.search(line) and not _utf8(value):
        raise DataError(f"{path}, line {number}: a \\ud800-\\udfff escape that is not half of a surrogate pair "
                        "(no character; UTF-8 cannot hold it). Fix the escape or delete it.")
    return value


def _utf8(value: Any) -> bool:
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _unique_keys(path: Path, number: int) -> Callable[[list], dict]:
    def build(pairs: list) -> dict:
        keys = [k for k, _ in pairs]
        repeated = [k for i, k in enumerate(keys) if k in keys[:i]]
        if repeated:
            raise DataError(f"{path}, line {number}: the key {repeated[0]!r} is given twice in one object; "
                            "keep one (only one can be read).")
        return dict(pairs)
    return build


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def _expected_layout(fmt: str, text_column: str, label_column: str | None) -> str:
    columns = [c for c in (text_column, label_column) if c is not None]
    if fmt == "jsonl":
        return f"one JSON object per line with key{'s' if len(columns) > 1 else ''} {' and '.join(map(repr, columns))}"
    return f"a header line naming the columns ({', '.join(map(repr, columns))}, ...) and one row per example"


def _check_column(path: Path | str, fmt: str, found: list, column: str, key: str, what: str) -> None:
    if column not in found:
        shown = [str(c) for c in found]
        raise DataError(
            f"{path}: no column {column!r} (read as {_FORMAT_NAMES[fmt]}); columns found: {shown}. "
            f"Set {key} to the column that holds the {what}."
        )


# ---------------------------------------------------------------- row validation


def _is_missing(value: Any) -> bool:
    if value is None or value is pd.NA:
        return True
    return isinstance(value, float) and math.isnan(value)


def _validated(texts: list, labels: list, source: _Source, pairs: list | None = None) -> pd.DataFrame:
    """Columns text, label (and pair, the second text of each row, for text pairs)."""
    clean_texts = [_text_value(v, source, row) for row, v in enumerate(texts, 1)]
    if source.separator is not None:  # task=multi_label: each cell a tuple of labels
        cells = [_label_set(v, source, row) for row, v in enumerate(labels, 1)]
        _check_label_kinds([label for cell in cells for label in cell], source)
        label_col = pd.Series(cells, dtype=object)
    else:
        clean_labels = [_label_value(v, source, row) for row, v in enumerate(labels, 1)]
        _check_label_kinds(clean_labels, source)
        label_col = pd.Series(clean_labels, dtype="int64" if clean_labels and _is_int(clean_labels[0]) else object)
    return _with_pairs(pd.DataFrame({"text": pd.Series(clean_texts, dtype=object), "label": label_col}), source, pairs)


def _text_value(value: Any, source: _Source, row: int, column: str | None = None) -> str:
    where = source.at(row, column or source.text_column)
    if _is_missing(value) or (isinstance(value, str) and not value.strip()):
        raise DataError(f"{where}: the text is empty or missing. Fill it in or delete the row.")
    if not isinstance(value, str):
        raise DataError(f"{where}: the text must be a string, got {value!r}. Quote it as a string.")
    return value


def _label_value(value: Any, source: _Source, row: int) -> str | int:
    """The label as written: a string stays the string (no stripping, no number parsing)."""
    where = source.at(row, source.label_column)
    if _is_missing(value) or (isinstance(value, str) and not value.strip()):
        raise DataError(f"{where}: the label is missing. Fill it in or delete the row.")
    if _is_int(value) or _is_numpy_int(value):
        return int(value)
    if isinstance(value, str):
        if value.strip() in NA_SPELLINGS and not source.na_labels:
            raise DataError(
                f"{where}: label {value!r} is a common spelling of a missing value; set data.na_labels=true "
                "to keep it as a label, or fix the row."
            )
        return value
    raise DataError(
        f"{where}: label {value!r} is a {type(value).__name__}; labels must be strings or integers. "
        "Fix the label."
    )


def _check_label_kinds(labels: list, source: _Source) -> None:
    if not labels:
        return
    first_is_int = _is_int(labels[0])
    for row, label in enumerate(labels, 1):
        if _is_int(label) != first_is_int:
            kinds = ("an integer", "a string") if first_is_int else ("a string", "an integer")
            raise DataError(
                f"{source.at(row, source.label_column)}: label {label!r} is {kinds[1]} but row 1's label "
                f"{labels[0]!r} is {kinds[0]}; a label column must hold only integers or only strings. "
                "Fix the label."
            )


def check_label_spellings(tables: Sequence[_Table]) -> None:
    """Two labels differing only in case or surrounding spaces (`spam`, `Spam `) are refused: they
    would silently be two classes."""
    first: dict[str, tuple[str, str]] = {}
    for table in tables:
        cells = table.frame["label"].tolist()
        rows = ((row, label) for row, cell in enumerate(cells, 1)
                for label in (cell if table.source.separator is not None else (cell,)))  # multi_label: each label
        for row, label in rows:
            if not isinstance(label, str):
                continue
            folded = label.strip().casefold()
            if folded not in first:
                first[folded] = (label, table.source.at(row, table.source.label_column))
            elif first[folded][0] != label:
                other, where = first[folded]
                raise DataError(
                    f"labels {other!r} ({where}) and {label!r} ({table.source.at(row, table.source.label_column)}) "
                    "differ only in case or surrounding spaces, so they would be two classes; spell them the "
                    "same way."
                )


# ---------------------------------------------------------------- the bundled SMS Spam Collection


def bundled_sms_splits(seed: int = 123, balance: str = "undersample") -> dict[str, pd.DataFrame]:
    """The chapter-6 reference split of the bundled collection: balanced, shuffled, 70/10/20.

    Read with pandas' default quoting on purpose (5,572 rows; see the dataset's SOURCE.md): that is
    how the reference reads it, and its published figures come from exactly this split.
    `balance="none"` keeps every message (13% spam) and splits the same way.
    """
    df = pd.read_csv(BUNDLED_SMS_PATH, sep="\t", header=None, names=["Label", "Text"])
    if balance == "undersample":
        spam = df[df["Label"] == "spam"]
        ham = df[df["Label"] == "ham"].sample(len(spam), random_state=seed)
        df = pd.concat([ham, spam])
    shuffled = df.sample(frac=1, random_state=seed).reset_index(drop=True)
    train_end = int(len(shuffled) * 0.7)
    val_end = train_end + int(len(shuffled) * 0.1)
    parts = {"train": shuffled[:train_end], "val": shuffled[train_end:val_end], "test": shuffled[val_end:]}
    return {
        name: pd.DataFrame({"text": part["Text"].tolist(), "label": part["Label"].tolist()})
        for name, part in parts.items()
    }


# ---------------------------------------------------------------- load_data


def load_data(cfg: DataConfig, context_length: int, saved_split: DataSplit | None = None,
              task: str = "single_label", tokenizer: Any = GPT2_BPE) -> DataBundle:
    """Read, validate, map labels, tokenize and truncate every split (before any training).

    A data.train_file that is split (cfg.split_fractions()) is split as `saved_split` records (a run's
    own record: resume, evaluate), else afresh (a new run; the bundle's `split` is then written to the
    run folder)."""
    tables, record = _load_tables(cfg, saved_split, task)
    check_label_spellings(list(tables.values()))
    for split, table in tables.items():
        if len(table.frame) == 0:
            raise DataError(
                f"{table.source.name}: the {split} split has no rows. Add examples (one row each, "
                "below the header) or point the config at another file."
            )
    label_map, labels, scale = _split_labels(tables, cfg.label_column, task)
    tokens = {split: _tokenize(table, tokenizer) for split, table in tables.items()}  # (text ids, pair ids or None)
    joint = pair_separator(tokenizer) if cfg.text_pair_column is not None else PAIR_SEPARATOR  # a pair's separator
    texts = {split: table.frame["text"].tolist() for split, table in tables.items()}
    user_data = cfg.train_file is not None or cfg.dataset_dir is not None  # the bundled split is balanced already
    if cfg.balance == "undersample" and user_data:
        keep = undersample_indices(labels["train"])
        labels["train"], tokens["train"], texts["train"] = (
            [column[i] for i in keep] for column in (labels["train"], tokens["train"], texts["train"]))
    max_length = _max_length(cfg, context_length, [full_length(*row, joint) for row in tokens["train"]])
    if cfg.text_pair_column is not None:
        _check_pair_room(max_length, joint, special_count(tokenizer))
    if cfg.chunk_stride is not None and cfg.chunk_stride > max_length:
        raise DataError(f"data.chunk_stride: {cfg.chunk_stride} is more than max_length ({max_length}, the longest "
                        "training example), so windows would skip tokens; lower it")
    if cfg.head_tokens is not None and cfg.head_tokens >= max_length:
        raise DataError(f"data.head_tokens: {cfg.head_tokens} must be below max_length ({max_length}, the longest "
                        "training example), so that the tail keeps some tokens; lower it")
    datasets: dict[str, ClassificationDataset] = {}
    truncated: dict[str, int] = {}
    for name in tables:
        if cfg.long_texts == "chunk":
            datasets[name] = windowed([ids for ids, _ in tokens[name]], labels[name], texts[name], max_length,
                                      cfg.chunk_stride)
            truncated[name] = 0  # every token is read
            continue
        truncated[name] = sum(full_length(*row, joint) > max_length for row in tokens[name])
        ids = [fit_example(*row, max_length, cfg.long_texts, cfg.head_tokens, joint) for row in tokens[name]]
        datasets[name] = ClassificationDataset(ids, labels[name], texts[name])
    return DataBundle(datasets["train"], datasets["val"], datasets.get("test"), label_map, max_length, truncated,
                      record, scale)


def _split_labels(tables: dict[str, _Table], label_column: str, task: str,
                  ) -> tuple[LabelMap, dict[str, list], TargetScale | None]:
    """The label map (from the training split) and each split's targets: class ids, multi-hot rows, or
    standardized values (task=regression, with the scale that undoes it)."""
    train = tables["train"]
    if task == "regression":  # the targets, standardized with the training split's mean and deviation
        label_map = LabelMap(target_columns(label_column))
        scale = TargetScale.of(label_map.labels, [list(v) for v in train.frame["label"]])
        for name, mean, std in zip(scale.names, scale.mean, scale.std):
            if not (math.isfinite(mean) and math.isfinite(std)):
                raise DataError(f"{train.source.name}, column {name!r}: the targets are too large to "
                                f"standardize (mean {mean:g}, standard deviation {std:g}); rescale them, e.g. to "
                                "thousands or a logarithm.")
        return label_map, {split: scale.standardize([list(v) for v in table.frame["label"]])
                           for split, table in tables.items()}, scale
    if task == "multi_label":  # multi-hot rows over the labels of the training split
        label_map = _label_map_from_train(train, multi=True)
        return label_map, {split: _multi_hot(table, label_map, train.source.name)
                           for split, table in tables.items()}, None
    label_map = _label_map_from_train(train)
    return label_map, {split: _label_ids(table, label_map, train.source.name) for split, table in tables.items()}, None


def _load_tables(cfg: DataConfig, saved: DataSplit | None,
                 task: str = "single_label") -> tuple[dict[str, _Table], DataSplit | None]:
    """The tables of the splits the config gives (train, val, and test unless there is none), in that order."""
    regression, separator = task == "regression", cfg.label_separator if task == "multi_label" else None
    if cfg.dataset_dir is not None:
        return _dataset_dir_tables(cfg, saved, regression, separator)
    files = {"train": cfg.train_file, "val": cfg.val_file, "test": cfg.test_file}
    if all(f is None for f in files.values()):
        return {
            split: _bundled_table(split, frame)
            for split, frame in bundled_sms_splits(balance="none" if cfg.balance == "none" else "undersample").items()
        }, None
    if cfg.train_file is None:  # the config refuses it; a DataConfig built by hand may not
        raise DataError("data.val_file / data.test_file set without data.train_file: set data.train_file too, or "
                        "none of the three for the bundled SMS Spam Collection.")
    tables = {
        split: _read_file(path, cfg.text_column, cfg.label_column, key=f"data.{split}_file", na_labels=cfg.na_labels,
                          pair_column=cfg.text_pair_column, regression=regression, separator=separator)
        for split, path in files.items() if path is not None
    }
    fractions = cfg.split_fractions()
    if fractions is None:
        return tables, None
    whole = tables.pop("train")
    split = _split_of(cfg, whole, fractions, saved)
    tables.update({name: _rows_of(whole, name, rows) for name, rows in split.indices.items()})
    return {name: tables[name] for name in SPLITS if name in tables}, split


def _dataset_dir_tables(cfg: DataConfig, saved: DataSplit | None, regression: bool = False,
                        separator: str | None = None) -> tuple[dict[str, _Table], DataSplit | None]:
    """The splits of data.dataset_dir; without a validation split, its train split is split by data.split as
    data.train_file is (as `saved` records, if given; the record's sha256 is over the folder's .arrow files)."""
    tables = {}
    targets = target_columns(cfg.label_column) if regression else None
    label_column = targets[0] if targets else cfg.label_column
    typed_labels = not regression and separator is None  # numbers, label lists: our own checks, per cell
    for split, (name, frame) in read_dataset_dir(cfg.dataset_dir, cfg.text_column,
                                                 label_column if typed_labels else None).items():
        wanted = [(cfg.text_column, "data.text_column", "text")]
        wanted += [(c, "data.label_column", "numeric target") for c in targets] if targets else [
            (cfg.label_column, "data.label_column", "labels")]
        if cfg.text_pair_column is not None:
            wanted.append((cfg.text_pair_column, "data.text_pair_column", "second text of each pair"))
        for column, key, what in wanted:
            _check_column(name, "dataset", list(frame.columns), column, key, what)
        source = _Source(name, cfg.text_column, label_column, None, cfg.na_labels,
                         pair_column=cfg.text_pair_column, targets=targets, separator=separator)
        tables[split] = _Table(_validated_frame(frame, source), source)
    fractions = _dataset_dir_fractions(cfg, tables)
    if fractions is None:
        return tables, None
    whole = tables.pop("train")
    check_label_spellings([whole])
    labels = whole.frame["label"].tolist()
    split = saved if saved is not None else _new_folder_split(cfg, whole, fractions)
    sha256 = folder_sha256(cfg.dataset_dir) if saved is not None else split.sha256
    if (sha256, len(labels)) != (split.sha256, split.rows):
        raise SplitError(
            f"data.dataset_dir {cfg.dataset_dir} changed since the run split it: {split.origin or 'its record'} "
            f"records {split.rows} rows with sha256 {split.sha256[:12]}..., the folder's .arrow files now have "
            f"{len(labels)} rows with sha256 {sha256[:12]}.... Put the original folder back, evaluate a labelled "
            "file with --data FILE, or train a new run (another output_dir, or --overwrite).")
    tables.update({name: _rows_of(whole, name, rows) for name, rows in split.indices.items()})
    return {name: tables[name] for name in SPLITS if name in tables}, split


def _new_folder_split(cfg: DataConfig, whole: _Table, fractions: tuple[float, ...]) -> DataSplit:
    labels = _strata(whole)
    check_every_label_in_every_part(labels, fractions, whole.source.name)
    parts = stratified_split(labels, fractions, cfg.split_seed)
    return DataSplit(str(cfg.dataset_dir), folder_sha256(cfg.dataset_dir), len(labels), fractions, cfg.split_seed,
                     {name: tuple(part) for name, part in zip(SPLITS, parts)})


def _dataset_dir_fractions(cfg: DataConfig, tables: dict[str, _Table]) -> tuple[float, ...] | None:
    if "val" in tables:
        if cfg.split is not None:
            raise SplitError(f"data.split: {list(cfg.split)} has nothing to split: {cfg.dataset_dir} has a "
                             "validation split; remove data.split.")
        return None
    if cfg.split is None:
        return SPLIT_DEFAULT_VAL if "test" in tables else SPLIT_DEFAULT
    if "test" in tables and len(cfg.split) != 2:
        raise SplitError(f"data.split: {list(cfg.split)} has three fractions but {cfg.dataset_dir} has a test split, "
                         "so its train split is split into [train, val] only: give two fractions (e.g. [0.9, 0.1]).")
    return cfg.split


def _split_of(cfg: DataConfig, whole: _Table, fractions: tuple[float, ...], saved: DataSplit | None) -> DataSplit:
    """The run's recorded split of data.train_file (checked against the file), or a new one."""
    if saved is not None:
        saved.check_source(cfg.train_file, len(whole.frame))
        return saved
    check_label_spellings([whole])  # before the labels are grouped for stratification
    return DataSplit.make(cfg.train_file, _strata(whole), fractions, cfg.split_seed)


def _strata(table: _Table) -> list:
    """What a split is stratified by: the labels; numeric targets and label sets (regression, multi_label) are
    not (too many distinct values): one stratum."""
    single = table.source.targets is None and table.source.separator is None
    return table.frame["label"].tolist() if single else [0] * len(table.frame)


def _rows_of(table: _Table, name: str, rows: Sequence[int]) -> _Table:
    """The split `name` of a file: its rows at these 0-based positions, named by their rows in the file."""
    frame = table.frame.iloc[list(rows)].reset_index(drop=True)
    source = dataclasses.replace(table.source, name=f"{table.source.name} ({name} split)",
                                 rows=tuple(i + 1 for i in rows))
    return _Table(frame, source)


def undersample_indices(labels: Sequence[int], seed: int = BALANCE_SEED) -> list[int]:
    """Row indices keeping every label's rows down to the rarest label's count (drawn with a fixed
    seed); rows keep their order. Already balanced: every row."""
    by_label: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_label.setdefault(label, []).append(i)
    smallest = min(len(rows) for rows in by_label.values())
    rng = np.random.RandomState(seed)
    keep = [i for label in sorted(by_label)
            for i in (by_label[label] if len(by_label[label]) == smallest
                      else rng.choice(by_label[label], smallest, replace=False).tolist())]
    return sorted(keep)


def _bundled_table(split: str, frame: pd.DataFrame) -> _Table:
    source = _Source(f"bundled SMS Spam Collection ({BUNDLED_SMS_PATH.name}, {split} split)")
    return _Table(_validated(frame["text"].tolist(), frame["label"].tolist(), source), source)


def _label_map_from_train(train: _Table, multi: bool = False) -> LabelMap:
    cells = train.frame["label"].tolist()
    labels = sorted_labels({label for cell in cells for label in cell} if multi else set(cells))
    if multi and not labels:
        raise DataError(f"{train.source.name}: no row of the training split has a label; task=multi_label needs "
                        "labels to learn (cells of labels joined by data.label_separator).")
    if multi:
        return LabelMap(tuple(labels))
    if len(labels) < 2:
        raise DataError(
            f"{train.source.name}: the training split has only one label ({labels[0]!r}); a classifier "
            "needs examples of at least two labels."
        )
    return LabelMap(tuple(labels))


def _label_ids(table: _Table, label_map: LabelMap, train_name: str) -> list[int]:
    index = {label: i for i, label in enumerate(label_map.labels)}
    ids = []
    for row, label in enumerate(table.frame["label"].tolist(), 1):
        label = _coerce_label(label, label_map.is_int)
        if label not in index:
            raise DataError(
                f"{table.source.at(row, table.source.label_column)}: label {label!r} does not occur in "
                f"the training split ({train_name}); known labels: {list(label_map.labels)!r}. Fix the "
                "label, or add examples of it to the training data."
            )
        ids.append(index[label])
    return ids


def _multi_hot(table: _Table, label_map: LabelMap, train_name: str) -> list[list[float]]:
    """task=multi_label: each row's labels as 0/1 per label of the run."""
    index = {label: i for i, label in enumerate(label_map.labels)}
    rows = []
    for row, cell in enumerate(table.frame["label"].tolist(), 1):
        hot = [0.0] * len(index)
        for label in cell:
            label = _coerce_label(label, label_map.is_int)
            if label not in index:
                raise DataError(f"{table.source.at(row, table.source.label_column)}: label {label!r} does not occur in "
                                f"the training split ({train_name}); known labels: {list(label_map.labels)!r}. Fix the "
                                "label, or add examples of it to the training data.")
            hot[index[label]] = 1.0
        rows.append(hot)
    return rows


def _tokenize(table: _Table, tokenizer: Any) -> list[tuple[list[int], list[int] | None]]:
    """Each row's token ids, and its pair's (None without text pairs); `tokenizer`: families.load_tokenizer's."""
    encode_batch = tokenizer.encode_batch
    token_ids = encode_batch(table.frame["text"].tolist())
    columns = [(token_ids, table.source.text_column)]
    pair_ids = None
    if "pair" in table.frame:
        pair_ids = encode_pairs(tokenizer, table.frame["pair"].tolist())  # without a second <|begin_of_text|>
        columns.append((pair_ids, table.source.pair_column))
    for ids_of_column, column in columns:
        for row, ids in enumerate(ids_of_column, 1):
            if not ids:
                raise DataError(f"{table.source.at(row, column)}: the text is empty (zero tokens). Fill it in or "
                                "delete the row.")
    return list(zip(token_ids, pair_ids if pair_ids is not None else [None] * len(token_ids)))


def _max_length(cfg: DataConfig, context_length: int, train_lengths: list[int]) -> int:
    if cfg.max_length is None:
        return min(max(train_lengths), context_length)
    if not 1 <= cfg.max_length <= context_length:
        raise DataError(
            f"data.max_length: {cfg.max_length} must be between 1 and the model's context length "
            f"({context_length}); lower it or leave it unset (null) for the longest training example."
        )
    return cfg.max_length


def _check_pair_room(max_length: int, separator: tuple[int, ...], specials: int) -> None:
    """A pair needs a token of each text, the separator and the tokenizer's own tokens (the config checks GPT-2's;
    a decoder's may be longer)."""
    least = min_pair_length(separator, specials)
    if max_length < least:
        added = f" and the tokenizer's {specials} special token(s)" if specials else ""
        raise DataError(f"data.max_length: {max_length} leaves no room for a text pair (a token of each text, the "
                        f"{len(separator)}-token separator{added}); give at least {least}")


# ---------------------------------------------------------------- files given to evaluate / predict


def load_eval_file(path: str | Path, text_column: str, label_column: str, label_map: LabelMap, max_length: int,
                   keys: tuple[str, str, str] = ("--data", "--text-column", "--label-column"),
                   long_texts: str = "truncate", head_tokens: int | None = None,
                   pair_column: str | None = None, chunk_stride: int | None = None,
                   scale: TargetScale | None = None, separator: str | None = None, tokenizer: Any = GPT2_BPE,
                   ) -> tuple[ClassificationDataset, int]:
    """A labelled file read, validated, mapped with the run's labels and cut to max_length as in training.

    Returns the dataset and how many texts were truncated. `keys` name the settings that chose the
    file and its columns, for messages.
    """
    # NA / NaN ... are labels here exactly when the run trained with such a label (data.na_labels=true).
    na_labels = any(isinstance(label, str) and label.strip() in NA_SPELLINGS for label in label_map.labels)
    table = _read_file(path, text_column, scale.names if scale else label_column, key=keys[0],
                       column_keys=(keys[1], keys[2]), na_labels=na_labels, pair_column=pair_column,
                       pair_key="--text-pair-column", regression=scale is not None, separator=separator)
    check_label_spellings([table])
    _check_not_empty(table.source.name, len(table.frame))
    if scale is not None:  # task=regression: the run's targets, standardized as in training
        labels = scale.standardize([list(v) for v in table.frame["label"]])
    elif separator is not None:  # task=multi_label
        labels = _multi_hot(table, label_map, "the run's training data")
    else:
        labels = _label_ids(table, label_map, "the run's training data")
    tokens = _tokenize(table, tokenizer)
    if long_texts == "chunk":
        return windowed([ids for ids, _ in tokens], labels, table.frame["text"].tolist(), max_length, chunk_stride), 0
    joint = pair_separator(tokenizer) if pair_column is not None else PAIR_SEPARATOR  # as the run's training joined
    truncated = sum(full_length(*row, joint) > max_length for row in tokens)
    dataset = ClassificationDataset([fit_example(*row, max_length, long_texts, head_tokens, joint) for row in tokens],
                                    labels, table.frame["text"].tolist())
    return dataset, truncated


def windowed(token_ids: list[list[int]], labels: list[int], texts: list[str], max_length: int,
             stride: int | None) -> ClassificationDataset:
    """data.long_texts=chunk: one item per window, each with its text's label and row (`doc_ids`)."""
    items, item_labels, item_texts, doc_ids = [], [], [], []
    for doc, (ids, label, text) in enumerate(zip(token_ids, labels, texts)):
        for window in windows(ids, max_length, stride):
            items.append(window)
            item_labels.append(label)
            item_texts.append(text)
            doc_ids.append(doc)
    return ClassificationDataset(items, item_labels, item_texts, doc_ids)


def read_texts(path: str | Path, text_column: str,
               keys: tuple[str, str] = ("--input", "--text-column")) -> tuple[pd.DataFrame, list[str]]:
    """Every column of an unlabelled file, as read, and its validated texts."""
    path = Path(path)
    frame, fmt, lines = _read_frame(path, text_column, None, keys[0])
    _check_column(path, fmt, list(frame.columns), text_column, keys[1], "text")
    _check_not_empty(str(path), len(frame))
    source = _Source(str(path), text_column, text_column, lines)
    return frame, [_text_value(v, source, row) for row, v in enumerate(frame[text_column].tolist(), 1)]


def read_pairs(frame: pd.DataFrame, path: str | Path, pair_column: str, key: str = "--text-pair-column") -> list[str]:
    """The validated second texts of a file `read_texts` read, for a model trained on text pairs."""
    fmt = _check_path(Path(path), None)
    _check_column(Path(path), fmt, list(frame.columns), pair_column, key, "second text of each pair")
    source = _Source(str(path), pair_column, pair_column)
    return [_text_value(v, source, row) for row, v in enumerate(frame[pair_column].tolist(), 1)]


def _check_not_empty(name: str, rows: int) -> None:
    if rows == 0:
        raise DataError(f"{name}: the file has no rows; add examples (one row each, below the header).")


# ---------------------------------------------------------------- batching


@dataclass(frozen=True)
class PadCollate:
    """Right-pads a batch of (token ids, label id); `lengths` says where padding starts.

    A class rather than a closure so that DataLoader workers started by `spawn` can pickle it.
    """

    padding: str
    max_length: int
    pad_id: int = PAD_ID

    def __call__(self, batch: Sequence[tuple[Sequence[int], int]]) -> dict[str, torch.Tensor]:
        if not batch:
            raise ValueError("cannot collate an empty batch")
        lengths = [len(ids) for ids, _ in batch]
        if min(lengths) < 1 or max(lengths) > self.max_length:
            raise ValueError(f"sequence lengths must be between 1 and max_length={self.max_length}, got {lengths}")
        if self.padding == "none" and min(lengths) != max(lengths):
            raise ValueError(f"padding 'none' needs batches of one example (or of equal lengths), got {lengths}")
        width = self.max_length if self.padding == "fixed" else max(lengths)
        input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        for row, (ids, _) in enumerate(batch):
            input_ids[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        return {
            "input_ids": input_ids,
            "lengths": torch.tensor(lengths, dtype=torch.long),
            # class ids; or each row's standardized targets (task=regression), float32
            "labels": torch.tensor([label for _, label in batch],
                                   dtype=torch.float32 if isinstance(batch[0][1], list) else torch.long),
        }


def make_collate(padding: str, max_length: int, pad_id: int = PAD_ID) -> Callable:
    if padding not in ("fixed", "longest", "none"):
        raise ValueError(f"padding must be 'fixed', 'longest' or 'none', got {padding!r}")
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    return PadCollate(padding, max_length, pad_id)
