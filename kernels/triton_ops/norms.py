"""RMSNorm and the Mamba-2 gated RMSNorm.

One forward and one backward kernel serve both (a constexpr flag switches the gate). A program normalises one group of a block of rows (short
rows share a program); statistics are fp32 whatever the input dtype, as in
``kernels.reference``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_ops._common import check_row, num_programs, rows, warps


@triton.jit
def _norm_fwd(X, Z, W, Y, RSTD,
              stride_x, stride_z, stride_y,
              M, G, NG, eps,
              HAS_Z: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    grp = tl.program_id(1)
    rows = r[:, None]
    cols = tl.arange(0, BLOCK)[None, :]
    cmask = cols < G
    mask = (rows < M) & cmask
    off = grp * G + cols
    x = tl.load(X + rows * stride_x + off, mask=mask, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(Z + rows * stride_z + off, mask=mask, other=0.0).to(tl.float32)
        x = x * (z * tl.sigmoid(z))
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / G + eps)
    tl.store(RSTD + r * NG + grp, rstd, mask=r < M)
    w = tl.load(W + off, mask=cmask, other=0.0).to(tl.float32)
    y = x * rstd[:, None] * w
    tl.store(Y + rows * stride_y + off, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _norm_bwd(DY, X, Z, W, RSTD, DX, DZ, DW,
              stride_dy, stride_x, stride_z, stride_dx, stride_dz,
              M, N, G, NG, blocks_per_prog,
              HAS_Z: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK: tl.constexpr):
    # Each program walks blocks_per_prog blocks of rows and keeps a partial weight grad.
    pid = tl.program_id(0)
    grp = tl.program_id(1)
    c1 = tl.arange(0, BLOCK)
    cols = c1[None, :]
    cmask = cols < G
    off = grp * G + cols
    w = tl.load(W + off, mask=cmask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_M, BLOCK], dtype=tl.float32)
    for i in range(0, blocks_per_prog):
        r = (pid.to(tl.int64) * blocks_per_prog + i) * BLOCK_M + tl.arange(0, BLOCK_M)
        rows = r[:, None]
        mask = (rows < M) & cmask
        x = tl.load(X + rows * stride_x + off, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows * stride_dy + off, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + r * NG + grp, mask=r < M, other=0.0)[:, None]
        if HAS_Z:
            z = tl.load(Z + rows * stride_z + off, mask=mask, other=0.0).to(tl.float32)
            sig = tl.sigmoid(z)
            gate = z * sig
            h = x * gate
        else:
            h = x
        hhat = h * rstd
        wdy = w * dy
        c = tl.sum(hhat * wdy, axis=1)[:, None] / G
        dh = (wdy - hhat * c) * rstd
        dw += dy * hhat
        if HAS_Z:
            dz = dh * x * sig * (1.0 + z * (1.0 - sig))
            tl.store(DZ + rows * stride_dz + off, dz.to(DZ.dtype.element_ty), mask=mask)
            dx = dh * gate
        else:
            dx = dh
        tl.store(DX + rows * stride_dx + off, dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(DW + pid.to(tl.int64) * N + grp * G + c1, tl.sum(dw, axis=0), mask=c1 < G)


def _blocks(M: int, group: int) -> tuple[int, int]:
    """(rows per block, columns per block): several short rows share a program."""
    block = triton.next_power_of_2(group)
    tile = 4096
    return max(1, min(triton.next_power_of_2(max(M, 1)), tile // block)), block


def _forward(x2, z2, weight, eps, group, out_dtype):
    M, N = x2.shape
    ng = N // group
    bm, block = _blocks(M, group)
    y = torch.empty((M, N), dtype=out_dtype, device=x2.device)
    rstd = torch.empty((M, ng), dtype=torch.float32, device=x2.device)
    if M:
        _norm_fwd[(triton.cdiv(M, bm), ng)](
            x2, z2 if z2 is not None else x2, weight, y, rstd,
            x2.stride(0), z2.stride(0) if z2 is not None else 0, y.stride(0),
            M, group, ng, eps, HAS_Z=z2 is not None, BLOCK_M=bm, BLOCK=block,
            num_warps=warps(bm * block))
    return y, rstd


def _backward(dy2, x2, z2, weight, rstd, group, dx_dtype):
    M, N = x2.shape
    ng = N // group
    bm, block = _blocks(M, group)
    dx = torch.empty((M, N), dtype=dx_dtype, device=x2.device)
    dz = torch.empty((M, N), dtype=z2.dtype, device=x2.device) if z2 is not None else None
    n_blocks = triton.cdiv(M, bm)
    progs = num_programs(x2.device, n_blocks)
    dw = torch.zeros((progs, N), dtype=torch.float32, device=x2.device)
    if M:
        _norm_bwd[(progs, ng)](
            dy2, x2, z2 if z2 is not None else x2, weight, rstd,
            dx, dz if dz is not None else dx, dw,
            dy2.stride(0), x2.stride(0), z2.stride(0) if z2 is not None else 0,
            dx.stride(0), dz.stride(0) if dz is not None else 0,
            M, N, group, ng, triton.cdiv(n_blocks, progs), HAS_Z=z2 is not None,
            BLOCK_M=bm, BLOCK=block, num_warps=warps(bm * block))
    return dx, dz, dw.sum(0).to(weight.dtype)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        N = x.shape[-1]
        check_row("rms_norm", N)
        x2 = rows(x, N)
        y, rstd = _forward(x2, None, weight, eps, N, x.dtype)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        N = x2.shape[1]
        dx, _, dw = _backward(rows(dy, N), x2, None, weight, rstd, N, x2.dtype)
        return dx.view(ctx.shape), dw, None


class _GatedRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, z, weight, eps, group_size):
        N = x.shape[-1]
        if z.shape != x.shape or N % group_size:
            raise ValueError(f"gated_rms_norm: x {tuple(x.shape)}, z {tuple(z.shape)}, "
                             f"group_size {group_size} do not fit")
        check_row("gated_rms_norm", group_size)
        x2, z2 = rows(x, N), rows(z, N)
        y, rstd = _forward(x2, z2, weight, eps, group_size, x.dtype)
        ctx.save_for_backward(x2, z2, weight, rstd)
        ctx.meta = (x.shape, group_size)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, z2, weight, rstd = ctx.saved_tensors
        shape, group = ctx.meta
        dx, dz, dw = _backward(rows(dy, x2.shape[1]), x2, z2, weight, rstd, group, x2.dtype)
        return dx.view(shape), dz.view(shape), dw, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Triton RMSNorm; same contract as ``kernels.reference.rms_norm``."""
    return _RMSNorm.apply(x, weight, float(eps))


def gated_rms_norm(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float,
                   group_size: int) -> torch.Tensor:
    """Triton Mamba-2 gated RMSNorm; same contract as the reference."""
    return _GatedRMSNorm.apply(x, z, weight, float(eps), int(group_size))
