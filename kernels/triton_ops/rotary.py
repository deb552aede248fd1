"""Rotary embedding (rotate-half layout) applied to q and k.

The backward of a rotation by theta is the rotation by -theta, so one kernel serves
both directions (``SIGN`` flips sin). Inputs may have any strides with a unit stride
on the head dim (e.g. q/k sliced out of a fused QKV projection); outputs are contiguous.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_ops._common import warps


@triton.jit
def _rotary(X, COS, SIN, Y,
            sxb, sxs, sxh, syb, sys, syh, scb, scs,
            R, S, H, HALF, SIGN: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # A program takes BLOCK_R (token, head) rows; row r is token r // H, head r % H.
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    tok = r // H
    h = r % H
    b = tok // S
    s = tok % S
    dmask = d < HALF
    mask = (r < R) & dmask
    c = tl.load(COS + b * scb + s * scs + d, mask=mask, other=0.0).to(tl.float32)
    sn = tl.load(SIN + b * scb + s * scs + d, mask=mask, other=0.0).to(tl.float32)
    if SIGN < 0:
        sn = -sn
    xp = X + b * sxb + s * sxs + h * sxh + d
    x1 = tl.load(xp, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(xp + HALF, mask=mask, other=0.0).to(tl.float32)
    yp = Y + b * syb + s * sys + h * syh + d
    tl.store(yp, (x1 * c - x2 * sn).to(Y.dtype.element_ty), mask=mask)
    tl.store(yp + HALF, (x2 * c + x1 * sn).to(Y.dtype.element_ty), mask=mask)


def _table(t: torch.Tensor):
    """cos/sin as (tensor, batch stride, seq stride); [S, half] tables broadcast over batch."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    if t.dim() == 2:
        return t, 0, t.stride(0)
    if t.dim() == 3:
        return t, (t.stride(0) if t.shape[0] > 1 else 0), t.stride(1)
    raise ValueError(f"apply_rotary: cos/sin must be [S, D/2] or [B, S, D/2], got {tuple(t.shape)}")


def _rotate(x: torch.Tensor, cos, sin, sign: int) -> torch.Tensor:
    B, S, H, D = x.shape
    half = D // 2
    if x.stride(-1) != 1:
        x = x.contiguous()
    y = torch.empty((B, S, H, D), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    (c, scb, scs), (sn, _, _) = cos, sin
    rows = B * S * H
    block_d = triton.next_power_of_2(half)
    block_r = min(triton.next_power_of_2(rows), max(1, 2048 // block_d))
    _rotary[(triton.cdiv(rows, block_r),)](
        x, c, sn, y, x.stride(0), x.stride(1), x.stride(2), y.stride(0), y.stride(1), y.stride(2),
        scb, scs, rows, S, H, half, SIGN=sign, BLOCK_R=block_r, BLOCK_D=block_d,
        num_warps=warps(block_r * block_d))
    return y


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        S, D = q.shape[1], q.shape[3]
        if D % 2 or k.shape[1] != S or k.shape[3] != D or cos.shape[-1] != D // 2 \
                or cos.shape[-2] != S or sin.shape != cos.shape:
            raise ValueError(f"apply_rotary: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                             f"cos {tuple(cos.shape)}, sin {tuple(sin.shape)} do not fit")
        tabs = (_table(cos), _table(sin))
        ctx.save_for_backward(tabs[0][0], tabs[1][0])
        ctx.strides = (tabs[0][1:], tabs[1][1:])
        return _rotate(q, *tabs, 1), _rotate(k, *tabs, 1)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        tabs = ((cos, *ctx.strides[0]), (sin, *ctx.strides[1]))
        return _rotate(dq, *tabs, -1), _rotate(dk, *tabs, -1), None, None


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Triton rotary embedding; same contract as ``kernels.reference.apply_rotary``.

    Gradients flow to q and k only; tables that require grad go to the reference.
    """
    if cos.requires_grad or sin.requires_grad:
        from kernels.reference import apply_rotary as ref
        return ref(q, k, cos, sin)
    return _Rotary.apply(q, k, cos, sin)
