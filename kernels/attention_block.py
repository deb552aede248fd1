"""Fused kernels for one (query block, key block) of blockwise attention (the ring of
``parallel/ring_attention.py``): the block's partial output with its log-sum-exp, and the
block's gradients given the *final* output and log-sum-exp (so that partial results merged
across blocks backpropagate exactly, as in ring flash attention).

They call PyTorch's fused SDPA kernels that return the log-sum-exp: the flash kernel for
CPU (``_scaled_dot_product_flash_attention_for_cpu``) and, on CUDA, the memory-efficient
kernel (``_scaled_dot_product_efficient_attention``, which takes the additive mask a
document-masked block needs). The pure-torch blocks in ``parallel/ring_attention.py`` are
the reference; tests compare the CPU kernel against it. (The CUDA branch is not run on the
CPU-only machines that test this project.)

Shapes as the ring holds them: q ``[B, Hkv, g, sq, D]`` (g query heads per KV head), k/v
``[B, Hkv, 1, sk, D]``, mask bool ``[B or 1, 1, 1, sq, sk]`` (True: visible) or None. The
g query heads of a KV head are stacked as ``g * sq`` rows, so K/V are never repeated.
"""

from __future__ import annotations

import torch

aten = torch.ops.aten


def _flat(q, k, v, mask):
    B, hkv, g, sq, D = q.shape
    qf, kf, vf = q.reshape(B, hkv, g * sq, D), k[:, :, 0], v[:, :, 0]
    if mask is None:
        return qf, kf, vf, None, None
    m = mask[:, :, 0].repeat(1, 1, g, 1)  # [b, 1, g*sq, sk]: row r sees what row r % sq sees
    bias = torch.zeros(m.shape, dtype=q.dtype, device=q.device).masked_fill(~m, float("-inf"))
    return qf, kf, vf, bias, ~m.any(-1)


def block_forward(q, k, v, mask, scale):
    """(out fp32 ``[B, Hkv, g, sq, D]``, lse fp32 ``[B, Hkv, g, sq]``); a row that sees no key
    has out 0 and lse -inf (the log-sum-exp merge's convention)."""
    B, hkv, g, sq, D = q.shape
    qf, kf, vf, bias, dead = _flat(q, k, v, mask)
    if q.is_cuda:
        if bias is not None:
            bias = bias.expand(B, hkv, -1, -1)
        out, lse, *_ = aten._scaled_dot_product_efficient_attention(qf, kf, vf, bias, True, 0.0, False,
                                                                    scale=scale)
        lse = lse[..., :g * sq]
    else:
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(qf, kf, vf, 0.0, False, attn_mask=bias,
                                                                    scale=scale)
    lse = lse.float()
    if dead is not None:  # the kernel reports lse 0 for a fully masked row
        lse = lse.masked_fill(dead, float("-inf"))
    return out.float().view(B, hkv, g, sq, D), lse.view(B, hkv, g, sq)


def block_backward(q, k, v, dout, out, lse, mask, scale):
    """Gradients of one block given the final ``out`` and ``lse`` of its query rows:
    (dq fp32 like q, dk fp32 like k, dv fp32 like v)."""
    B, hkv, g, sq, D = q.shape
    qf, kf, vf, bias, _ = _flat(q, k, v, mask)
    do = dout.reshape(B, hkv, g * sq, D).to(q.dtype)
    o = out.reshape(B, hkv, g * sq, D).to(q.dtype)
    lf = lse.reshape(B, hkv, g * sq)
    if q.is_cuda:
        if bias is not None:
            bias = bias.expand(B, hkv, -1, -1)
        zero = torch.zeros((), dtype=torch.int64, device=q.device)
        dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(
            do, qf, kf, vf, bias, o, lf, zero, zero, 0.0, [True, True, True, False], False, scale=scale)
    else:
        dq, dk, dv = aten._scaled_dot_product_flash_attention_for_cpu_backward(
            do, qf, kf, vf, o, lf, 0.0, False, attn_mask=bias, scale=scale)
    return dq.float().view(q.shape), dk.float().unsqueeze(2), dv.float().unsqueeze(2)
