"""SwiGLU ``silu(gate) * up`` with a fused backward.

gate and up may be strided rows (e.g. the two halves of a fused gate/up projection);
the math is fp32 with one rounding to the output dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_ops._common import INTERPRET, rows, warps


@triton.jit
def _swiglu_fwd(G, U, Y, sg, su, sy, N, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    g = tl.load(G + row * sg + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * su + cols, mask=mask, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(Y + row * sy + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd(G, U, DY, DG, DU, sg, su, sdy, sdg, sdu, N, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    g = tl.load(G + row * sg + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * su + cols, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + row * sdy + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    du = dy * g * sig
    dg = dy * u * sig * (1.0 + g * (1.0 - sig))
    tl.store(DG + row * sdg + cols, dg.to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + row * sdu + cols, du.to(DU.dtype.element_ty), mask=mask)


def _block(n: int) -> int:
    return min(triton.next_power_of_2(n), 16384 if INTERPRET else 1024)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        if gate.shape != up.shape:
            raise ValueError(f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} differ")
        N = gate.shape[-1]
        g2, u2 = rows(gate, N), rows(up, N)
        M = g2.shape[0]
        y = torch.empty((M, N), dtype=torch.result_type(gate, up), device=gate.device)
        if y.numel():
            block = _block(N)
            _swiglu_fwd[(M, triton.cdiv(N, block))](
                g2, u2, y, g2.stride(0), u2.stride(0), y.stride(0), N, BLOCK=block,
                num_warps=warps(block))
        ctx.save_for_backward(g2, u2)
        ctx.shape = gate.shape
        return y.view(gate.shape)

    @staticmethod
    def backward(ctx, dy):
        g2, u2 = ctx.saved_tensors
        M, N = g2.shape
        dy2 = rows(dy, N)
        dg = torch.empty((M, N), dtype=g2.dtype, device=g2.device)
        du = torch.empty((M, N), dtype=u2.dtype, device=u2.device)
        if dg.numel():
            block = _block(N)
            _swiglu_bwd[(M, triton.cdiv(N, block))](
                g2, u2, dy2, dg, du, g2.stride(0), u2.stride(0), dy2.stride(0), dg.stride(0),
                du.stride(0), N, BLOCK=block, num_warps=warps(block))
        return dg.view(ctx.shape), du.view(ctx.shape)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Triton ``silu(gate) * up``; same contract as ``kernels.reference.swiglu``."""
    return _SwiGLU.apply(gate, up)
