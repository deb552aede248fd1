"""Megatron-LM indexed datasets (``PREFIX.bin`` + ``PREFIX.idx``) as a training data source.

Corpora already tokenized with Megatron-LM's ``tools/preprocess_data.py`` (``--append-eod``,
so the tokenizer's EOS separates documents) are read in place through megatron-core's own
reader, ``megatron.core.datasets.indexed_dataset.IndexedDataset`` (memory-mapped, CPU).
Set ``data.path`` (or a mixture entry) to the prefix, e.g. ``/data/pile_text_document``;
Megatron and MDS sources mix freely when they share a tokenizer.

The sentencepiece model the corpus was tokenized with must sit beside the files as
``tokenizer.model``: it gives the vocabulary size and the EOS id the loader needs (the
.idx file records neither), and every checkpoint keeps a copy for eval/export.

To the loader (pretrain/data/loader.py) a Megatron corpus looks like a prepared dataset:
its documents in order form one token stream; the last ``VAL_FRACTION`` of the documents
(at least one) are the ``val`` split, the rest ``train``; each split is cut into blocks of
``BLOCK_TOKENS`` tokens (the last one padded). A block is read lazily: only the windows
the loader slices out of it are read from the memory map.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from pretrain.errors import UserError

VAL_FRACTION = 0.01
# Windows never straddle blocks, so a block wastes < one window; long blocks keep that tiny.
BLOCK_TOKENS = 1 << 20
SPLITS = ("train", "val")


def megatron_prefix(path: str) -> str | None:
    """The Megatron prefix ``path`` names (itself, or with .bin/.idx removed), if those files exist."""
    p = str(path)
    for suffix in (".bin", ".idx"):
        if p.endswith(suffix):
            p = p[: -len(suffix)]
    return p if Path(p + ".bin").is_file() and Path(p + ".idx").is_file() else None


def _indexed_dataset(prefix: str):
    try:
        with warnings.catch_warnings():  # megatron-core warns about optional GPU extras on import
            warnings.simplefilter("ignore")
            from megatron.core.datasets.indexed_dataset import IndexedDataset
    except ImportError:
        raise UserError(f"{prefix}: reading Megatron .bin/.idx data needs megatron-core "
                        f"(pip install 'pretrain[megatron]')") from None
    try:
        return IndexedDataset(prefix, multimodal=False, mmap=True)
    except Exception as e:  # the reader asserts on malformed headers
        raise UserError(f"{prefix}: not a readable Megatron indexed dataset ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


class _Stream:
    """Token ranges of the concatenated sequences of an IndexedDataset."""

    def __init__(self, ds):
        self.ds = ds
        lengths = np.asarray(ds.sequence_lengths, dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(lengths)])

    def read(self, a: int, b: int) -> np.ndarray:
        """Tokens ``[a, b)`` of the stream."""
        first = int(np.searchsorted(self.starts, a, side="right")) - 1
        pieces, pos = [], a
        i = first
        while pos < b:
            start, end = int(self.starts[i]), int(self.starts[i + 1])
            take = min(b, end) - pos
            if take > 0:
                pieces.append(self.ds.get(i, offset=pos - start, length=take))
            pos += max(take, 0)
            i += 1
        # always a copy: the reader returns views of its memory map, which must not outlive it
        return np.concatenate(pieces) if len(pieces) != 1 else np.array(pieces[0])


class _Block:
    """One block of a split, sliced lazily (``block[i:j]`` reads only those tokens)."""

    def __init__(self, stream: _Stream, start: int, end: int, length: int, pad_id: int):
        self.stream, self.start, self.end, self.length, self.pad_id = stream, start, end, length, pad_id

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, s: slice) -> np.ndarray:
        i, j, step = s.indices(self.length)
        if step != 1:
            raise IndexError("Megatron blocks only support contiguous slices")
        a, b = self.start + i, min(self.start + j, self.end)
        real = self.stream.read(a, b) if b > a else np.zeros(0, dtype=np.int64)
        if j - i > len(real):  # the padded tail of the split's last block
            real = np.concatenate([real.astype(np.int64), np.full(j - i - len(real), self.pad_id, np.int64)])
        return real


class MegatronStore:
    """A split as the loader's block store: ``store[b]["tokens"]`` is block ``b``."""

    def __init__(self, stream: _Stream, start: int, end: int, pad_id: int):
        self.stream, self.start, self.end, self.pad_id = stream, start, end, pad_id
        self.num_samples = max(-(-(end - start) // BLOCK_TOKENS), 0)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, b: int) -> dict:
        if not 0 <= b < self.num_samples:
            raise IndexError(b)
        a = self.start + b * BLOCK_TOKENS
        return {"tokens": _Block(self.stream, a, min(a + BLOCK_TOKENS, self.end), BLOCK_TOKENS, self.pad_id)}


class MegatronDataset:
    """The ``store.Dataset`` interface over a Megatron corpus (``path``, ``meta``, ``store``)."""

    def __init__(self, path: str, prefix: str):
        self.path, self.prefix = path, prefix
        self.local, self.remote = str(Path(prefix).parent), None
        tok = Path(prefix).parent / "tokenizer.model"
        if not tok.is_file():
            raise UserError(f"{path}: Megatron dataset without {tok}; copy the sentencepiece model "
                            f"the corpus was tokenized with there (it gives the EOS id and vocabulary)")
        self._tokenizer = str(tok)
        import sentencepiece as spm

        try:
            sp = spm.SentencePieceProcessor(model_file=self._tokenizer)
        except (OSError, RuntimeError) as e:
            raise UserError(f"{tok}: not a sentencepiece model ({str(e).splitlines()[0]})") from None
        # the padded tail of a split is masked out of the labels by this id: the tokenizer's
        # pad, else its unk (never the EOS, whose predictions matter)
        eos_id, pad_id = int(sp.eos_id()), int(sp.pad_id() if sp.pad_id() >= 0 else sp.unk_id())
        if eos_id < 0:
            raise UserError(f"{tok}: the tokenizer defines no EOS token")
        self.ds = _indexed_dataset(prefix)
        docs = np.asarray(self.ds.document_indices, dtype=np.int64)  # sequence index per document start
        n_docs = len(docs) - 1
        if n_docs < 2:
            raise UserError(f"{path}: holds {n_docs} document(s); at least 2 are needed (train and val)")
        self.stream = _Stream(self.ds)
        n_val = min(max(int(round(n_docs * VAL_FRACTION)), 1), n_docs - 1)
        cut = int(self.stream.starts[docs[n_docs - n_val]])
        total = int(self.stream.starts[-1])
        self.bounds = {"train": (0, cut), "val": (cut, total)}
        splits = {}
        for name, (a, b) in self.bounds.items():
            blocks = -(-(b - a) // BLOCK_TOKENS)
            splits[name] = {"samples": blocks, "tokens": b - a, "padded_tokens": blocks * BLOCK_TOKENS - (b - a),
                            "documents": n_docs - n_val if name == "train" else n_val}
        self.meta = {"format": "megatron", "source": prefix, "vocab_size": int(sp.get_piece_size()),
                     "eos_id": eos_id, "pad_id": pad_id,
                     "sample_len": BLOCK_TOKENS, "dtype": str(self.ds.get(0, 0, 1).dtype),
                     "splits": splits}

    def store(self, split: str) -> MegatronStore:
        if split not in self.bounds:
            raise UserError(f"{self.path}: a Megatron dataset has splits {', '.join(SPLITS)}, not '{split}'")
        a, b = self.bounds[split]
        return MegatronStore(self.stream, a, b, self.meta["pad_id"])

    def tokenizer_path(self) -> str:
        return self._tokenizer


def open_megatron(path: str, prefix: str) -> MegatronDataset:
    return MegatronDataset(path, prefix)
