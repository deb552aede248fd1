"""Tokenize documents into fixed-length token blocks stored as mosaicml-streaming MDS shards.

Layout of ``out_dir``::

    train/ val/        MDS datasets, column ``tokens`` (ndarray:uint16, or int32 for big vocabs)
    tokenizer.model    copy of the tokenizer used
    meta.json          vocab/ids, sample_len, dtype, per-split counts, unigram entropy

Every document is followed by EOS; each split's token stream is concatenated and cut into
blocks of ``sample_len`` tokens. The final partial block of a split is **padded** with
``pad_id`` (never produced by the tokenizer) and the pad count is recorded in meta.json,
so small held-out splits keep their tokens; the loader ignores labels at pad positions.
(With a foreign tokenizer that has no pad piece the partial block is dropped instead.)
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import shutil
from pathlib import Path

import numpy as np

from pretrain.data.sources import expand_inputs, iter_documents
from pretrain.data.tokenizer import Tokenizer
from pretrain.errors import UserError

FORMAT = "pretrain-mds-v1"
COLUMN = "tokens"
_VAL_SALT = np.uint64(0x5DEECE66D)

_worker_sp = None
_worker_dtype = None


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


def _init_worker(model_path: str, dtype: str) -> None:
    global _worker_sp, _worker_dtype
    import sentencepiece as spm

    _worker_sp = spm.SentencePieceProcessor(model_file=model_path)
    _worker_dtype = np.dtype(dtype)


def _encode_doc(text: str) -> np.ndarray:
    ids = _worker_sp.encode(text)
    ids.append(_worker_sp.eos_id())
    return np.asarray(ids, dtype=_worker_dtype)


class _SplitWriter:
    """Concatenates documents' tokens and writes full blocks of sample_len to an MDS dir."""

    def __init__(self, out: Path, sample_len: int, dtype: str, pad_id: int, vocab: int,
                 shard_bytes: int, count_tokens: bool):
        from streaming import MDSWriter  # imports torch; kept out of worker processes

        self.writer = MDSWriter(out=str(out), columns={COLUMN: f"ndarray:{dtype}"},
                                compression=None, size_limit=shard_bytes)
        self.sample_len, self.dtype, self.pad_id = sample_len, np.dtype(dtype), pad_id
        self.parts: list[np.ndarray] = []
        self.buffered = 0
        self.documents = self.tokens = self.samples = self.padded = 0
        self.counts = np.zeros(vocab, dtype=np.int64) if count_tokens else None

    def add(self, ids: np.ndarray) -> None:
        self.documents += 1
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
        self.writer.write({COLUMN: np.ascontiguousarray(block, dtype=self.dtype)})
        self.samples += 1

    def finish(self) -> dict:
        dropped = 0
        if self.buffered:
            rest = np.concatenate(self.parts)
            if self.pad_id >= 0:
                self.padded = self.sample_len - len(rest)
                self._write(np.concatenate([rest, np.full(self.padded, self.pad_id, dtype=self.dtype)]))
            else:  # a foreign tokenizer without a pad piece: nothing safe to pad with
                dropped = len(rest)
        self.writer.finish()
        return {"documents": self.documents, "tokens": self.tokens, "samples": self.samples,
                "padded_tokens": self.padded, "dropped_tokens": dropped}


def unigram_entropy(counts: np.ndarray) -> float:
    """Entropy (nats/token) of the empirical token distribution: the loss of a unigram model."""
    total = counts.sum()
    if total == 0:
        return 0.0
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum())


def prepare(inputs: list[str] | str, out_dir: str | os.PathLike, tokenizer: str | os.PathLike,
            text_field: str = "text", sample_len: int = 2049, val_fraction: float = 0.01,
            min_val_docs: int = 1, workers: int = 2, progress: bool = True,
            shard_bytes: int = 1 << 26, overwrite: bool = False) -> dict:
    """Tokenize ``inputs`` into ``out_dir/{train,val}`` MDS shards; return the meta dict.

    Deterministic for given inputs and tokenizer, whatever ``workers`` is: documents are
    tokenized in worker processes but consumed in input order, and the held-out split is
    chosen by a stable hash of the document index.
    """
    if sample_len < 2:
        raise UserError(f"sample_len must be >= 2, got {sample_len}")
    if not (0.0 <= val_fraction < 1.0):
        raise UserError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if workers < 1:
        raise UserError(f"workers must be >= 1, got {workers}")
    tok = Tokenizer(tokenizer)
    if tok.eos_id < 0:
        raise UserError(f"{tok.path}: tokenizer has no EOS piece to separate documents")
    paths = expand_inputs(inputs)
    out = Path(out_dir)
    _claim_out_dir(out, overwrite)

    # First pass validates every input and counts documents, so the held-out choice (which
    # depends on the total) is known before any token is written and tqdm knows its total.
    n_docs = sum(1 for _ in iter_documents(paths, text_field))
    is_val = held_out_mask(n_docs, val_fraction, min_val_docs)

    dtype = token_dtype(tok.vocab_size)
    splits = {"train": _SplitWriter(out / "train", sample_len, dtype, tok.pad_id, tok.vocab_size,
                                    shard_bytes, count_tokens=True)}
    if is_val.any():
        splits["val"] = _SplitWriter(out / "val", sample_len, dtype, tok.pad_id, tok.vocab_size,
                                     shard_bytes, count_tokens=False)
    docs = iter_documents(paths, text_field)
    pool = None
    if workers > 1:
        # spawn: the parent may hold threads (torch, tqdm); forking those is unsafe.
        pool = mp.get_context("spawn").Pool(workers, initializer=_init_worker,
                                            initargs=(str(tok.path), dtype))
        encoded = pool.imap(_encode_doc, docs, chunksize=16)
    else:
        _init_worker(str(tok.path), dtype)
        encoded = map(_encode_doc, docs)
    try:
        from tqdm import tqdm

        for i, ids in enumerate(tqdm(encoded, total=n_docs, disable=not progress, unit="doc",
                                     desc="tokenizing", dynamic_ncols=True)):
            splits["val" if is_val[i] else "train"].add(ids)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    stats = {name: w.finish() for name, w in splits.items()}
    stats.setdefault("val", {"documents": 0, "tokens": 0, "samples": 0, "padded_tokens": 0,
                             "dropped_tokens": 0})

    tok.save(out / "tokenizer.model")
    meta = {
        "format": FORMAT,
        "column": COLUMN,
        "vocab_size": tok.vocab_size,
        "bos_id": tok.bos_id,
        "eos_id": tok.eos_id,
        "pad_id": tok.pad_id,
        "sample_len": sample_len,
        "dtype": dtype,
        "final_block": "padded" if tok.pad_id >= 0 else "dropped",
        "splits": stats,
        "unigram_entropy": unigram_entropy(splits["train"].counts),
        "val_fraction": val_fraction,
        "text_field": text_field,
        "inputs": [str(p) for p in paths],
    }
    tmp = out / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, out / "meta.json")  # written last: its presence marks a complete dataset
    return meta


def check_out_dir(out: Path, overwrite: bool) -> list[Path]:
    """What a new dataset in ``out`` would replace; UserError unless ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory")
    old = [p for p in (out / "train", out / "val", out / "meta.json") if p.exists()]
    if old and not overwrite:
        raise UserError(f"{out}: already holds a prepared dataset ({old[0].name}); "
                        f"pass --overwrite or choose another --out")
    return old


def _claim_out_dir(out: Path, overwrite: bool) -> None:
    for p in check_out_dir(out, overwrite):
        shutil.rmtree(p) if p.is_dir() else p.unlink()
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
