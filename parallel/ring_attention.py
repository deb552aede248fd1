"""Causal attention over a sequence split across context-parallel ranks.

Layout (see ``parallel/context_parallel.py``): the sequence of ``S`` tokens is cut into
``2N`` chunks of ``c = S / 2N``; cp rank ``r`` holds chunks ``r`` and ``2N-1-r``, in that
order. Masks are decided per chunk pair from chunk indices (a later chunk's keys are never
seen, an earlier chunk's are all seen, the same chunk is causal), intersected with the
document mask (``seg``: global document-run index per position, so documents may cross
chunk and rank boundaries).

Two modes:

- :func:`ring_attention`: K/V blocks (KV heads only under GQA/MQA) travel around the cp
  ring; rank ``r`` at step ``j`` computes against the block of rank ``r - j`` and merges
  the partial output with the log-sum-exp rule. The next block's transfer (isend/irecv)
  is issued before the current block's compute. Backward re-circulates K/V and sends each
  block's dK/dV accumulator along behind it, one hop per step, so it arrives complete at
  the block's owner after the last step.
- :func:`alltoall_attention` (Ulysses): an all-to-all turns sequence shards into head
  shards, the full sequence of ``H/N`` heads is attended with ``kernels.attention`` in
  natural order, and a second all-to-all turns it back.

Block compute: pure torch (fp32 scores, query tiles of ``TILE`` rows to bound memory), the
reference, on any device; or PyTorch's fused SDPA kernels with their log-sum-exp
(``kernels/attention_block.py``). ``PRETRAIN_KERNEL_ATTENTION_BLOCK=torch|fused`` chooses;
by default CUDA uses the fused kernel and CPU the reference (the CPU tests prove both).
"""

from __future__ import annotations

import math
import os

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

import kernels
from kernels import attention_block

TILE = 1024  # query rows per score tile: memory O(TILE x block) instead of O(block^2)


def chunk_ids(rank: int, n: int) -> tuple[int, int]:
    """The two chunk indices (of ``2n``) rank ``rank`` holds, in local order."""
    return rank, 2 * n - 1 - rank


def pair_kind(qc: int, kc: int) -> str | None:
    """How query chunk ``qc`` sees key chunk ``kc``: 'full', 'causal' or None (masked)."""
    if kc < qc:
        return "full"
    return "causal" if kc == qc else None


# ---- one (query chunk, key chunk) block -------------------------------------------------

def _tile_mask(kind: str, seg_q, seg_k, t: int, sq: int, sk: int, device):
    """Boolean mask [B or 1, 1, 1, sq, sk] of query rows ``t..t+sq`` against keys ``0..sk``
    (None: everything visible). 'causal': row ``t + i`` sees keys ``<= t + i``."""
    m = None
    if kind == "causal":
        m = torch.ones(sq, sk, dtype=torch.bool, device=device).tril(t)[None]
    if seg_q is not None:
        same = seg_q[:, t:t + sq, None] == seg_k[:, None, :sk]
        m = same if m is None else same & m
    return None if m is None else m[:, None, None]


def _scores(q, k, scale, mask):
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    return s if mask is None else s.masked_fill(~mask, float("-inf"))


def _probs(s, lse):
    return torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])


def _tiles(kind: str, sq_total: int, sk_total: int):
    """(row start, rows, visible keys) per query tile; causal tiles skip the masked keys.
    Long key blocks get shorter tiles (about ``TILE * TILE`` scores per head)."""
    rows = max(16, min(TILE, TILE * TILE // max(sk_total, 1)))
    for t in range(0, sq_total, rows):
        sq = min(rows, sq_total - t)
        yield t, sq, (t + sq if kind == "causal" else sk_total)


def block_forward(q, k, v, kind, seg_q, seg_k, scale):
    """q [B, Hkv, g, sq, D], k/v [B, Hkv, 1, sk, D] -> (out fp32 [.., sq, D], lse [.., sq])."""
    outs, lses = [], []
    for t, sq, sk in _tiles(kind, q.shape[-2], k.shape[-2]):
        m = _tile_mask(kind, seg_q, seg_k, t, sq, sk, q.device)
        s = _scores(q[..., t:t + sq, :], k[..., :sk, :], scale, m)
        lse = torch.logsumexp(s, -1)
        outs.append(torch.matmul(_probs(s, lse), v[..., :sk, :].float()))
        lses.append(lse)
    return torch.cat(outs, -2), torch.cat(lses, -1)


def block_backward(q, k, v, dout, delta, lse, kind, seg_q, seg_k, scale):
    """Gradients of one block given the *final* lse and ``delta = rowsum(dout * out)``:
    (dq fp32 like q, dk fp32 [B, Hkv, 1, sk, D], dv likewise)."""
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
    for t, sq, sk in _tiles(kind, q.shape[-2], k.shape[-2]):
        qt, kt, vt = q[..., t:t + sq, :].float(), k[..., :sk, :].float(), v[..., :sk, :].float()
        p = _probs(_scores(qt, kt, scale, _tile_mask(kind, seg_q, seg_k, t, sq, sk, q.device)),
                   lse[..., t:t + sq])  # [B, Hkv, g, sq, sk]
        do = dout[..., t:t + sq, :].float()
        dv[..., :sk, :] += torch.matmul(p.transpose(-1, -2), do).sum(2, keepdim=True)
        ds = p * (torch.matmul(do, vt.transpose(-1, -2)) - delta[..., t:t + sq, None])
        dq[..., t:t + sq, :] = torch.matmul(ds, kt) * scale
        dk[..., :sk, :] += (torch.matmul(ds.transpose(-1, -2), qt) * scale).sum(2, keepdim=True)
    return dq, dk, dv


BLOCK_ENV = "PRETRAIN_KERNEL_ATTENTION_BLOCK"


def use_fused_blocks(device: torch.device) -> bool:
    """Whether blocks run the fused kernel (``BLOCK_ENV``; default: on CUDA only)."""
    choice = os.environ.get(BLOCK_ENV, "auto")
    if choice not in ("auto", "torch", "fused"):
        raise ValueError(f"{BLOCK_ENV}={choice!r}: use torch, fused or auto")
    return choice == "fused" or (choice == "auto" and device.type == "cuda")


def _forward_block(fused, q, k, v, kind, seg_q, seg_k, scale):
    if fused:
        mask = _tile_mask(kind, seg_q, seg_k, 0, q.shape[-2], k.shape[-2], q.device)
        return attention_block.block_forward(q, k, v, mask, scale)
    return block_forward(q, k, v, kind, seg_q, seg_k, scale)


def _backward_block(fused, q, k, v, dout, out, delta, lse, kind, seg_q, seg_k, scale):
    if fused:
        mask = _tile_mask(kind, seg_q, seg_k, 0, q.shape[-2], k.shape[-2], q.device)
        return attention_block.block_backward(q, k, v, dout, out, lse, mask, scale)
    return block_backward(q, k, v, dout, delta, lse, kind, seg_q, seg_k, scale)


def merge(out, lse, out_b, lse_b):
    """Log-sum-exp merge of two partial attention results (rows with -inf lse carry 0)."""
    new = torch.logaddexp(lse, lse_b)
    safe = torch.where(torch.isinf(new), 0.0, new)
    wa = torch.where(torch.isinf(lse), 0.0, torch.exp(lse - safe))
    wb = torch.where(torch.isinf(lse_b), 0.0, torch.exp(lse_b - safe))
    return out * wa[..., None] + out_b * wb[..., None], new


# ---- the ring ---------------------------------------------------------------------------

class CPGroup:
    """The cp process group as the ring sees it: size, rank, neighbours' global ranks
    (``group=None``: one rank, no communication)."""

    def __init__(self, group):
        self.group = group
        if group is None:
            self.size, self.rank = 1, 0
            return
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.size)
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.size)

    def exchange(self, send: torch.Tensor, tag: int):
        """Send ``send`` to the next rank, receive the previous rank's into a new buffer;
        returns (recv buffer, [works]) without waiting."""
        recv = torch.empty_like(send)
        works = [dist.isend(send, self.next, group=self.group, tag=tag),
                 dist.irecv(recv, self.prev, group=self.group, tag=tag)]
        return recv, works


def _wait(works):
    for w in works:
        w.wait()


def _split_heads(q, k, v):
    """[B, S, H, D] -> q [B, Hkv, g, S, D]; k, v [B, Hkv, 1, S, D]."""
    B, S, H, D = q.shape
    hkv = k.shape[2]
    qg = q.view(B, S, hkv, H // hkv, D).permute(0, 2, 3, 1, 4)
    return qg, k.permute(0, 2, 1, 3).unsqueeze(2), v.permute(0, 2, 1, 3).unsqueeze(2)


def _seg_chunks(seg, chunks, c):
    if seg is None:
        return [None] * len(chunks)
    return [seg[:, i * c:(i + 1) * c] for i in chunks]


def _blocks(cp: CPGroup, src: int, c: int):
    """(local q slice, kv slice of the source block, kind, q chunk, k chunk) pairs with work."""
    mine, theirs = chunk_ids(cp.rank, cp.size), chunk_ids(src, cp.size)
    for a, qc in enumerate(mine):
        for b, kc in enumerate(theirs):
            kind = pair_kind(qc, kc)
            if kind is not None:
                yield slice(a * c, (a + 1) * c), slice(b * c, (b + 1) * c), kind, qc, kc


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, seg, cp: CPGroup):
        qg, kg, vg = _split_heads(q, k, v)
        c = q.shape[1] // 2
        scale = 1.0 / math.sqrt(q.shape[-1])
        out = torch.zeros(qg.shape, dtype=torch.float32, device=q.device)
        lse = torch.full(qg.shape[:-1], float("-inf"), dtype=torch.float32, device=q.device)
        kv = torch.stack([kg, vg]).contiguous()
        seg_all = seg  # [B, S] global document runs (None: causal only)
        fused = use_fused_blocks(q.device)
        for j in range(cp.size):
            src = (cp.rank - j) % cp.size
            pending = cp.exchange(kv, tag=j) if j < cp.size - 1 else None  # before compute
            for qs, ks, kind, qc, kc in _blocks(cp, src, c):
                sq, sk = _seg_chunks(seg_all, (qc, kc), c)
                o_b, l_b = _forward_block(fused, qg[..., qs, :], kv[0][..., ks, :], kv[1][..., ks, :], kind,
                                          sq, sk, scale)
                out[..., qs, :], lse[..., qs] = merge(out[..., qs, :], lse[..., qs], o_b, l_b)
            if pending is not None:
                kv, works = pending
                _wait(works)
        ctx.save_for_backward(q, k, v, out, lse, seg)
        ctx.cp, ctx.fused = cp, fused
        B, S, H, D = q.shape
        return out.permute(0, 3, 1, 2, 4).reshape(B, S, H, D).to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, seg = ctx.saved_tensors
        cp: CPGroup = ctx.cp
        qg, kg, vg = _split_heads(q, k, v)
        B, S, H, D = q.shape
        c, scale = S // 2, 1.0 / math.sqrt(D)
        dog = dout.reshape(B, S, kg.shape[1], -1, D).permute(0, 2, 3, 1, 4)
        delta = (dog.float() * out).sum(-1)
        dq = torch.zeros(qg.shape, dtype=torch.float32, device=q.device)
        kv = torch.stack([kg, vg]).contiguous()
        acc_in = None  # (buffer, works) of the dK/dV accumulator arriving for this step's block
        sent = []
        for j in range(cp.size):
            src = (cp.rank - j) % cp.size
            pending = cp.exchange(kv, tag=2 * j) if j < cp.size - 1 else None
            dkv = torch.zeros(kv.shape, dtype=torch.float32, device=q.device)
            for qs, ks, kind, qc, kc in _blocks(cp, src, c):
                sq, sk = _seg_chunks(seg, (qc, kc), c)
                g_q, g_k, g_v = _backward_block(ctx.fused, qg[..., qs, :], kv[0][..., ks, :], kv[1][..., ks, :],
                                                dog[..., qs, :], out[..., qs, :], delta[..., qs], lse[..., qs],
                                                kind, sq, sk, scale)
                dq[..., qs, :] += g_q
                dkv[0][..., ks, :] += g_k
                dkv[1][..., ks, :] += g_v
            if acc_in is not None:
                buf, works = acc_in
                _wait(works)
                dkv += buf
            if cp.size == 1:  # nothing travels: the block is this rank's own
                acc_in = (dkv, [])
                break
            _wait(sent)
            recv, works = cp.exchange(dkv, tag=2 * j + 1)  # on to the next holder
            sent, acc_in = works[:1], (recv, works[1:])
            if pending is not None:
                kv, works = pending
                _wait(works)
        buf, works = acc_in
        _wait(works + sent)
        dk = buf[0].squeeze(2).permute(0, 2, 1, 3).to(k.dtype)
        dv = buf[1].squeeze(2).permute(0, 2, 1, 3).to(v.dtype)
        return dq.permute(0, 3, 1, 2, 4).reshape(B, S, H, D).to(q.dtype), dk, dv, None, None


@torch.compiler.disable
def ring_attention(q, k, v, seg: torch.Tensor | None, cp: CPGroup) -> torch.Tensor:
    """Causal (and document-masked, with ``seg``) attention of this rank's two chunks.

    q: [B, 2c, H, D]; k, v: [B, 2c, Hkv, D] (local tokens, chunk layout above);
    ``seg``: [B, S] global document-run index per position, or None. Returns [B, 2c, H, D].
    """
    return _RingAttention.apply(q, k, v, seg, cp)


# ---- all-to-all (Ulysses) ---------------------------------------------------------------

def _seq_to_heads(x: torch.Tensor, cp: CPGroup) -> torch.Tensor:
    """[B, Sl, H, D] sequence shard -> [B, N*Sl, H/N, D] head shard (sequence rank-major)."""
    B, Sl, H, D = x.shape
    n = cp.size
    send = x.reshape(B, Sl, n, H // n, D).permute(2, 0, 1, 3, 4).contiguous()
    recv = funcol.wait_tensor(funcol.all_to_all_single_autograd(send.view(n, -1), None, None, cp.group))
    return recv.view(n, B, Sl, H // n, D).permute(1, 0, 2, 3, 4).reshape(B, n * Sl, H // n, D)


def _heads_to_seq(x: torch.Tensor, cp: CPGroup) -> torch.Tensor:
    """Inverse of :func:`_seq_to_heads`."""
    B, S, h, D = x.shape
    n = cp.size
    send = x.reshape(B, n, S // n, h, D).permute(1, 0, 2, 3, 4).contiguous()
    recv = funcol.wait_tensor(funcol.all_to_all_single_autograd(send.view(n, -1), None, None, cp.group))
    return recv.view(n, B, S // n, h, D).permute(1, 2, 0, 3, 4).reshape(B, S // n, n * h, D)


def rank_major_order(n: int, seq_len: int, device=None) -> torch.Tensor:
    """Global positions in rank-major order (rank 0's chunks, rank 1's, ...)."""
    c = seq_len // (2 * n)
    idx = [torch.arange(i * c, (i + 1) * c, device=device) for r in range(n) for i in chunk_ids(r, n)]
    return torch.cat(idx)


@torch.compiler.disable
def alltoall_attention(q, k, v, doc_ids: torch.Tensor | None, cp: CPGroup) -> torch.Tensor:
    """Ulysses attention: local heads must divide by the cp size (KV heads are repeated to
    the query heads first when they do not). ``doc_ids``: [B, S] global, natural order."""
    n = cp.size
    if k.shape[2] % n:
        g = q.shape[2] // k.shape[2]
        k, v = k.repeat_interleave(g, 2), v.repeat_interleave(g, 2)
    order = rank_major_order(n, q.shape[1] * n, q.device)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    qh, kh, vh = (_seq_to_heads(t, cp).index_select(1, inverse) for t in (q, k, v))
    out = kernels.attention(qh, kh, vh, doc_ids)
    return _heads_to_seq(out.index_select(1, order), cp)
