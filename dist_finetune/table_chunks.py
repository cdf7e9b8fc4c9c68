"""Tables read and written in pieces, for files larger than memory: CSV / TSV / JSONL / Parquet read `rows` at a
time (every column as `data.read_texts` reads it), and part files of one table joined into one file.
"""
from __future__ import annotations

import csv
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

# read_texts' own checks and messages, applied one piece at a time
from .data import (_FORMAT_NAMES, FORMATS, DataError, _check_unique_columns, _csv_options, _expected_layout,
                   json_line)
from .formats import FormatError, arrow_frame, optional


# ---------------------------------------------------------------- reading the input in shards


@dataclass(frozen=True)
class Source:
    path: Path
    text_column: str
    pair_column: str | None  # a model of text pairs: the column of second texts

    @property
    def fmt(self) -> str | None:
        return FORMATS.get(self.path.suffix.lower())


def shards(source: Source, rows: int, columns: list[str] | None = None) -> Iterator[pd.DataFrame]:
    """The input's rows, `rows` at a time (the last shard: the rest), every column as read_texts reads it;
    `columns`: a JSONL file's keys (each shard gets them all, in this order)."""
    if source.fmt == "parquet":
        frames = _parquet_frames(source.path, rows, source.text_column)
    elif source.fmt == "jsonl":
        frames = _jsonl_frames(source.path, rows, columns)
    else:
        frames = _csv_frames(source.path, source.fmt, rows, source.text_column)
    return _exact(frames, rows)


def _exact(frames: Iterator[pd.DataFrame], rows: int) -> Iterator[pd.DataFrame]:
    """Frames of exactly `rows` rows (the last one: the rest) from frames of any size."""
    held: list[pd.DataFrame] = []
    count = 0
    for frame in frames:
        if len(frame):
            held.append(frame)
            count += len(frame)
        while count >= rows:
            whole = pd.concat(held, ignore_index=True) if len(held) > 1 else held[0].reset_index(drop=True)
            yield whole.iloc[:rows].reset_index(drop=True)
            held = [whole.iloc[rows:]] if count > rows else []
            count -= rows
    if count:
        yield pd.concat(held, ignore_index=True)


def _csv_frames(path: Path, fmt: str, rows: int, text_column: str) -> Iterator[pd.DataFrame]:
    try:
        with pd.read_csv(path, chunksize=rows, **_csv_options(fmt)) as reader:
            yield from reader
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: invalid UTF-8 ({e.reason}, byte 0x{e.object[e.start]:02x}). The file must be "
                        "UTF-8; re-save it as UTF-8 (it was probably written as Latin-1 or Windows-1252).") from None
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: the file is empty; it needs {_expected_layout(fmt, text_column, None)}.") from None
    except (pd.errors.ParserError, ValueError) as e:
        raise DataError(f"{path}: cannot be read as {_FORMAT_NAMES[fmt]} ({' '.join(str(e).split())}). Check the "
                        "quoting and that every row has as many fields as the header.") from None


def csv_header(path: Path, fmt: str, text_column: str) -> list[str]:
    """The header's column names as pandas reads them; a name there twice is refused (pandas would rename it)."""
    frames = _csv_frames(path, fmt, 1, text_column)
    try:
        columns = [str(c) for c in next(frames).columns]
    finally:
        frames.close()
    with path.open(encoding="utf-8-sig", errors="replace", newline="") as f:
        first = next((fields for fields in csv.reader(f, delimiter="," if fmt == "csv" else "\t") if fields), [])
    _check_unique_columns(path, first)
    return columns


def _jsonl_frames(path: Path, rows: int, columns: list[str] | None) -> Iterator[pd.DataFrame]:
    records: list[dict] = []
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            record = _jsonl_record(path, raw[3:] if number == 1 and raw.startswith(b"\xef\xbb\xbf") else raw, number)
            if record is not None:
                records.append(record)
            if len(records) == rows:
                yield _records_frame(records, columns)
                records = []
    if records:
        yield _records_frame(records, columns)


def _jsonl_record(path: Path, raw: bytes, number: int) -> dict | None:
    """One line's object (None for a blank line), with read_texts' messages."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}, line {number}: invalid UTF-8 ({e.reason}, byte 0x{raw[e.start]:02x}). The file "
                        "must be UTF-8; re-save it as UTF-8.") from None
    if not line.strip():
        return None
    record = json_line(path, number, line)
    if not isinstance(record, dict):
        raise DataError(f"{path}, line {number}: expected a JSON object, got a {type(record).__name__}. Each line "
                        'must hold one JSON object, e.g. {"text": "...", "label": "..."}.')
    return record


def _records_frame(records: list[dict], columns: list[str] | None) -> pd.DataFrame:
    names = columns if columns is not None else list(dict.fromkeys(k for r in records for k in r))
    return pd.DataFrame({c: pd.Series([r.get(c) for r in records], dtype=object) for c in names})


def _parquet_frames(path: Path, rows: int, text_column: str) -> Iterator[pd.DataFrame]:
    pq = optional("pyarrow.parquet", "parquet", f"{path}: reading a .parquet file")
    try:
        parquet = pq.ParquetFile(path)
        names = parquet_columns(path, parquet.schema_arrow)
        for batch in parquet.iter_batches(batch_size=rows, columns=names):
            yield arrow_frame(_table(batch), str(path), text_column, None)
    except FormatError:
        raise
    except (OSError, ValueError, TypeError) as e:  # pyarrow's ArrowException kinds
        raise FormatError(f"{path}: cannot be read as Parquet ({' '.join(str(e).split())[:160]}); check that it "
                          "is a whole Parquet file (re-export it).") from None


def _table(batch: Any) -> Any:
    import pyarrow as pa
    return pa.Table.from_batches([batch])


def parquet_columns(path: Path, schema: Any) -> list[str]:
    """The data columns (not the index pandas stored), each name once."""
    index = (schema.pandas_metadata or {}).get("index_columns", [])
    names = [n for n in schema.names if not (n in index and n.startswith("__index_level_"))]
    repeated = [n for i, n in enumerate(names) if n in names[:i]]
    if repeated:
        raise FormatError(f"{path}: the column {repeated[0]!r} is there twice; rename one of them (only one can be "
                          "read).")
    return names



# ---------------------------------------------------------------- joining parts


def join_text(paths: list[Path], tmp: Path, fmt: str) -> None:
    """CSV / TSV: the header once, then every part's rows; JSONL: every part's lines."""
    header = _csv_header_bytes(paths[0], fmt) if fmt in ("csv", "tsv") else b""
    with open(tmp, "wb") as out:
        out.write(header)
        for path in paths:
            with open(path, "rb") as part:
                if header and part.read(len(header)) != header:
                    raise RuntimeError(f"{path}: its header differs from the first part's")
                shutil.copyfileobj(part, out, 1 << 20)


def _csv_header_bytes(path: Path, fmt: str) -> bytes:
    sep = "," if fmt == "csv" else "\t"
    columns = pd.read_csv(path, nrows=0, sep=sep, dtype=str).columns
    return pd.DataFrame(columns=columns).to_csv(index=False, sep=sep).encode("utf-8")


def join_parquet(paths: list[Path], tmp: Path, output: Path) -> None:
    import pyarrow.parquet as pq

    schema = common_schema([pq.read_schema(p) for p in paths], output)
    with pq.ParquetWriter(tmp, schema) as writer:
        for path in paths:
            with one_type_per_column(output):
                writer.write_table(pq.read_table(path).cast(schema))


def common_schema(schemas: list[Any], output: Path) -> Any:
    """The parts' schema: each column's types in the parts, unified (a column all null in one part, a struct field
    or a list item all null there, takes its type in the others; ints and floats become floats)."""
    import pyarrow as pa

    first = schemas[0]
    if any(s.names != first.names for s in schemas):
        raise RuntimeError("the parts do not have the same columns")
    with one_type_per_column(output):
        unified = pa.unify_schemas([s.remove_metadata() for s in schemas], promote_options="permissive")
    nulls = [sum(pa.types.is_null(f.type) for f in s) for s in schemas]
    return unified.with_metadata(schemas[nulls.index(min(nulls))].metadata)


@contextmanager
def one_type_per_column(output: Path) -> Iterator[None]:
    """Writing Parquet: a column of values of two types (Arrow's error) is one DataError naming --output."""
    import pyarrow as pa

    try:
        yield
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as e:
        raise DataError(f"--output {output}: a column holds values of one type in some rows and of another in "
                        f"others ({' '.join(str(e).split())[:160]}); a Parquet column has one type: make the input "
                        "column's values one type, or write .csv or .jsonl") from None
