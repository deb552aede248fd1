"""SwiGLU ``silu(gate) * up`` with a fused backward.

gate and up may be strided rows (e.g. the two halves of a fused gate/up projection);
the math is fp32 with one rounding to the output dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_ops._common import rows, warps


@triton.jit
def _swiglu_fwd(G, U, Y, sg, su, sy, M, N, BLOCK_M: tl.constexpr, BLOCK: tl.constexpr):
    rows = (tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M))[:, None]
    cols = (tl.program_id(1) * BLOCK + tl.arange(0, BLOCK))[None, :]
    mask = (rows < M) & (cols < N)
    g = tl.load(G + rows * sg + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + rows * su + cols, mask=mask, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(Y + rows * sy + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd(G, U, DY, DG, DU, sg, su, sdy, sdg, sdu, M, N,
                BLOCK_M: tl.constexpr, BLOCK: tl.constexpr):
    rows = (tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M))[:, None]
    cols = (tl.program_id(1) * BLOCK + tl.arange(0, BLOCK))[None, :]
    mask = (rows < M) & (cols < N)
    g = tl.load(G + rows * sg + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + rows * su + cols, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + rows * sdy + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    du = dy * g * sig
    dg = dy * u * sig * (1.0 + g * (1.0 - sig))
    tl.store(DG + rows * sdg + cols, dg.to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + rows * sdu + cols, du.to(DU.dtype.element_ty), mask=mask)


def _launch(M: int, N: int):
    """(grid, BLOCK_M, BLOCK, warps): tiles of rows x columns, short rows sharing a program."""
    block = min(triton.next_power_of_2(N), 1024)
    tile = 4096
    bm = max(1, min(triton.next_power_of_2(M), tile // block))
    return (triton.cdiv(M, bm), triton.cdiv(N, block)), bm, block, warps(bm * block)


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
            grid, bm, block, nw = _launch(M, N)
            _swiglu_fwd[grid](g2, u2, y, g2.stride(0), u2.stride(0), y.stride(0), M, N,
                              BLOCK_M=bm, BLOCK=block, num_warps=nw)
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
            grid, bm, block, nw = _launch(M, N)
            _swiglu_bwd[grid](g2, u2, dy2, dg, du, g2.stride(0), u2.stride(0), dy2.stride(0),
                              dg.stride(0), du.stride(0), M, N, BLOCK_M=bm, BLOCK=block, num_warps=nw)
        return dg.view(ctx.shape), du.view(ctx.shape)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Triton ``silu(gate) * up``; same contract as ``kernels.reference.swiglu``."""
    return _SwiGLU.apply(gate, up)
