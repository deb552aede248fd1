"""Rank-local reads under context parallelism (``TokenBatches(cp_rank=, cp_size=)``).

A row of ``data.seq_len`` tokens longer than the stored block is assembled from consecutive
blocks; a cp rank reads only the blocks holding its two chunks (i and 2N-1-i) plus each
chunk's one-token label overlap. Checked here: the bytes each rank reads (~2/(2N) of the row,
up to block granularity), that what a rank trains on equals the split of the one-process
batch (tokens, labels, document ids, RoPE positions), and exact loader resume under cp
(also across cp layouts). tests/test_cp_long_context.py runs the trainer on it.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from pretrain.config import DataConfig
from pretrain.data.loader import TokenBatches, cp_spans


def _cfg(path, seq_len: int) -> DataConfig:
    return DataConfig(path=str(path), seq_len=seq_len)


def _local(its: list[TokenBatches], cursor: int) -> list[dict]:
    """What each cp rank trains on: its rank-local read, completed as ``CPPlan.split`` does
    (the all-gather of the span EOS counts done here by stacking)."""
    from parallel.context_parallel import local_doc_ids

    parts = [it.local_at(cursor) for it in its]
    eos = torch.stack([p["span_eos"] for p in parts])
    return [{"input_ids": p["input_ids"], "labels": p["labels"],
             "doc_ids": local_doc_ids(p["doc_ids"], eos, r)} for r, p in enumerate(parts)]


def _check_split(path, seq: int, cp: int, dp: int, batch: int) -> None:
    from parallel.context_parallel import chunk_positions, split_batch

    one = [TokenBatches(_cfg(path, seq), "train", batch, d, dp, seed=5) for d in range(dp)]
    # documents are long (~10k tokens): the first step plus steps where a document ends
    ends = [c for c in range(batch, 60 * batch, batch)
            if int((one[0].batch_at(c)["input_ids"][:, seq // 4:] == one[0].eos_id).sum())]
    assert len(ends) >= 2
    for d in range(dp):
        its = [TokenBatches(_cfg(path, seq), "train", batch, d, dp, seed=5, cp_rank=r, cp_size=cp)
               for r in range(cp)]
        for cur in [0] + ends[:2]:
            full = one[d].batch_at(cur)
            for r, got in enumerate(_local(its, cur)):
                want = split_batch(full, cp, r)
                for key in ("input_ids", "labels", "doc_ids"):
                    assert torch.equal(got[key], want[key]), (seq, cp, d, cur, r, key)
                pos = torch.cat([torch.arange(a, b) for a, b in cp_spans(seq, cp, r)])
                assert torch.equal(pos, chunk_positions(seq, cp, r))  # RoPE positions of the tokens


def test_cp_rank_batches_are_the_split_of_the_one_process_batch(tiny_dataset):
    """Blocks of 132 tokens, rows of 1024 / 2048 (8-16 blocks); shuffled; with dp 2 too."""
    _check_split(tiny_dataset, 1024, 2, 2, 4)
    _check_split(tiny_dataset, 2048, 4, 1, 2)


def _read(it: TokenBatches, cursor: int) -> dict:
    it._blocks.clear()
    it.read_stats.update(blocks=0, bytes=0, tokens=0)
    it.local_at(cursor)
    return dict(it.read_stats)


def _block_bound(seq: int, cp: int, block: int, rows: int) -> int:
    """Blocks a rank may touch: each chunk of seq/(2cp) + 1 tokens lies in at most
    ceil((seq/(2cp)) / block) + 1 blocks."""
    return rows * 2 * (math.ceil(seq / (2 * cp) / block) + 1)


@pytest.fixture(scope="module")
def blocks_2049(tiny_dataset, tmp_path_factory):
    """The tiny corpus prepared into blocks of 2049 tokens (~200k tokens: 6 rows of 32768)."""
    from pretrain.data.prepare import prepare

    root = tiny_dataset.parent
    out = tmp_path_factory.mktemp("blocks2049") / "data"
    prepare([str(root / "corpus.jsonl")], out, tokenizer=str(root / "tok.model"), sample_len=2049,
            val_fraction=0.05, workers=1, progress=False)
    return out


@pytest.mark.parametrize("cp", [2, 4, 8])
def test_cp_rank_reads_about_its_share_of_a_32k_row(blocks_2049, cp):
    """data.seq_len 32768 from blocks of 2049: each cp rank reads ~2/(2cp) of the row."""
    seq, rows = 32768, 2
    full = TokenBatches(_cfg(blocks_2049, seq), "train", rows, 0, 1, seed=0)
    whole = _read(full, 2)
    assert whole["tokens"] == rows * (seq + 1)
    its = [TokenBatches(_cfg(blocks_2049, seq), "train", rows, 0, 1, seed=0, cp_rank=r, cp_size=cp)
           for r in range(cp)]
    stats = [_read(it, 2) for it in its]
    share = [s["bytes"] / whole["bytes"] for s in stats]
    print(f"cp{cp}: row {seq + 1} tokens, one process reads {whole['bytes']} B ({whole['blocks']} blocks); "
          f"per cp rank {[s['bytes'] for s in stats]} B = {[round(x, 3) for x in share]} of it "
          f"(ideal {1 / cp:.3f}), tokens cut {stats[0]['tokens']}")
    block_bytes = whole["bytes"] // whole["blocks"]
    for s in stats:
        assert s["tokens"] == rows * 2 * (seq // (2 * cp) + 1)  # its chunks + the label overlap
        assert s["blocks"] <= _block_bound(seq, cp, 2049, rows)
        assert s["tokens"] * block_bytes / 2049 <= s["bytes"] == s["blocks"] * block_bytes
    # block granularity costs at most two partial blocks per chunk beyond the ideal share
    assert max(share) <= 1 / cp + rows * 2 * 2 * block_bytes / whole["bytes"]
    # together the ranks read each block about once (overlaps only at chunk edges)
    assert sum(s["bytes"] for s in stats) <= whole["bytes"] + rows * 2 * cp * block_bytes


def test_cp_loader_resumes_exactly_and_across_cp_layouts(tiny_dataset):
    """Cursor state saved mid-run under cp resumes to the uninterrupted rank-local batches,
    also when the run that saved it used another cp size (or none)."""
    seq, batch = 1024, 2
    mk = lambda cp, r: TokenBatches(_cfg(tiny_dataset, seq), "train", batch, 0, 1, seed=7,
                                    cp_rank=r, cp_size=cp)
    straight = [mk(4, r) for r in range(4)]
    ref = [[next(it) for _ in range(6)] for it in straight]
    for saver in (mk(4, 1), mk(2, 0), mk(1, 0)):
        for _ in range(3):
            next(saver)
        state = json.loads(json.dumps(saver.state_dict()))
        for r in range(4):
            it = mk(4, r)
            it.load_state_dict(state)
            for step in range(3, 6):
                got = next(it)
                assert all(torch.equal(got[k], ref[r][step][k]) for k in ref[r][step]), (r, step)


def test_cp_loader_rejects_a_seq_len_it_cannot_split(tiny_dataset):
    from pretrain.errors import UserError

    with pytest.raises(UserError, match="data.seq_len: 1022 must be divisible by 2\\*parallel.cp = 4"):
        TokenBatches(_cfg(tiny_dataset, 1022), "train", 2, 0, 1, seed=0, cp_rank=0, cp_size=2)
