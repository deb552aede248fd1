"""Naming inputs: files, globs, directories (walked) and Hugging Face ``datasets`` directories.

Formats are read by ``pretrain.data.readers``: text and JSONL (plain, ``.gz``, ``.zst``),
Parquet (by row group) and Arrow (what ``datasets``' ``save_to_disk`` writes).
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Iterator

from pretrain.data.readers import Unit, file_units, unit_documents
from pretrain.errors import UserError

# datasets' save_to_disk metadata next to its .arrow files: not documents
_DATASETS_META = {"state.json", "dataset_info.json"}


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
            out.extend(_walk(p, item))
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


def _walk(root: Path, label: str) -> list[Path]:
    if (root / "dataset_dict.json").is_file():
        splits = sorted(q.name for q in root.iterdir() if (q / "state.json").is_file())
        raise UserError(f"{label}: a datasets DatasetDict; pass one split's directory "
                        f"({', '.join(f'{label.rstrip(os.sep)}/{s}' for s in splits) or 'none found'})")
    found = sorted(q for q in root.rglob("*") if q.is_file() and not _hidden(q.relative_to(root)))
    arrow_dirs = {q.parent for q in found if q.suffix == ".arrow"}
    found = [q for q in found if not (q.parent in arrow_dirs and q.name in _DATASETS_META)]
    if not found:
        raise UserError(f"{label}: directory holds no files")
    return found


def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def list_units(paths: list[Path], text_field: str = "text") -> list[Unit]:
    """Every file's units in order (Parquet files by row group)."""
    return [u for p in paths for u in file_units(p, text_field)]


def iter_file_documents(path: Path, text_field: str = "text") -> Iterator[str]:
    """Documents of one file (every unit of it)."""
    for unit in file_units(path, text_field):
        yield from unit_documents(unit, text_field)


def iter_documents(paths: list[Path], text_field: str = "text") -> Iterator[str]:
    """All documents of ``paths`` in order."""
    for p in paths:
        yield from iter_file_documents(p, text_field)
