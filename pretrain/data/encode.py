"""Batched tokenization in worker processes, in input order, with bounded memory.

Documents are grouped into batches of about ``batch_chars`` characters; each batch is
encoded by one worker with the tokenizer's batched encoder and comes back as one flat
array (EOS after every document) plus per-document lengths, which pickles far cheaper than
lists of lists. At most ``window`` batches are in flight, so memory does not grow with the
corpus (``Pool.imap`` would read the whole input ahead of the workers).
"""

from __future__ import annotations

import collections
import multiprocessing as mp
import os
from typing import Iterable, Iterator

import numpy as np

_tok = None
_dtype = None


def _init(tokenizer_path: str, dtype: str, single_thread: bool) -> None:
    global _tok, _dtype
    if single_thread:  # one core per worker: the pool is the parallelism
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        os.environ["RAYON_NUM_THREADS"] = "1"
    from pretrain.data.tokenizer import load_tokenizer

    _tok = load_tokenizer(tokenizer_path)
    _dtype = np.dtype(dtype)


def encode_batch(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(flat token ids with EOS after each document, per-document lengths incl. EOS)."""
    encoded = _tok.encode_batch(texts)
    lengths = np.fromiter((len(e) + 1 for e in encoded), dtype=np.int64, count=len(encoded))
    flat = np.empty(int(lengths.sum()), dtype=_dtype)
    eos, o = _tok.eos_id, 0
    for ids in encoded:
        n = len(ids)
        flat[o:o + n] = ids
        flat[o + n] = eos
        o += n + 1
    return flat, lengths


def _batches(docs: Iterable[str], batch_chars: int, max_docs: int) -> Iterator[list[str]]:
    batch: list[str] = []
    size = 0
    for d in docs:
        batch.append(d)
        size += len(d)
        if size >= batch_chars or len(batch) >= max_docs:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


class Encoder:
    """``map(docs)`` yields ``encode_batch`` results in order; ``workers`` processes (or inline)."""

    def __init__(self, tokenizer_path: str, dtype: str, workers: int, batch_chars: int = 1 << 19,
                 max_docs: int = 4096):
        self.batch_chars, self.max_docs = batch_chars, max_docs
        self.window = 2 * workers + 1
        self.pool = None
        if workers > 1:
            # spawn: the parent may hold threads (torch, tqdm); forking those is unsafe.
            self.pool = mp.get_context("spawn").Pool(workers, initializer=_init,
                                                     initargs=(tokenizer_path, dtype, True))
        else:
            _init(tokenizer_path, dtype, False)

    def map(self, docs: Iterable[str]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        batches = _batches(docs, self.batch_chars, self.max_docs)
        if self.pool is None:
            yield from map(encode_batch, batches)
            return
        pending: collections.deque = collections.deque()
        for batch in batches:
            pending.append(self.pool.apply_async(encode_batch, (batch,)))
            if len(pending) >= self.window:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
