"""Reading documents from text files, globs, directories and JSONL (optionally gzipped)."""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
from pathlib import Path
from typing import Iterator

from pretrain.errors import UserError

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson", ".ndjson.gz")


def expand_inputs(inputs: list[str] | str) -> list[Path]:
    """Files named by paths, globs (``**`` allowed) or directories (walked recursively).

    Order is the argument order, each glob or directory expanded in sorted order, so the
    document stream is deterministic. Anything matching nothing is a UserError.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    if not inputs:
        raise UserError("no input files given")
    out: list[Path] = []
    for item in inputs:
        item = str(item)
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and not _hidden(q.relative_to(p)))
            if not found:
                raise UserError(f"{item}: directory holds no files")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        elif glob.has_magic(item):
            found = sorted(Path(m) for m in glob.glob(item, recursive=True) if os.path.isfile(m))
            if not found:
                raise UserError(f"{item}: pattern matches no files")
            out.extend(found)
        else:
            raise UserError(f"{item}: no such file")
    return out


def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def is_jsonl(path: Path) -> bool:
    return path.name.endswith(JSONL_SUFFIXES)


def _open_text(path: Path):
    try:
        if path.name.endswith(".gz"):
            return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
        return open(path, encoding="utf-8", newline="")
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None


def iter_file_documents(path: Path, text_field: str = "text") -> Iterator[str]:
    """Documents of one file: each JSONL record's ``text_field``, or the whole text file.

    Empty documents are skipped; an empty or unreadable file, bad JSON, a missing or
    non-string field are UserErrors naming the file (and line).
    """
    try:
        if path.stat().st_size == 0:
            raise UserError(f"{path}: file is empty")
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        with _open_text(path) as f:
            if not is_jsonl(path):
                text = f.read()
                if not text.strip():
                    raise UserError(f"{path}: file holds no text")
                yield text
                return
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
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    except (OSError, EOFError) as e:  # includes gzip.BadGzipFile
        raise UserError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None


def iter_documents(paths: list[Path], text_field: str = "text") -> Iterator[str]:
    """All documents of ``paths`` in order."""
    for p in paths:
        yield from iter_file_documents(p, text_field)
