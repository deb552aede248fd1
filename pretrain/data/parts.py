"""Parts of a prepared dataset (one per cluster shard) and merging them into one dataset.

``pretrain data prepare --shard i/N`` writes ``train/part-I-of-N/`` and ``val/part-I-of-N/``
(MDS directories) and, last, the record ``parts/part-I-of-N.json`` (settings, per-split
stats) with ``.counts.npy`` (train token counts): a part with a record is finished and
is skipped by a rerun with the same settings. ``merge_parts`` joins the N parts' MDS
indexes with mosaicml-streaming's ``merge_index`` into ``train/index.json`` and
``val/index.json`` and writes ``meta.json`` last: its presence marks a complete dataset.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path

import numpy as np

from pretrain.errors import UserError

FORMAT = "pretrain-mds-v1"
COLUMN = "tokens"
_PART = re.compile(r"part-(\d+)-of-(\d+)\.json$")


def part_name(index: int, n: int) -> str:
    return f"part-{index:05d}-of-{n:05d}"


def fingerprint(files: dict[str, Path]) -> str:
    """Content hash of a tokenizer's files (name -> path)."""
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode() + b"\0" + Path(files[name]).read_bytes())
    return h.hexdigest()[:16]


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def done_record(out: Path, index: int, settings: dict, overwrite: bool) -> dict | None:
    """The record of part ``index`` if it is finished with these settings, else None."""
    marker = out / "parts" / f"{part_name(index, settings['parts'])}.json"
    if not marker.is_file():
        return None
    rec = json.loads(marker.read_text())
    if rec.get("settings") == settings and not overwrite:
        return rec
    if not overwrite:
        diff = sorted(k for k in settings if rec.get("settings", {}).get(k) != settings[k])
        raise UserError(f"{marker}: this part was prepared with other settings ({', '.join(diff)}); "
                        f"pass --overwrite or choose another --out")
    marker.unlink()
    return None


def write_record(out: Path, index: int, settings: dict, stats: dict, counts: np.ndarray,
                 tokenizer_files: dict[str, Path]) -> dict:
    """Finish a part: tokenizer copy, token counts, then its record (written last)."""
    name = part_name(index, settings["parts"])
    (out / "parts").mkdir(parents=True, exist_ok=True)
    for fname, src in tokenizer_files.items():  # every part writes the same bytes; atomically
        if not (out / fname).is_file() or (out / fname).read_bytes() != Path(src).read_bytes():
            _write_atomic(out / fname, Path(src).read_bytes())
    with open(out / "parts" / f".{name}.counts.npy.tmp", "wb") as f:
        np.save(f, counts)
    os.replace(out / "parts" / f".{name}.counts.npy.tmp", out / "parts" / f"{name}.counts.npy")
    rec = {"part": index, "settings": settings, "splits": stats}
    _write_atomic(out / "parts" / f"{name}.json", (json.dumps(rec, indent=1) + "\n").encode())
    return rec


def part_status(out: Path, n: int) -> list[int]:
    """Indices of the parts of ``n`` that have no record yet."""
    return [i for i in range(n) if not (out / "parts" / f"{part_name(i, n)}.json").is_file()]


def merge_parts(out_dir: str | os.PathLike) -> dict:
    """Join every finished part of ``out_dir`` into one dataset; returns the meta dict."""
    from pretrain.data.tokenizer import find_tokenizer, load_tokenizer

    out = Path(out_dir)
    found = sorted((int(m.group(2)), int(m.group(1)), p) for p in (out / "parts").glob("part-*-of-*.json")
                   if (m := _PART.search(p.name)))
    if not found:
        raise UserError(f"{out}: no finished parts (run `pretrain data prepare --shard i/N` first)")
    sizes = {n for n, _, _ in found}
    if len(sizes) > 1:
        raise UserError(f"{out}/parts: holds parts of different shard counts ({sorted(sizes)}); "
                        f"remove the stale ones")
    n = sizes.pop()
    missing = part_status(out, n)
    if missing:
        raise UserError(f"{out}: parts {', '.join(map(str, missing))} of {n} are not finished; "
                        f"run them (a rerun skips finished parts) before merging")
    recs = [json.loads(p.read_text()) for *_, p in found]
    settings = recs[0]["settings"]
    for r in recs[1:]:
        if r["settings"] != settings:
            raise UserError(f"{out}: part {r['part']} was prepared with other settings than part 0")
    tok_path = find_tokenizer(out)
    if tok_path is None:
        raise UserError(f"{out}: the parts' tokenizer copy is missing")
    tok = load_tokenizer(tok_path)
    stats = {}
    for split in ("train", "val"):
        _merge_split(out / split, [part_name(i, n) for i in range(n)])
        stats[split] = {k: sum(r["splits"][split][k] for r in recs) for k in recs[0]["splits"][split]}
    counts = sum(np.load(out / "parts" / f"{part_name(i, n)}.counts.npy") for i in range(n))
    from pretrain.data.prepare import token_dtype, unigram_entropy

    meta = {
        "format": FORMAT, "column": COLUMN, "vocab_size": tok.vocab_size, "bos_id": tok.bos_id,
        "eos_id": tok.eos_id, "pad_id": tok.pad_id, "sample_len": settings["sample_len"],
        "dtype": token_dtype(tok.vocab_size),
        "final_block": "padded" if tok.pad_id >= 0 else "dropped",
        "splits": stats, "unigram_entropy": unigram_entropy(counts),
        "val_fraction": settings["val_fraction"], "text_field": settings["text_field"],
        "tokenizer": tok.kind, "tokenizer_files": sorted(tok.files()),
        "parts": n, "groups": settings["groups"], "group_bytes": settings["group_bytes"],
        "inputs": [p for p, _ in settings["inputs"]],
    }
    _write_atomic(out / "meta.json", (json.dumps(meta, indent=2) + "\n").encode())
    return meta


def _merge_split(split_dir: Path, names: list[str]) -> None:
    from streaming.base.util import merge_index

    indexes = [str(split_dir / name / "index.json") for name in names
               if (split_dir / name / "index.json").is_file()]
    if not indexes:
        return
    logging.disable(logging.WARNING)  # merge_index logs each temporary folder it makes
    try:
        merge_index(indexes, str(split_dir))
    finally:
        logging.disable(logging.NOTSET)
