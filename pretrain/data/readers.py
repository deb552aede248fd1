"""Readers for corpus formats: text and JSONL (plain, ``.gz``, ``.zst``), Parquet and Arrow.

Every input file becomes one or more *units*: a whole file, or one row group of a Parquet
file (so a few huge Parquet files still split over many workers and cluster shards). A unit
knows its size in bytes without being read, which is what packing groups and cluster shards
are planned from. Problems (unreadable file, missing column, wrong type) are UserErrors
naming the file.
"""

from __future__ import annotations

import gzip
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from pretrain.errors import UserError

JSONL_SUFFIXES = (".jsonl", ".ndjson")  # before .gz/.zst
COMPRESSED = (".gz", ".zst", ".zstd")
_BATCH_ROWS = 1024


@dataclass(frozen=True)
class Unit:
    """A piece of input read as one stream of documents."""

    path: Path
    kind: str  # text | jsonl | parquet | arrow
    part: int  # Parquet row group (0 for every other kind)
    nbytes: int

    @property
    def label(self) -> str:
        return f"{self.path} (row group {self.part})" if self.kind == "parquet" else str(self.path)


def _strip_compression(name: str) -> str:
    for s in COMPRESSED:
        if name.endswith(s):
            return name[: -len(s)]
    return name


def file_kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".arrow"):
        return "arrow"
    bare = _strip_compression(name)
    # Dolma ships JSON lines as *.json.gz; a plain .json stays text (it is rarely JSON lines).
    jsonl = bare.endswith(JSONL_SUFFIXES) or (bare != name and bare.endswith(".json"))
    return "jsonl" if jsonl else "text"


def _cannot(path, e: Exception) -> UserError:
    text = str(e).strip()
    msg = getattr(e, "strerror", None) or (text.splitlines()[0] if text else type(e).__name__)
    return UserError(f"{path}: cannot read ({msg})")


def file_units(path: Path, text_field: str) -> list[Unit]:
    """The units of one file (checks Parquet/Arrow schemas up front)."""
    try:
        size = path.stat().st_size
    except OSError as e:
        raise _cannot(path, e) from None
    if size == 0:
        raise UserError(f"{path}: file is empty")
    kind = file_kind(path)
    if kind == "parquet":
        import pyarrow.parquet as pq

        try:
            md = pq.ParquetFile(path).metadata
            schema = md.schema.to_arrow_schema()
        except Exception as e:  # pyarrow raises ArrowInvalid / OSError for non-Parquet bytes
            raise UserError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]})") from None
        _check_column(path, schema, text_field)
        if md.num_rows == 0:
            raise UserError(f"{path}: file holds no rows")
        return [Unit(path, kind, i, md.row_group(i).total_byte_size) for i in range(md.num_row_groups)]
    if kind == "arrow":
        _check_column(path, _arrow_schema(path), text_field)
    return [Unit(path, kind, 0, size)]


def _check_column(path: Path, schema, field: str) -> None:
    import pyarrow as pa

    if field not in schema.names:
        raise UserError(f"{path}: no column '{field}' (columns: {', '.join(schema.names)}); "
                        f"choose one with --text-field")
    t = schema.field(field).type
    if not (pa.types.is_string(t) or pa.types.is_large_string(t) or getattr(pa.types, "is_string_view", bool)(t)):
        raise UserError(f"{path}: column '{field}' has type {t}, not string")


def _open_arrow(path: Path):
    import pyarrow as pa

    # datasets' save_to_disk writes the IPC stream format; Feather v2 files use the file format.
    try:
        return pa.ipc.open_stream(pa.memory_map(str(path)))
    except pa.ArrowInvalid:
        return pa.ipc.open_file(pa.memory_map(str(path)))


def _arrow_schema(path: Path):
    try:
        return _open_arrow(path).schema
    except Exception as e:
        raise UserError(f"{path}: not a readable Arrow file ({str(e).splitlines()[0]})") from None


def _open_text(path: Path):
    name = path.name.lower()
    raw = open(path, "rb")
    if name.endswith(".gz"):
        raw = gzip.GzipFile(fileobj=raw)
    elif name.endswith((".zst", ".zstd")):
        import zstandard

        raw = zstandard.ZstdDecompressor().stream_reader(raw, closefd=True)
    return io.TextIOWrapper(raw, encoding="utf-8", newline="")


def _column_docs(batches, path: Path, field: str) -> Iterator[str]:
    for batch in batches:
        for text in batch.column(field).to_pylist():
            if text:  # nulls and empty strings are not documents
                yield text


def unit_documents(unit: Unit, text_field: str = "text") -> Iterator[str]:
    """Non-empty documents of one unit, in order."""
    path = unit.path
    try:
        if unit.kind == "parquet":
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(path)
            yield from _column_docs(pf.iter_batches(batch_size=_BATCH_ROWS, row_groups=[unit.part],
                                                    columns=[text_field]), path, text_field)
            return
        if unit.kind == "arrow":
            reader = _open_arrow(path)
            yield from _column_docs(reader, path, text_field)
            return
        with _open_text(path) as f:
            if unit.kind == "text":
                text = f.read()
                if not text.strip():
                    raise UserError(f"{path}: file holds no text")
                yield text
                return
            yield from _jsonl_docs(f, path, text_field)
    except UserError:
        raise
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    except Exception as e:  # OSError, EOFError, gzip/zstd/arrow errors: all mean "cannot read"
        raise _cannot(path, e) from None


def _jsonl_docs(f, path: Path, text_field: str) -> Iterator[str]:
    n = 0
    for lineno, line in enumerate(f, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict) or text_field not in rec:
            raise UserError(f"{path}:{lineno}: record has no field '{text_field}'")
        text = rec[text_field]
        if not isinstance(text, str):
            raise UserError(f"{path}:{lineno}: field '{text_field}' is not a string")
        if text:
            n += 1
            yield text
    if n == 0:
        raise UserError(f"{path}: no documents (no non-empty '{text_field}' values)")
