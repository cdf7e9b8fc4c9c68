"""Data that is not text: Parquet files (pyarrow) and folders written by `datasets`' `save_to_disk`.

Both arrive as Arrow columns, read as written, as JSONL is: a string column gives string labels, an
integer column integer labels, a null is a missing cell. A float or boolean label column is refused
(1.0 or True is not a label as written; cast the column). A `ClassLabel` column gives its names, so the
run's label map is readable. Each optional library is imported only when such data is read; without it
the message is one line naming the extra to install.
"""
from __future__ import annotations

import hashlib
import importlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import pandas as pd

from .errors import UserError

# The split names of a DatasetDict each of our splits is found under (the first present is used).
DATASET_SPLITS = {"train": ("train",), "val": ("validation", "val", "valid", "dev"), "test": ("test",)}
_NO_LABEL = -1  # ClassLabel's "no label" (e.g. the test split of GLUE tasks)


class FormatError(UserError, ValueError):
    """Data that cannot be read in its format (names the file or folder, the column and the fix)."""


def optional(module: str, extra: str, what: str) -> ModuleType:
    """An optional library, or one line saying which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise FormatError(f"{what} needs the {module} library, which is not installed: "
                          f"pip install -e '.[{extra}]'") from None


# ---------------------------------------------------------------- Arrow columns


def _kind(arrow_type: Any) -> str:
    import pyarrow as pa
    if pa.types.is_dictionary(arrow_type):
        return _kind(arrow_type.value_type)
    for kind, test in (("string", pa.types.is_string), ("string", pa.types.is_large_string),
                       ("integer", pa.types.is_integer), ("null", pa.types.is_null)):
        if test(arrow_type):
            return kind
    return str(arrow_type)


def _check_types(table: Any, where: str, text_column: str, label_column: str | None,
                 class_label: bool) -> None:
    names = table.column_names
    if text_column in names and _kind(table.schema.field(text_column).type) not in ("string", "null"):
        raise FormatError(f"{where}: column {text_column!r} holds {table.schema.field(text_column).type}, not "
                          "text; point the text column setting at the column of strings, or cast it to string.")
    if label_column in names and not class_label:
        kind = _kind(table.schema.field(label_column).type)
        if kind not in ("string", "integer", "null"):
            raise FormatError(
                f"{where}: column {label_column!r} holds {kind} values; labels are read as written and must be "
                "strings or integers (1.0 or true is ambiguous). Cast the column to string or int64.")


def arrow_frame(table: Any, where: str, text_column: str, label_column: str | None,
                class_names: list[str] | None = None) -> pd.DataFrame:
    """Every column of an Arrow table as Python values (ints stay ints, nulls are None), after the text
    and label columns' types are checked; `class_names` turns a ClassLabel label column into its names."""
    _check_types(table, where, text_column, label_column, class_names is not None)
    columns = {}
    for name in table.column_names:
        values = table.column(name).to_pylist()
        if name == label_column and class_names is not None:
            values = [None if v is None or v == _NO_LABEL else class_names[v] for v in values]
        columns[name] = pd.Series(values, dtype=object)
    return pd.DataFrame(columns)


# ---------------------------------------------------------------- Parquet


def read_parquet(path: Path, text_column: str, label_column: str | None) -> pd.DataFrame:
    optional("pyarrow", "parquet", f"{path}: reading a .parquet file")
    import pyarrow.parquet as pq
    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several kinds for a damaged file
        raise FormatError(f"{path}: cannot be read as Parquet ({' '.join(str(e).split())[:160]}); check that it "
                          "is a whole Parquet file (re-export it).") from None
    table = _without_pandas_index(table)
    repeated = [n for i, n in enumerate(table.column_names) if n in table.column_names[:i]]
    if repeated:
        raise FormatError(f"{path}: the column {repeated[0]!r} is there twice; rename one of them "
                          "(only one can be read).")
    return arrow_frame(table, str(path), text_column, label_column)


def _without_pandas_index(table: Any) -> Any:
    """A frame's index that pandas stored as a column (`__index_level_0__`) is not data."""
    index = (table.schema.pandas_metadata or {}).get("index_columns", [])
    names = [n for n in index if isinstance(n, str) and n.startswith("__index_level_")]
    return table.drop_columns(names) if names else table


def write_parquet(frame: pd.DataFrame, path: Path) -> None:
    optional("pyarrow", "parquet", f"--output {path}: writing a .parquet file")
    frame.to_parquet(path, index=False, engine="pyarrow")


# ---------------------------------------------------------------- datasets.save_to_disk folders


@contextmanager
def _offline() -> Iterator[None]:
    saved = os.environ.get("HF_DATASETS_OFFLINE")
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("HF_DATASETS_OFFLINE", None)
        else:
            os.environ["HF_DATASETS_OFFLINE"] = saved


def read_dataset_dir(folder: str | Path, text_column: str, label_column: str) -> dict[str, tuple[str, pd.DataFrame]]:
    """Our splits (train, val, test as present) of a saved Dataset or DatasetDict: (name in messages, frame).
    A single Dataset is the train split."""
    folder = Path(folder)
    key = "data.dataset_dir"
    if not folder.is_dir():
        raise FormatError(f"{key}: {folder} is not a folder; point it at a folder written by "
                          "Dataset.save_to_disk or DatasetDict.save_to_disk.")
    with _offline():
        datasets = optional("datasets", "datasets", f"{key}: {folder}")
        try:
            loaded = datasets.load_from_disk(str(folder))
        except (FileNotFoundError, ValueError, OSError) as e:
            raise FormatError(f"{key}: {folder} is not a saved dataset ({' '.join(str(e).split())[:160]}); "
                              "write it with Dataset.save_to_disk or DatasetDict.save_to_disk.") from None
    found = {"train": ("train", loaded)} if isinstance(loaded, datasets.Dataset) else _our_splits(folder, dict(loaded))
    out = {}
    for split, (name, ds) in found.items():
        where = f"{folder} ({name} split)"
        feature = ds.features.get(label_column)
        names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
        out[split] = where, arrow_frame(ds.with_format("arrow")[:], where, text_column, label_column, names)
    return out


def _our_splits(folder: Path, named: dict[str, Any]) -> dict[str, tuple[str, Any]]:
    found: dict[str, tuple[str, Any]] = {}
    for split, names in DATASET_SPLITS.items():
        present = [n for n in names if n in named]
        if len(present) > 1:
            raise FormatError(f"data.dataset_dir: {folder} has splits {present}, which all name the {split} split; "
                              "keep one of them.")
        if present:
            found[split] = (present[0], named[present[0]])
    if "train" not in found:
        raise FormatError(f"data.dataset_dir: {folder} has no 'train' split (splits: {sorted(named)}); name the "
                          "training split 'train' (validation: 'validation', 'val', 'valid' or 'dev'; 'test').")
    return found


def folder_sha256(folder: str | Path) -> str:
    """The data of a saved dataset: its .arrow files (relative path and bytes, in path order)."""
    digest = hashlib.sha256()
    folder = Path(folder)
    for path in sorted(folder.rglob("*.arrow")):
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
