"""The fused block kernels of ring attention (kernels/attention_block.py) equal the pure-torch
blocks of parallel/ring_attention.py: one block's output and log-sum-exp, the gradients of a
block given the merged output of several, and a whole one-rank ring."""

from __future__ import annotations

import pytest
import torch

from kernels import attention_block
from kernels.reference import attention as reference_attention
from kernels.reference import doc_segments
from parallel import ring_attention as ra

TOL = 1e-5


def _inputs(B=2, hkv=2, g=3, sq=12, sk=12, D=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, hkv, g, sq, D, generator=gen)
    k = torch.randn(B, hkv, 1, sk, D, generator=gen)
    v = torch.randn(B, hkv, 1, sk, D, generator=gen)
    return q, k, v


def _segments(B, n=24):
    """Document runs [B, n]: boundaries at 5, 16 and (row 0) 19, so in the 'full' block of
    queries 12..23 against keys 0..11 the rows from 16 on see no key (fully masked rows)."""
    ids = torch.zeros(B, n, dtype=torch.long)
    ids[:, 5:] = 1
    ids[:, 16:] = 2
    ids[0, 19:] = 3
    return ids


@pytest.mark.parametrize("kind", ["full", "causal"])
@pytest.mark.parametrize("docs", [False, True])
def test_block_forward_equals_reference(kind, docs):
    q, k, v = _inputs()
    seg_q = seg_k = None
    if docs:
        seg = _segments(2)  # full: queries 12..23, keys 0..11; causal: positions 0..11
        seg_q, seg_k = (seg[:, 12:], seg[:, :12]) if kind == "full" else (seg[:, :12], seg[:, :12])
    want_o, want_l = ra.block_forward(q, k, v, kind, seg_q, seg_k, 0.3)
    mask = ra._tile_mask(kind, seg_q, seg_k, 0, 12, 12, q.device)
    got_o, got_l = attention_block.block_forward(q, k, v, mask, 0.3)
    dead = torch.isinf(want_l)
    if docs and kind == "full":
        assert dead.any()  # the case the kernel's lse convention needs fixing for
    assert torch.equal(torch.isinf(got_l), dead)
    assert (got_l - want_l)[~dead].abs().max() <= TOL
    assert (got_o - want_o).abs().max() <= TOL


@pytest.mark.parametrize("docs", [False, True])
def test_block_backward_given_merged_output_equals_reference(docs):
    """Two blocks (a 'full' one and the 'causal' diagonal) merged; each block's gradients from
    the merged out/lse equal the reference's."""
    q, k1, v1 = _inputs(seed=2)
    _, k2, v2 = _inputs(seed=3)
    seg = _segments(2) if docs else None
    s_prev, s_own = (seg[:, :12], seg[:, 12:]) if docs else (None, None)
    blocks = [(k1, v1, "full", s_own, s_prev), (k2, v2, "causal", s_own, s_own)]
    out = torch.zeros(q.shape)
    lse = torch.full(q.shape[:-1], float("-inf"))
    for k, v, kind, sq, sk in blocks:
        out, lse = ra.merge(out, lse, *ra.block_forward(q, k, v, kind, sq, sk, 0.35))
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(4))
    delta = (dout * out).sum(-1)
    for k, v, kind, sq, sk in blocks:
        want = ra.block_backward(q, k, v, dout, delta, lse, kind, sq, sk, 0.35)
        mask = ra._tile_mask(kind, sq, sk, 0, 12, 12, q.device)
        got = attention_block.block_backward(q, k, v, dout, out, lse, mask, 0.35)
        for g, w, name in zip(got, want, ("dq", "dk", "dv")):
            assert g.shape == w.shape, name
            assert (g - w).abs().max() <= TOL * max(1.0, w.abs().max().item()), (kind, name)


@pytest.mark.parametrize("docs", [False, True])
def test_one_rank_ring_with_fused_blocks_equals_attention(monkeypatch, docs):
    """The whole ring on one rank (two chunks: a causal, a full and a causal block) with fused
    blocks: output and q/k/v gradients equal full attention."""
    monkeypatch.setenv(ra.BLOCK_ENV, "fused")
    gen = torch.Generator().manual_seed(5)
    B, S, H, hkv, D = 2, 32, 4, 2, 8
    q, k, v = (torch.randn(B, S, h, D, generator=gen) for h in (H, hkv, hkv))
    doc = torch.zeros(B, S, dtype=torch.long)
    if docs:
        doc[:, 10:] = 1
        doc[1, 20:] = 2
    w = torch.randn(B, S, H, D, generator=gen)
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = reference_attention(*full, doc if docs else None)
    (ref * w).sum().backward()
    # one rank holds chunk 0 then chunk 1 of 2: natural order
    local = [t.clone().requires_grad_() for t in (q, k, v)]
    out = ra.ring_attention(*local, doc_segments(doc) if docs else None, ra.CPGroup(None))
    (out * w).sum().backward()
    assert (out - ref).abs().max() <= TOL
    for a, b in zip(local, full):
        assert (a.grad - b.grad).abs().max() <= TOL


def test_bad_block_choice_is_named(monkeypatch):
    monkeypatch.setenv(ra.BLOCK_ENV, "flash")
    with pytest.raises(ValueError, match=ra.BLOCK_ENV):
        ra.use_fused_blocks(torch.device("cpu"))
