"""Tokenize documents into fixed-length token blocks stored as mosaicml-streaming MDS shards.

Layout of ``out_dir``::

    train/ val/        MDS datasets, column ``tokens`` (ndarray:uint16, or int32 for big vocabs):
                       index.json merged from one sub-directory per part (part-I-of-N/)
    parts/             one record per finished part (stats, settings, token counts)
    tokenizer.model    copy of the tokenizer used (or tokenizer.json + its config files)
    meta.json          vocab/ids, sample_len, dtype, per-split counts, unigram entropy

Every document is followed by EOS; each packing group's token stream is concatenated and
cut into blocks of ``sample_len`` tokens. The final partial block of a group is **padded** with
``pad_id`` (never produced by the tokenizer) and the pad count is recorded in meta.json,
so small held-out splits keep their tokens; the loader ignores labels at pad positions.
(With a foreign tokenizer that has no pad piece the partial block is dropped instead.)
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import numpy as np

from pretrain.data import parts
from pretrain.data.encode import Encoder
from pretrain.data.readers import Unit, unit_documents
from pretrain.data.sources import expand_inputs, list_units
from pretrain.data.tokenizer import load_tokenizer
from pretrain.errors import UserError

from pretrain.data.parts import COLUMN, FORMAT  # noqa: E402,F401  (re-exported)
_VAL_SALT = np.uint64(0x5DEECE66D)
DEFAULT_GROUP_BYTES = 256 << 20  # a partial block per group is wasted: negligible at this size


def token_dtype(vocab_size: int) -> str:
    """Storage dtype for token ids of a vocabulary."""
    return "uint16" if vocab_size <= 65535 else "int32"


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A stable 64-bit hash (same on every platform and Python version, unlike hash())."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def held_out_mask(n_docs: int, val_fraction: float, min_val_docs: int = 1) -> np.ndarray:
    """Boolean mask of held-out documents: the ones whose index hashes lowest.

    ``max(min_val_docs, round(val_fraction * n))`` documents when ``val_fraction > 0``
    (none when it is 0); at least one document always stays in training.
    """
    mask = np.zeros(n_docs, dtype=bool)
    if val_fraction <= 0:
        return mask
    n_val = max(min_val_docs, int(round(val_fraction * n_docs)))
    if n_val > n_docs - 1:
        raise UserError(f"cannot hold out {n_val} of {n_docs} document(s) for validation and keep one "
                        f"for training; give more documents or --val-fraction 0")
    h = _splitmix64(np.arange(n_docs, dtype=np.uint64) ^ _VAL_SALT)
    mask[np.argsort(h, kind="stable")[:n_val]] = True
    return mask


class _SplitWriter:
    """Concatenates documents' tokens and writes full blocks of sample_len to an MDS dir.

    ``end_group()`` closes a packing group: its partial block is padded (or dropped), so
    blocks never straddle groups and a group's blocks depend on nothing outside it.
    """

    def __init__(self, out: Path, sample_len: int, dtype: str, pad_id: int, vocab: int,
                 shard_bytes: int, count_tokens: bool):
        self.out, self.shard_bytes, self.writer = out, shard_bytes, None
        self.sample_len, self.dtype, self.pad_id = sample_len, np.dtype(dtype), pad_id
        self.parts: list[np.ndarray] = []
        self.buffered = 0
        self.documents = self.tokens = self.samples = self.padded = self.dropped = 0
        self.counts = np.zeros(vocab, dtype=np.int64) if count_tokens else None

    def add(self, ids: np.ndarray, n_docs: int) -> None:
        """Tokens of ``n_docs`` whole documents (each ending in EOS)."""
        self.documents += n_docs
        self.tokens += len(ids)
        if self.counts is not None:
            self.counts += np.bincount(ids, minlength=len(self.counts))[: len(self.counts)]
        self.parts.append(ids)
        self.buffered += len(ids)
        if self.buffered >= self.sample_len:
            stream = np.concatenate(self.parts)
            n_full = len(stream) // self.sample_len
            for b in range(n_full):
                self._write(stream[b * self.sample_len:(b + 1) * self.sample_len])
            rest = stream[n_full * self.sample_len:]
            self.parts, self.buffered = ([rest] if len(rest) else []), len(rest)

    def _write(self, block: np.ndarray) -> None:
        if self.writer is None:
            from streaming import MDSWriter  # imports torch; kept out of worker processes

            self.writer = MDSWriter(out=str(self.out), columns={COLUMN: f"ndarray:{self.dtype.name}"},
                                    compression=None, size_limit=self.shard_bytes)
        self.writer.write({COLUMN: np.ascontiguousarray(block, dtype=self.dtype)})
        self.samples += 1

    def end_group(self) -> None:
        if self.buffered:
            rest = np.concatenate(self.parts)
            if self.pad_id >= 0:
                pad = self.sample_len - len(rest)
                self.padded += pad
                self._write(np.concatenate([rest, np.full(pad, self.pad_id, dtype=self.dtype)]))
            else:  # a foreign tokenizer without a pad piece: nothing safe to pad with
                self.dropped += len(rest)
        self.parts, self.buffered = [], 0

    def finish(self) -> dict:
        self.end_group()
        if self.writer is not None:
            self.writer.finish()
        return {"documents": self.documents, "tokens": self.tokens, "samples": self.samples,
                "padded_tokens": self.padded, "dropped_tokens": self.dropped}


def unigram_entropy(counts: np.ndarray) -> float:
    """Entropy (nats/token) of the empirical token distribution: the loss of a unigram model."""
    total = counts.sum()
    if total == 0:
        return 0.0
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum())


def plan_groups(units: list[Unit], group_bytes: int) -> list[list[Unit]]:
    """Consecutive units packed into groups of at least ``group_bytes`` (the last may be less)."""
    groups: list[list[Unit]] = [[]]
    size = 0
    for u in units:
        if groups[-1] and size >= group_bytes:
            groups.append([])
            size = 0
        groups[-1].append(u)
        size += u.nbytes
    return groups if groups[0] else []


def prepare(inputs: list[str] | str, out_dir: str | os.PathLike, tokenizer: str | os.PathLike,
            text_field: str = "text", sample_len: int = 2049, val_fraction: float = 0.01,
            min_val_docs: int = 1, workers: int = 2, progress: bool = True,
            shard_bytes: int = 1 << 26, overwrite: bool = False, part: tuple[int, int] = (0, 1),
            group_bytes: int = DEFAULT_GROUP_BYTES) -> dict:
    """Tokenize ``inputs`` into ``out_dir/{train,val}`` MDS shards; return the meta dict.

    Inputs are cut into packing groups of about ``group_bytes`` (whole files, or Parquet row
    groups); each group's token stream is packed on its own, and its documents are held out
    by a stable hash of their index in the group. ``part=(i, n)`` tokenizes the i-th of n
    contiguous slices of the groups into its own sub-directories (a cluster shard); with
    n == 1 the dataset is merged and complete on return, otherwise ``merge_parts`` finishes
    it once every part is done. Deterministic whatever ``workers`` and ``n`` are; a part
    already done with the same settings is skipped, so an interrupted run resumes.
    """
    if sample_len < 2:
        raise UserError(f"sample_len must be >= 2, got {sample_len}")
    if not (0.0 <= val_fraction < 1.0):
        raise UserError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if workers < 1:
        raise UserError(f"workers must be >= 1, got {workers}")
    if group_bytes < 1:
        raise UserError(f"group_bytes must be >= 1, got {group_bytes}")
    index, n_parts = part
    if not (n_parts >= 1 and 0 <= index < n_parts):
        raise UserError(f"--shard: {index}/{n_parts} is not i/N with 0 <= i < N")
    tok = load_tokenizer(tokenizer)
    if tok.eos_id < 0:
        raise UserError(f"{tok.path}: tokenizer has no EOS token to separate documents")
    paths = expand_inputs(inputs)
    groups = plan_groups(list_units(paths, text_field), group_bytes)
    out = Path(out_dir)
    _claim_out_dir(out, overwrite, n_parts)
    settings = {"tokenizer": parts.fingerprint(tok.files()), "vocab_size": tok.vocab_size,
                "inputs": [[str(p), p.stat().st_size] for p in paths], "text_field": text_field,
                "sample_len": sample_len, "val_fraction": val_fraction, "min_val_docs": min_val_docs,
                "group_bytes": group_bytes, "parts": n_parts, "groups": len(groups)}
    record = parts.done_record(out, index, settings, overwrite)
    if record is None:
        lo, hi = index * len(groups) // n_parts, (index + 1) * len(groups) // n_parts
        record = _run_part(out, index, settings, tok, groups[lo:hi], len(groups) == 1,
                           workers=workers, progress=progress, shard_bytes=shard_bytes)
    if n_parts == 1:
        return parts.merge_parts(out)
    return record


def _run_part(out: Path, index: int, settings: dict, tok, groups: list[list[Unit]], only_group: bool,
              workers: int, progress: bool, shard_bytes: int) -> dict:
    name = parts.part_name(index, settings["parts"])
    dtype = token_dtype(tok.vocab_size)
    for split in ("train", "val"):
        shutil.rmtree(out / split / name, ignore_errors=True)  # leftovers of an interrupted run
    writers = {split: _SplitWriter(out / split / name, settings["sample_len"], dtype, tok.pad_id,
                                   tok.vocab_size, shard_bytes, count_tokens=split == "train")
               for split in ("train", "val")}
    text_field = settings["text_field"]
    encoder = Encoder(str(tok.path), dtype, workers)
    from tqdm import tqdm

    bar = tqdm(disable=not progress, unit="doc", desc=f"tokenizing {name}", dynamic_ncols=True)
    try:
        for group in groups:
            n_docs = sum(1 for u in group for _ in unit_documents(u, text_field))
            is_val = _group_mask(n_docs, settings, only_group)
            docs = (d for u in group for d in unit_documents(u, text_field))
            first = 0
            for flat, lengths in encoder.map(docs):
                val = is_val[first:first + len(lengths)]
                first += len(lengths)
                bar.update(len(lengths))
                if not val.any():
                    writers["train"].add(flat, len(lengths))
                    continue
                tok_val = np.repeat(val, lengths)
                writers["train"].add(flat[~tok_val], int((~val).sum()))
                writers["val"].add(flat[tok_val], int(val.sum()))
            for w in writers.values():
                w.end_group()
    finally:
        encoder.close()
        bar.close()
    stats = {split: w.finish() for split, w in writers.items()}
    return parts.write_record(out, index, settings, stats, writers["train"].counts, tok.files())


def _group_mask(n_docs: int, settings: dict, only_group: bool) -> np.ndarray:
    # A one-document group among many holds nothing out; alone, it is the user's error.
    if n_docs < 2 and not only_group:
        return np.zeros(n_docs, dtype=bool)
    return held_out_mask(n_docs, settings["val_fraction"], settings["min_val_docs"])


def check_out_dir(out: Path, overwrite: bool) -> list[Path]:
    """What a new dataset in ``out`` would replace; UserError unless ``overwrite``.

    Only a complete dataset (meta.json) is refused; the leftovers of an interrupted
    prepare are resumed instead.
    """
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory")
    if (out / "meta.json").exists() and not overwrite:
        raise UserError(f"{out}: already holds a prepared dataset (meta.json); "
                        f"pass --overwrite or choose another --out")
    return [p for p in (out / "train", out / "val", out / "parts", out / "meta.json") if p.exists()]


def _claim_out_dir(out: Path, overwrite: bool, n_parts: int) -> None:
    old = check_out_dir(out, overwrite)
    if overwrite:
        # One process owns the whole directory; cluster shards only drop the merged result.
        for p in old if n_parts == 1 else [out / "meta.json", out / "train" / "index.json",
                                            out / "val" / "index.json"]:
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def describe(meta: dict) -> str:
    """One human-readable paragraph of a meta dict (for the CLI)."""
    lines = []
    for name, s in meta["splits"].items():
        lines.append(f"{name}: {s['documents']} docs, {s['tokens']} tokens, {s['samples']} samples "
                     f"of {meta['sample_len']} ({s['padded_tokens']} pad)")
    lines.append(f"vocab {meta['vocab_size']} ({meta['dtype']}), unigram entropy "
                 f"{meta['unigram_entropy']:.3f} nats/token (= ppl {math.exp(meta['unigram_entropy']):.1f})")
    return "\n".join(lines)
