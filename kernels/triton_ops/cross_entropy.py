"""Cross-entropy kernels: per-row statistics (one online-softmax pass) and the
gradient wrt the logits (a second pass, optionally in place over the logits).

Used two ways: ``cross_entropy`` on given logits, and ``triton_chunk`` as the per-chunk
step of the chunked LM head + loss (``kernels.fused_loss``), where the gradient
overwrites the chunk's logits so no second ``[chunk, vocab]`` buffer is needed. The
statistics are local to a vocab shard and combined across a process group in torch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from kernels.fused_loss import chunked_linear_cross_entropy
from kernels.triton_ops._common import rows


@triton.jit
def _ce_stats(X, LABELS, M_OUT, S_OUT, T_OUT, stride_x, V, vocab_start, ignore_index,
              BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = X + row * stride_x
    m = float("-inf")
    s = 0.0
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    label = tl.load(LABELS + row)
    local = label - vocab_start
    hit = (label != ignore_index) & (local >= 0) & (local < V)
    t = tl.load(base + local, mask=hit, other=0.0).to(tl.float32)
    tl.store(M_OUT + row, m)
    tl.store(S_OUT + row, s)
    tl.store(T_OUT + row, t)


@triton.jit
def _ce_grad(X, OUT, LABELS, LSE, SCALE, stride_x, stride_o, V, vocab_start, z_loss,
             BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    lse = tl.load(LSE + row)
    scale = tl.load(SCALE + row)
    local = tl.load(LABELS + row) - vocab_start
    coef = scale * (1.0 + 2.0 * z_loss * lse)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < V
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.exp(x - lse) * coef - tl.where(cols == local, scale, 0.0)
        tl.store(OUT + row * stride_o + cols, g.to(OUT.dtype.element_ty), mask=mask)


def _block(v: int) -> int:
    return min(triton.next_power_of_2(v), 4096)


def _stats(x2, labels, vocab_start, ignore_index):
    n, V = x2.shape
    m, s, t = (torch.empty(n, dtype=torch.float32, device=x2.device) for _ in range(3))
    if n:
        _ce_stats[(n,)](x2, labels, m, s, t, x2.stride(0), V, vocab_start, ignore_index,
                        BLOCK=_block(V), num_warps=8)
    return m, s, t


def _grad(x2, out, labels, lse, row_scale, vocab_start, z_loss):
    n, V = x2.shape
    if n:
        _ce_grad[(n,)](x2, out, labels, lse, row_scale, x2.stride(0), out.stride(0), V,
                       vocab_start, float(z_loss), BLOCK=_block(V), num_warps=8)
    return out


def _row_loss(lse, t, valid, z_loss):
    loss = lse - t
    if z_loss:
        loss = loss + z_loss * lse * lse
    return torch.where(valid, loss, 0.0)


def triton_chunk(logits, labels, vocab_start, ignore_index, z_loss, row_scale, group, need_grad):
    """Chunk step for ``kernels.fused_loss``: same contract as ``fused_loss.torch_chunk``;
    the returned gradient is written over ``logits``."""
    labels = labels.contiguous()
    x2 = rows(logits, logits.shape[-1])
    m, s, t = _stats(x2, labels, vocab_start, ignore_index)
    if group is not None:
        m_all = m.clone()
        dist.all_reduce(m_all, op=dist.ReduceOp.MAX, group=group)
        st = torch.stack([s * torch.exp(m - m_all), t])
        dist.all_reduce(st, op=dist.ReduceOp.SUM, group=group)
        m, s, t = m_all, st[0], st[1]
    lse = m + torch.log(s)
    loss = _row_loss(lse, t, labels != ignore_index, z_loss)
    if not need_grad:
        return loss, None
    return loss, _grad(x2, x2, labels, lse, row_scale.float().contiguous(), vocab_start, z_loss)


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ignore_index, z_loss, reduction):
        V = logits.shape[-1]
        x2 = rows(logits, V)
        y = labels.reshape(-1).contiguous()
        if y.shape[0] != x2.shape[0]:
            raise ValueError(f"cross_entropy: logits {tuple(logits.shape)} and labels "
                             f"{tuple(labels.shape)} do not match")
        m, s, t = _stats(x2, y, 0, ignore_index)
        lse = m + torch.log(s)
        valid = y != ignore_index
        total = _row_loss(lse, t, valid, z_loss).sum()
        denom = valid.sum().clamp(min=1).float() if reduction == "mean" else torch.ones((), device=y.device)
        ctx.save_for_backward(x2, y, lse, denom)
        ctx.meta = (logits.shape, z_loss, ignore_index)
        return total / denom

    @staticmethod
    def backward(ctx, grad_out):
        x2, y, lse, denom = ctx.saved_tensors
        shape, z_loss, ignore_index = ctx.meta
        row_scale = ((y != ignore_index).float() * (grad_out / denom)).contiguous()
        out = torch.empty(x2.shape, dtype=x2.dtype, device=x2.device)
        _grad(x2, out, y, lse, row_scale, 0, z_loss)
        return out.view(shape), None, None, None, None


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                  z_loss: float = 0.0, reduction: str = "mean") -> torch.Tensor:
    """Triton cross-entropy on given logits; same contract as the reference."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"cross_entropy: reduction '{reduction}' not in mean|sum")
    return _CrossEntropy.apply(logits, labels, int(ignore_index), float(z_loss), reduction)


def linear_cross_entropy(hidden, weight, labels, ignore_index=-100, z_loss=0.0, chunk_size=0,
                         reduction="mean", process_group=None, reduce_hidden_grad=True):
    """Chunked LM head + loss with the Triton chunk step; same contract as the reference."""
    return chunked_linear_cross_entropy(hidden, weight, labels, ignore_index, z_loss, chunk_size,
                                        reduction, process_group, reduce_hidden_grad,
                                        chunk_fn=triton_chunk)
