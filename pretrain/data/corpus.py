"""A real text corpus that needs no download: the Python standard library's own sources."""

from __future__ import annotations

import json
import os
import sysconfig
from pathlib import Path

from pretrain.errors import UserError

DEFAULT_MAX_BYTES = 8 * 1024 * 1024


def stdlib_files(include_tests: bool = False) -> list[Path]:
    """The standard library's .py files in sorted order (site-packages excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise UserError(f"Python standard library not found at {root}")
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Prune in place so os.walk never descends into third-party or test trees.
        keep = []
        for d in dirnames:
            if d in ("site-packages", "dist-packages", "__pycache__") or d.startswith("."):
                continue
            if not include_tests and d in ("test", "tests", "idle_test"):
                continue
            keep.append(d)
        dirnames[:] = keep
        files.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def stdlib_corpus(out_path: str | os.PathLike, max_bytes: int = DEFAULT_MAX_BYTES,
                  include_tests: bool = False) -> Path:
    """Write the stdlib's .py sources as JSONL ({"text": ...} per file), up to ``max_bytes``.

    Deterministic: files are taken in sorted path order, skipping any that would pass the
    cap (UTF-8 bytes of the texts). Returns the written path.
    """
    if max_bytes <= 0:
        raise UserError(f"corpus max_bytes must be positive, got {max_bytes}")
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    total = 0
    n = 0
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for path in stdlib_files(include_tests):
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue  # a few stdlib files are deliberately non-UTF-8 test fixtures
            if not text.strip():
                continue
            size = len(text.encode("utf-8"))
            if total + size > max_bytes:
                continue  # a smaller later file may still fit; order stays deterministic
            f.write(json.dumps({"text": text}) + "\n")
            total += size
            n += 1
    if n == 0:
        tmp.unlink(missing_ok=True)
        raise UserError(f"no standard-library file fits in max_bytes={max_bytes}")
    os.replace(tmp, out)
    return out
