"""Multi-query associative recall (MQAR, Zoology: Arora et al. 2023), seeded and resumable.

A sequence of ``seq_len`` tokens, as Zoology's ``multiquery_ar`` lays it out:

* the vocabulary ``[0, V)`` is split in two: keys are ``[1, V // 2)``, values ``[V // 2, V)``;
* positions ``0 .. 2n-1`` hold ``n`` key-value pairs ``k1 v1 k2 v2 ...`` (distinct keys,
  distinct values);
* the rest holds each of the ``n`` keys once more, as a query, at even offsets ``2 g`` after
  the pairs; the gaps ``g`` are drawn without replacement from ``[0, (seq_len - 2n) // 2)``,
  either by Zoology's power law ``P(g) ~ (g + 1)^(a - 1)`` (``placement="power"``, ``a=0.01``:
  queries crowd towards the pairs) or uniformly (``placement="uniform"``);
* every other position is a random token of the whole vocabulary (keys included).

Labels are ``-100`` everywhere except at a query, where the label is the queried key's
value: the model must output it right after reading the key. So a row has exactly ``n``
labels, and a model that guesses among the values scores ``1 / (V - V // 2)``.

Sample ``i`` of a stream is generated from ``numpy.random.default_rng([seed, stream, i])``,
so a batch depends only on (seed, split, global sample index): the same on any number of
data-parallel ranks and after a resume, like ``TokenBatches``.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch

from pretrain.data.rows import RowCursor
from pretrain.errors import UserError

IGNORE_INDEX = -100
PLACEMENTS = ("power", "uniform")


def vocab_split(vocab_size: int) -> tuple[range, range]:
    """(keys, values) token ranges of a vocabulary of ``vocab_size`` (Zoology's split)."""
    half = vocab_size // 2
    return range(1, half), range(half, vocab_size)


def check_mqar(vocab_size: int, seq_len: int, pairs: int, where: str = "data.mqar.pairs") -> None:
    """UserError (one line naming ``where``) unless ``pairs`` pairs fit the vocabulary and length."""
    keys, values = vocab_split(vocab_size)
    if pairs < 1:
        raise UserError(f"{where}: {pairs} key-value pairs; need at least 1")
    if len(keys) < pairs or len(values) < pairs:
        raise UserError(f"{where}: {pairs} distinct keys and values need a vocabulary of at least "
                        f"{2 * pairs + 2} tokens (keys 1..V/2-1, values V/2..V-1); it has {vocab_size}")
    if seq_len < 4 * pairs:
        raise UserError(f"{where}: {pairs} pairs need a sequence of at least {4 * pairs} tokens "
                        f"(the pairs, then a query slot per key in at least as many gaps); it is {seq_len}")


def _gap_probs(space: int, placement: str, power_a: float) -> np.ndarray | None:
    if placement == "uniform":
        return None
    if placement != "power":
        raise UserError(f"mqar placement: {placement!r}; expected one of {', '.join(PLACEMENTS)}")
    p = power_a * np.arange(1, space + 1, dtype=np.float64) ** (power_a - 1)
    return p / p.sum()


def mqar_row(rng: np.random.Generator, vocab_size: int, seq_len: int, pairs: int,
             probs: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """One (inputs, labels) pair of int64 arrays of length ``seq_len``; see the module doc."""
    keys, values = vocab_split(vocab_size)
    k = rng.choice(len(keys), pairs, replace=False) + keys.start
    v = rng.choice(len(values), pairs, replace=False) + values.start
    ctx = 2 * pairs
    space = (seq_len - ctx) // 2
    gaps = rng.choice(space, pairs, replace=False, p=probs)
    inputs = rng.integers(0, vocab_size, seq_len, dtype=np.int64)
    inputs[0:ctx:2], inputs[1:ctx:2] = k, v
    labels = np.full(seq_len, IGNORE_INDEX, dtype=np.int64)
    at = ctx + 2 * gaps
    inputs[at], labels[at] = k, v
    return inputs, labels


def stream_id(split: str) -> int:
    """A stable integer per split name, so train and held-out samples are distinct streams."""
    return zlib.crc32(split.encode())


def mqar_batch(vocab_size: int, seq_len: int, pairs: int, seed: int, start: int, n: int,
               split: str = "val", placement: str = "power", power_a: float = 0.01) -> dict:
    """Samples ``start .. start+n-1`` of stream (seed, split): ``input_ids`` and ``labels`` [n, seq_len]."""
    check_mqar(vocab_size, seq_len, pairs)
    if not 0 < power_a <= 1:
        raise UserError(f"mqar power_a: {power_a}; expected a number in (0, 1]")
    probs = _gap_probs((seq_len - 2 * pairs) // 2, placement, power_a)
    sid = stream_id(split)
    rows = [mqar_row(np.random.default_rng([int(seed), sid, int(i)]), vocab_size, seq_len, pairs, probs)
            for i in range(start, start + n)]
    return {"input_ids": torch.from_numpy(np.stack([r[0] for r in rows])),
            "labels": torch.from_numpy(np.stack([r[1] for r in rows]))}


class MqarBatches(RowCursor):
    """Infinite MQAR batches for one data-parallel rank, with ``TokenBatches``' interface
    (``next``, ``batch_at``, ``state_dict``/``load_state_dict``, ``meta``)."""

    def __init__(self, vocab_size: int, seq_len: int, pairs: int, split: str, global_batch: int,
                 dp_rank: int, dp_size: int, seed: int, placement: str = "power", power_a: float = 0.01,
                 doc_ids: bool = False):
        super().__init__(global_batch, dp_rank, dp_size, seq_len)
        check_mqar(vocab_size, seq_len, pairs)
        self.args = dict(vocab_size=vocab_size, seq_len=seq_len, pairs=pairs, split=split,
                         placement=placement, power_a=power_a)
        self.seed, self.with_doc_ids = int(seed), doc_ids
        self._fingerprint = zlib.crc32(repr(sorted(self.args.items())).encode())
        keys, values = vocab_split(vocab_size)
        self.meta = {"task": "mqar", "vocab_size": vocab_size, "seq_len": seq_len, "split": split,
                     "pairs": pairs, "placement": placement, "keys": len(keys), "values": len(values)}

    @classmethod
    def from_config(cls, cfg, split: str, global_batch: int, dp_rank: int, dp_size: int,
                    seed: int) -> "MqarBatches":
        """From a run Config (``data.mqar``, ``data.seq_len``, ``model.vocab_size``)."""
        mq = cfg.data.mqar
        return cls(cfg.model.vocab_size, cfg.data.seq_len, mq.pairs, split, global_batch, dp_rank,
                   dp_size, seed, mq.placement, mq.power_a, doc_ids=cfg.model.doc_mask)

    def batch_at(self, cursor: int) -> dict:
        a = self.args
        out = mqar_batch(a["vocab_size"], a["seq_len"], a["pairs"], self.seed,
                         self.rank_rows(cursor).start, self.local_batch, a["split"],
                         a["placement"], a["power_a"])
        if self.with_doc_ids:  # one document per row
            out["doc_ids"] = torch.zeros_like(out["input_ids"])
        return out

    def state_dict(self) -> dict:
        return {"cursor": int(self.cursor), "seed": self.seed, "seq_len": self.seq_len,
                "fingerprint": self._fingerprint}

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("fingerprint") != self._fingerprint or sd.get("seed") != self.seed:
            raise UserError("loader state in the checkpoint is for other MQAR data (data.mqar.*, "
                            "data.seq_len, model.vocab_size or train.seed changed); resume with the original ones")
        self.cursor = int(sd["cursor"])


def eval_batches(cfg, split: str, batch: int, n_batches: int, dp_rank: int = 0, dp_size: int = 1) -> list[dict]:
    """A fixed list of held-out MQAR batches (seed 0, stream ``split``) for a run Config."""
    it = MqarBatches.from_config(cfg, split, batch, dp_rank, dp_size, seed=0)
    return [next(it) for _ in range(n_batches)]
