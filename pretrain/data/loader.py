"""Training batches from prepared datasets: deterministic, resumable, layout-independent.

Samples are windows of ``seq_len + 1`` tokens cut from the stored blocks (each block of
``sample_len`` tokens holds ``sample_len // (seq_len + 1)`` of them). A window longer than a
block is cut from the split's token stream (consecutive blocks, as prepare wrote them):
window ``w`` is tokens ``[w * (seq_len + 1), (w + 1) * (seq_len + 1))``, and a rank needing
part of it (context parallel, :meth:`TokenBatches.spans_at`) reads only those blocks. Every *global sample
index* ``g`` maps deterministically to one window:

* mixture: ``g`` picks a source by a seeded choice proportional to the weights. Chunks of
  ``MIX_CHUNK`` consecutive indices hold each source exactly its (largest-remainder) share,
  in a seeded random arrangement, so the per-source count before ``g`` is known in O(1);
* each source walks its own epochs; epoch ``e`` of a source is ``torch.randperm`` over its
  windows seeded from ``seed + e`` (identity order when shuffling is off).

The global batch of step ``s`` is indices ``[s*G, (s+1)*G)``; data-parallel rank ``r`` of
``D`` takes the contiguous slice ``[r*G/D, (r+1)*G/D)``. The union over ranks is the same
for any ``D``, and the state is a single cursor, so a resumed run (with any ``D``)
continues exactly where the interrupted one stopped. Under context parallel
(``cp_size > 1``) each cp rank reads only its two chunks of those rows (:meth:`TokenBatches.local_at`).

Labels are the inputs shifted by one; labels at padding (the padded tail of a split's last
block, see prepare.py) are ``IGNORE_INDEX`` (-100, torch's cross-entropy default).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import OrderedDict

import numpy as np
import torch

from pretrain.config import DataConfig
from pretrain.data.rows import RowCursor
from pretrain.data.store import Dataset, open_dataset, read_block
from pretrain.errors import UserError

IGNORE_INDEX = -100
MIX_CHUNK = 4096
_BLOCK_CACHE = 16


def _seed(*parts: int) -> int:
    """A stable 63-bit seed from integers (independent streams for distinct tuples)."""
    h = hashlib.blake2b(repr(tuple(int(p) for p in parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


class _Source:
    """One dataset's split seen as a list of windows."""

    def __init__(self, ds: Dataset, weight: float, split: str, seq_len: int):
        self.ds, self.weight = ds, weight
        meta = ds.meta
        self.sample_len = int(meta["sample_len"])
        self.window = seq_len + 1
        # 0: windows longer than a block span consecutive blocks (the split's token stream)
        self.per_block = self.sample_len // self.window
        stats = meta["splits"].get(split) or {}
        blocks, padded = int(stats.get("samples", 0)), int(stats.get("padded_tokens", 0))
        if blocks == 0:
            raise UserError(f"{ds.path}: split '{split}' holds no samples")
        if self.per_block:
            # Windows of the padded last block that still carry at least one real label.
            real_last = self.sample_len - padded
            last = sum(1 for j in range(self.per_block) if real_last - j * self.window >= 2)
            self.n_windows = (blocks - 1) * self.per_block + last
        else:
            stored, real = blocks * self.sample_len, blocks * self.sample_len - padded
            self.n_windows = min(stored // self.window, max(0, (real - 2) // self.window + 1))
        if self.n_windows == 0:
            raise UserError(f"{ds.path}: split '{split}' is too small for data.seq_len={seq_len}")
        self.store = ds.store(split)
        self.pad_id = int(meta["pad_id"]) if padded else -1


class _Mixture:
    """Global sample index -> (source, count of that source's earlier samples)."""

    def __init__(self, weights: list[float], seed: int):
        self.seed = seed
        w = np.asarray(weights, dtype=np.float64)
        exact = w / w.sum() * MIX_CHUNK
        counts = np.floor(exact).astype(np.int64)
        for i in np.argsort(-(exact - counts), kind="stable")[: MIX_CHUNK - counts.sum()]:
            counts[i] += 1
        if (counts == 0).any():
            raise UserError(f"data.mixture: weight {weights[int(np.argmin(counts))]} is too small "
                            f"(below 1/{MIX_CHUNK} of the total)")
        self.counts = counts
        self.labels = np.repeat(np.arange(len(w)), counts)
        self._chunk: tuple[int, np.ndarray, np.ndarray] | None = None

    def locate(self, g: int) -> tuple[int, int]:
        if len(self.counts) == 1:
            return 0, g
        c, pos = divmod(g, MIX_CHUNK)
        if self._chunk is None or self._chunk[0] != c:
            gen = torch.Generator().manual_seed(_seed(self.seed, 0x6D6978, c))
            labels = self.labels[torch.randperm(MIX_CHUNK, generator=gen).numpy()]
            rank = np.empty(MIX_CHUNK, dtype=np.int64)
            for s in range(len(self.counts)):
                where = labels == s
                rank[where] = np.arange(int(where.sum()))
            self._chunk = (c, labels, rank)
        _, labels, rank = self._chunk
        s = int(labels[pos])
        return s, c * int(self.counts[s]) + int(rank[pos])


def _sources_of(cfg: DataConfig) -> list[tuple[str, float]]:
    if cfg.mixture:
        if cfg.path:
            raise UserError("data: set data.path or data.mixture, not both")
        for i, m in enumerate(cfg.mixture):
            if not m.weight > 0:
                raise UserError(f"data.mixture[{i}].weight: must be positive, got {m.weight}")
        return [(m.path, float(m.weight)) for m in cfg.mixture]
    return [(cfg.path, 1.0)]


class TokenBatches(RowCursor):
    """Infinite iterator of ``{"input_ids", "labels", "doc_ids"}`` batches for one DP rank.

    Each batch has ``global_batch // dp_size`` rows of ``cfg.seq_len`` tokens (LongTensors).
    Construct it on every rank in the same order (opening datasets is collective).
    """

    def __init__(self, cfg: DataConfig, split: str, global_batch: int, dp_rank: int, dp_size: int,
                 seed: int, cache_dir: str | None = None, eos_id: int | None = None,
                 doc_ids: bool = True, shuffle: bool | None = None, model_vocab: int | None = None,
                 cp_rank: int = 0, cp_size: int = 1):
        super().__init__(global_batch, dp_rank, dp_size, cfg.seq_len)
        if cfg.seq_len < 1:
            raise UserError(f"data.seq_len must be positive, got {cfg.seq_len}")
        if cp_size > 1 and cfg.seq_len % (2 * cp_size):
            raise UserError(f"data.seq_len: {cfg.seq_len} must be divisible by 2*parallel.cp = {2 * cp_size} "
                            f"(each cp rank holds two equal chunks)")
        self.cfg, self.split = cfg, split
        # context parallel: this rank reads only its chunks i and 2N-1-i of every row
        self.cp_rank, self.cp_size = cp_rank, cp_size
        self.cp_spans = cp_spans(cfg.seq_len, cp_size, cp_rank) if cp_size > 1 else None
        self.read_stats = {"blocks": 0, "bytes": 0, "tokens": 0}  # store reads; tokens cut into rows
        self.seed = int(seed)
        self.shuffle = cfg.shuffle if shuffle is None else shuffle
        self.with_doc_ids = doc_ids
        cache = cache_dir or cfg.cache_dir or None
        specs = _sources_of(cfg)
        datasets = [open_dataset(p, cache) for p, _ in specs]
        _check_compatible(datasets, eos_id, model_vocab)
        self.sources = [_Source(ds, w, split, cfg.seq_len) for ds, (_, w) in zip(datasets, specs)]
        self.eos_id = int(datasets[0].meta["eos_id"])
        self.mixture = _Mixture([w for _, w in specs], self.seed)
        self._perms: dict[tuple[int, int], np.ndarray] = {}
        self._blocks: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        # Identifies the sample order by content, not by path, so moved data still resumes.
        self._fingerprint = _seed(cfg.seq_len, int(self.shuffle), *[
            v for src in self.sources for v in (
                round(src.weight * 1e6), src.sample_len, src.n_windows,
                src.ds.meta["splits"][split]["tokens"], src.ds.meta["vocab_size"])])
        first = datasets[0].meta
        self.meta = {k: v for k, v in first.items() if k not in ("splits", "inputs")}
        self.meta.update(seq_len=cfg.seq_len, split=split,
                         windows=sum(s.n_windows for s in self.sources),
                         sources=[{"path": s.ds.path, "weight": s.weight, "windows": s.n_windows,
                                   "sample_len": s.sample_len,
                                   "tokens": s.ds.meta["splits"][split]["tokens"]}
                                  for s in self.sources])

    # ---- the global order --------------------------------------------------------------

    def _perm(self, s: int, epoch: int) -> np.ndarray:
        key = (s, epoch)
        if key not in self._perms:
            for old in [k for k in self._perms if k[0] == s and k[1] < epoch - 1]:
                del self._perms[old]  # keep at most the previous epoch (a batch may straddle)
            gen = torch.Generator().manual_seed(_seed(self.seed + epoch, s))
            self._perms[key] = torch.randperm(self.sources[s].n_windows, generator=gen).numpy()
        return self._perms[key]

    def locate(self, g: int) -> tuple[int, int]:
        """(source, window) of global sample index ``g``."""
        s, k = self.mixture.locate(g)
        epoch, pos = divmod(k, self.sources[s].n_windows)
        return s, (int(self._perm(s, epoch)[pos]) if self.shuffle else pos)

    def _block(self, s: int, b: int) -> np.ndarray:
        key = (s, b)
        block = self._blocks.get(key)
        if block is None:
            block = read_block(self.sources[s].store, b)
            self._blocks[key] = block
            self.read_stats["blocks"] += 1
            # a lazy block (Megatron reader) reads on slicing: only materialised blocks count
            self.read_stats["bytes"] += int(block.nbytes) if isinstance(block, np.ndarray) else 0
            if len(self._blocks) > _BLOCK_CACHE:
                self._blocks.popitem(last=False)
        else:
            self._blocks.move_to_end(key)
        return block

    def window(self, s: int, w: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Tokens ``[start, stop)`` (default all seq_len + 1) of window ``w`` of source ``s``,
        reading only the stored blocks they lie in."""
        src = self.sources[s]
        stop = src.window if stop is None else stop
        self.read_stats["tokens"] += max(stop - start, 0)
        if src.per_block:
            b, j = divmod(w, src.per_block)
            return self._block(s, b)[j * src.window + start:j * src.window + stop]
        first, last = w * src.window + start, w * src.window + stop  # in the split's token stream
        L = src.sample_len
        parts = [self._block(s, b)[max(first - b * L, 0):min(last - b * L, L)]
                 for b in range(first // L, (last - 1) // L + 1)] if last > first else []
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def sample(self, g: int) -> np.ndarray:
        return self.window(*self.locate(g))

    # ---- iteration ---------------------------------------------------------------------

    def batch_at(self, cursor: int) -> dict:
        """This rank's slice of the global batch starting at global sample ``cursor``."""
        rows, pads = [], set()
        for g in self.rank_rows(cursor):
            s, w = self.locate(g)
            rows.append(self.window(s, w))
            pads.add(self.sources[s].pad_id)
        x = torch.from_numpy(np.stack(rows).astype(np.int64))
        inputs = x[:, :-1].contiguous()
        labels = x[:, 1:].contiguous()
        for pad in pads - {-1}:
            labels[labels == pad] = IGNORE_INDEX
        out = {"input_ids": inputs, "labels": labels}
        if self.with_doc_ids:
            out["doc_ids"] = doc_ids_of(inputs, self.eos_id)
        return out

    def spans_at(self, cursor: int, spans: list[tuple[int, int]]) -> dict:
        """Only input positions ``spans`` (``[start, stop)`` within ``[0, seq_len)``, in order)
        of this rank's rows at ``cursor``, e.g. a context-parallel rank's chunks: reads just
        the blocks those tokens lie in. Returns ``input_ids`` and ``labels`` [B, sum of span
        lengths] (as ``batch_at`` sliced at the spans), ``span_eos`` [B, n_spans] (EOS inputs
        in each span) and, with doc ids, ``doc_ids`` counted from each span's start:
        :func:`span_doc_ids` turns them into ``batch_at``'s ids given every span's counts."""
        for a, b in spans:
            if not 0 <= a < b <= self.seq_len:
                raise ValueError(f"span ({a}, {b}) outside [0, {self.seq_len})")
        rows, pads = [], set()
        for g in self.rank_rows(cursor):
            s, w = self.locate(g)
            rows.append(np.concatenate([self.window(s, w, a, b + 1) for a, b in spans]))
            pads.add(self.sources[s].pad_id)
        x = torch.from_numpy(np.stack(rows).astype(np.int64))
        # each span was read with one extra token (its last label): drop it from the inputs
        offsets = np.cumsum([0] + [b - a + 1 for a, b in spans[:-1]])
        keep = torch.cat([torch.arange(b - a) + int(o) for o, (a, b) in zip(offsets, spans)])
        inputs, labels = x[:, keep], x[:, keep + 1]
        for pad in pads - {-1}:
            labels[labels == pad] = IGNORE_INDEX
        parts = inputs.split([b - a for a, b in spans], dim=1)
        out = {"input_ids": inputs, "labels": labels,
               "span_eos": torch.stack([(p == self.eos_id).sum(1) for p in parts], 1)}
        if self.with_doc_ids:
            out["doc_ids"] = torch.cat([doc_ids_of(p, self.eos_id) for p in parts], 1)
        return out

    def local_at(self, cursor: int) -> dict:
        """What this rank trains on at ``cursor``: ``batch_at``, or under context parallel
        only this cp rank's two chunks of each row (``spans_at``; its ``span_eos`` marks the
        batch as already split, ``parallel.context_parallel.CPPlan.split`` completes the
        document ids from the other ranks' counts)."""
        if self.cp_spans is None:
            return self.batch_at(cursor)
        return self.spans_at(cursor, self.cp_spans)

    def epochs(self) -> list[float]:
        """Epochs completed so far per source (for logging)."""
        if len(self.sources) == 1:
            return [float(self.cursor / self.sources[0].n_windows)]
        out = []
        for s, src in enumerate(self.sources):
            share = self.mixture.counts[s] / MIX_CHUNK
            out.append(float(self.cursor * share / src.n_windows))
        return out

    # ---- checkpointing -----------------------------------------------------------------

    def state_dict(self) -> dict:
        """Plain ints, identical on every rank (independent of dp_rank and dp_size)."""
        return {"cursor": int(self.cursor), "seed": self.seed, "seq_len": self.seq_len,
                "fingerprint": self._fingerprint}

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("fingerprint") != self._fingerprint or sd.get("seq_len") != self.seq_len:
            raise UserError("loader state in the checkpoint is for other data (the datasets, mixture "
                            "weights, data.seq_len or data.shuffle changed); resume with the original ones")
        if sd.get("seed") != self.seed:
            raise UserError(f"loader state was saved with seed {sd.get('seed')}, this run uses "
                            f"{self.seed}; keep train.seed when resuming")
        self.cursor = int(sd["cursor"])


def cp_spans(seq_len: int, cp: int, rank: int) -> list[tuple[int, int]]:
    """Input positions ``[start, stop)`` of cp rank ``rank``: chunks ``rank`` and ``2cp-1-rank``
    of ``2cp`` (the split of ``parallel.context_parallel.chunk_positions``)."""
    c = seq_len // (2 * cp)
    return [(i * c, (i + 1) * c) for i in (rank, 2 * cp - 1 - rank)]


def doc_ids_of(inputs: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Per-token document index within each row; it increments *after* each EOS."""
    eos = (inputs == eos_id).long()
    return eos.cumsum(dim=1) - eos


def span_doc_ids(doc_ids: torch.Tensor, spans: list[tuple[int, int]], eos_before: torch.Tensor) -> torch.Tensor:
    """``spans_at``'s per-span ``doc_ids`` -> the whole row's ids (as ``batch_at``), given
    ``eos_before`` [B, n_spans]: EOS inputs before each span's start in the row (the sum of
    the ``span_eos`` of all earlier positions, e.g. gathered over the cp ranks)."""
    parts = doc_ids.split([b - a for a, b in spans], dim=1)
    return torch.cat([p + eos_before[:, i:i + 1] for i, p in enumerate(parts)], 1)


def _check_compatible(datasets: list[Dataset], eos_id: int | None, model_vocab: int | None) -> None:
    first = datasets[0]
    for ds in datasets[1:]:
        for key in ("vocab_size", "eos_id"):
            if ds.meta[key] != first.meta[key]:
                raise UserError(f"data.mixture: {key} differs between {first.path} ({first.meta[key]}) "
                                f"and {ds.path} ({ds.meta[key]}); all sources need one tokenizer")
    if eos_id is not None and eos_id != first.meta["eos_id"]:
        raise UserError(f"tokenizer eos_id {eos_id} does not match the data's eos_id "
                        f"{first.meta['eos_id']} ({first.path})")
    if model_vocab is not None and first.meta["vocab_size"] > model_vocab:
        raise UserError(f"data vocab_size {first.meta['vocab_size']} ({first.path}) exceeds "
                        f"model.vocab_size={model_vocab}")


def eval_batches(cfg: DataConfig, split: str, batch: int, n_batches: int, dp_rank: int = 0,
                 dp_size: int = 1, cache_dir: str | None = None, eos_id: int | None = None,
                 doc_ids: bool = True, cp_rank: int = 0, cp_size: int = 1) -> list[dict]:
    """A fixed list of held-out batches (no shuffling, seed 0): the same in every run.

    ``batch`` is the global evaluation batch; with ``dp_size > 1`` each rank gets its slice
    (with ``cp_size > 1`` only its cp rank's chunks, as in training).
    Sources smaller than ``batch * n_batches`` windows are cycled.
    """
    if n_batches < 1:
        raise UserError(f"train.eval_batches must be >= 1, got {n_batches}")
    it = TokenBatches(dataclasses.replace(cfg, shuffle=False), split, batch, dp_rank, dp_size,
                      seed=0, cache_dir=cache_dir, eos_id=eos_id, doc_ids=doc_ids, shuffle=False,
                      cp_rank=cp_rank, cp_size=cp_size)
    return [next(it) for _ in range(n_batches)]


def resolve_tokenizer(cfg: DataConfig, cache_dir: str | None = None) -> str:
    """``data.tokenizer``, or the first dataset's tokenizer.model (fetched for remotes)."""
    if cfg.tokenizer:
        return cfg.tokenizer
    path = _sources_of(cfg)[0][0]
    return open_dataset(path, cache_dir or cfg.cache_dir or None).tokenizer_path()
