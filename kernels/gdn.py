"""Gated delta rule (Gated DeltaNet, arXiv 2412.06464): chunked and recurrent forms.

Shapes (``b`` batch, ``L`` length, ``H`` heads, ``K`` key dim, ``V`` value dim):
q, k [b, L, H, K] (the caller L2-normalises them and repeats shared q/k heads); v [b, L, H, V];
g [b, L, H] log-decay (<= 0); beta [b, L, H] write strength; states [b, H, K, V] (the
layout of transformers' Qwen3-Next and of flash-linear-attention). The recurrence is::

    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T      o_t = S_t^T (scale q_t)

with ``scale`` = K ** -0.5 unless given. ``seq_idx`` [b, L] (packed-document ids) zeroes the
state wherever it changes between consecutive tokens; an initial state belongs to the first
token's document. The references compute in fp32 (fp64 for fp64 inputs).
``gated_delta_rule`` dispatches to flash-linear-attention's ``chunk_gated_delta_rule`` on
CUDA when importable (``PRETRAIN_GDN_IMPL=reference`` forces the torch path).

Chunked form (UT transform): inside a chunk with entering state S_0, cumulative log-decay
gamma_t and D[t,s] = exp(gamma_t - gamma_s) (s <= t, same document), the delta-rule
corrections d_t = beta_t (v_t - exp(g_t) S_{t-1}^T k_t) solve the unit-lower-triangular system
(I + A) d = beta v - (beta exp(gamma) k) S_0 with A[t,s] = beta_t D[t,s] k_t.k_s (s < t). Then
o = (exp(gamma) q) S_0 + (q k^T * D) d and S_C = exp(gamma_C) S_0 + (k exp(gamma_C - gamma))^T d.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from kernels.ssd import _segsum, segment_ids


def _cd(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dim (the convention of fla and Qwen3-Next)."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


# ---- recurrent form (oracle and generation) -----------------------------------------------

def gated_delta_rule_step(state, q_t, k_t, v_t, g_t, beta_t, scale: float | None = None):
    """One token. state [b, H, K, V]; q_t, k_t [b, H, K]; v_t [b, H, V]; g_t, beta_t [b, H].
    Returns (o_t [b, H, V] in v_t's dtype, new state in the state's dtype)."""
    cd = state.dtype
    scale = q_t.shape[-1] ** -0.5 if scale is None else scale
    q, k, v = q_t.to(cd) * scale, k_t.to(cd), v_t.to(cd)
    S = state * torch.exp(g_t.to(cd))[..., None, None]
    pred = torch.einsum("bhkv,bhk->bhv", S, k)
    delta = beta_t.to(cd).unsqueeze(-1) * (v - pred)
    S = S + k.unsqueeze(-1) * delta.unsqueeze(-2)
    return torch.einsum("bhkv,bhk->bhv", S, q).to(v_t.dtype), S


def gated_delta_rule_recurrent(q, k, v, g, beta, scale: float | None = None, initial_state=None,
                               seq_idx=None, return_final_state: bool = False):
    """Token-by-token loop: the oracle for the chunked form. Returns o [b, L, H, V]
    (v's dtype) and, if ``return_final_state``, the final state [b, H, K, V] (fp32/fp64)."""
    b, L, H, K = q.shape
    cd = _cd(q)
    S = (initial_state.to(cd) if initial_state is not None
         else torch.zeros(b, H, K, v.shape[-1], dtype=cd, device=q.device))
    seg = segment_ids(seq_idx) if seq_idx is not None else None
    outs = []
    for t, step in enumerate(zip(*(x.unbind(1) for x in (q, k, v, g, beta)))):
        if seg is not None and t > 0:
            S = S * (seg[:, t] == seg[:, t - 1]).to(cd).view(b, 1, 1, 1)
        o, S = gated_delta_rule_step(S, *step, scale)
        outs.append(o)
    o = torch.stack(outs, 1)
    return (o, S) if return_final_state else o


# ---- chunked form (training) ------------------------------------------------------------

def _chunks(x: torch.Tensor, pad: int, n: int, C: int) -> torch.Tensor:
    """[b, L, H, *d] -> [b, H, n, C, *d] (zero-padded at the end)."""
    if pad:
        x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad))
    x = x.transpose(1, 2)
    return x.reshape(*x.shape[:2], n, C, *x.shape[3:])


def gated_delta_rule_chunked(q, k, v, g, beta, chunk_size: int = 64, scale: float | None = None,
                             initial_state=None, seq_idx=None, return_final_state: bool = False):
    """The gated delta rule by chunks of ``chunk_size``: a triangular solve and masked
    matmuls inside each chunk, a short state recurrence across chunks. Any length works
    (padding has beta = 0, g = 0, k = 0: it leaves the state unchanged). Same returns as
    :func:`gated_delta_rule_recurrent`."""
    b, L, H, K = q.shape
    V = v.shape[-1]
    C = max(1, min(chunk_size, L))
    pad, cd = (-L) % C, _cd(q)
    n = (L + pad) // C
    scale = K ** -0.5 if scale is None else scale
    qc, kc, vc = (_chunks(t.to(cd), pad, n, C) for t in (q * scale, k, v))
    gc, bc = (_chunks(t.to(cd).unsqueeze(-1), pad, n, C)[..., 0] for t in (g, beta))  # [b, H, n, C]
    seg = seg_mask = enter = None
    if seq_idx is not None:
        s = segment_ids(seq_idx)
        s = torch.cat([s, s[:, -1:].expand(b, pad)], 1)
        enter = torch.cat([s[:, :1], s[:, :-1]], 1).view(b, n, C)[..., 0]  # run entering chunk
        seg = s.view(b, n, C)
        seg_mask = (seg.unsqueeze(-1) != seg.unsqueeze(-2)).unsqueeze(1)  # [b, 1, n, C, C]
    D = torch.exp(_segsum(gc, seg_mask))  # [b, H, n, C, C], 0 above the diagonal / across docs
    cum = gc.cumsum(-1)
    from_start = torch.exp(cum)  # decay from the chunk's entering state to t
    to_end = torch.exp(cum[..., -1:] - cum)  # decay from s to the chunk's end
    total = from_start[..., -1]  # [b, H, n]
    if seg is not None:
        from_start = from_start * (seg == enter.unsqueeze(-1)).unsqueeze(1)
        to_end = to_end * (seg == seg[..., -1:]).unsqueeze(1)
        total = total * (seg[..., -1] == enter).unsqueeze(1)
    A = (bc.unsqueeze(-1) * (kc @ kc.transpose(-1, -2)) * D).tril(-1)
    rhs = torch.cat([vc, kc * from_start.unsqueeze(-1)], -1) * bc.unsqueeze(-1)
    sol = torch.linalg.solve_triangular(A, rhs, upper=False, unitriangular=True)
    U, W = sol.split([V, K], -1)
    P = (qc @ kc.transpose(-1, -2)) * D  # D is 0 above the diagonal
    qs = qc * from_start.unsqueeze(-1)
    ke = (kc * to_end.unsqueeze(-1)).transpose(-1, -2)
    S = (initial_state.to(cd) if initial_state is not None
         else torch.zeros(b, H, K, V, dtype=cd, device=q.device))
    outs = []
    # unbind once: indexing chunk c in the loop would make backward write each chunk's
    # gradient into a zero tensor of the full size (quadratic in the length)
    for u, w, qc_, p, k_, t in zip(*(x.unbind(2) for x in (U, W, qs, P, ke, total))):
        d = u - w @ S
        outs.append(qc_ @ S + p @ d)
        S = t[..., None, None] * S + k_ @ d
    o = torch.stack(outs, 2).reshape(b, H, n * C, V)[:, :, :L].transpose(1, 2).to(v.dtype)
    return (o, S) if return_final_state else o


def gated_delta_rule_flops(batch: int, seq_len: int, n_heads: int, head_k_dim: int, head_v_dim: int,
                           chunk_size: int) -> float:
    """Forward FLOPs of :func:`gated_delta_rule_chunked` as FlopCounterMode counts it with
    :func:`flop_mapping` (chunk padding included)."""
    C = max(1, min(chunk_size, seq_len))
    n = -(-seq_len // C)
    K, V = head_k_dim, head_v_dim
    per_chunk = (2 * 2 * C * C * K  # k k^T and q k^T
                 + C * C * (K + V)  # triangular solve (see flop_mapping)
                 + 2 * C * C * V  # P d
                 + 3 * 2 * C * K * V)  # W S, q S, k^T d
    return float(batch * n_heads * n * per_chunk)


def flop_mapping() -> dict:
    """``FlopCounterMode(custom_mapping=...)`` entries for ops torch does not count: a
    triangular solve with an [n, n] matrix and m right-hand sides costs n*n*m."""
    aten = torch.ops.aten

    def solve(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
        n, m = b_shape[-2], b_shape[-1]
        batch = 1
        for d in b_shape[:-2]:
            batch *= d
        return batch * n * n * m

    return {aten.linalg_solve_triangular: solve}


# ---- dispatch --------------------------------------------------------------------------

def _fla():
    """flash-linear-attention's chunk kernel, when allowed and importable; else None."""
    impl = os.environ.get("PRETRAIN_GDN_IMPL", "auto")
    if impl not in ("auto", "reference", "fla"):
        raise ValueError(f"PRETRAIN_GDN_IMPL='{impl}' not in auto|reference|fla")
    if impl == "reference":
        return None
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except ImportError:
        if impl == "fla":
            raise
        return None
    return chunk_gated_delta_rule


def _fla_chunked(fn, q, k, v, g, beta, scale, initial_state, seq_idx, return_final_state):
    """Packed documents become fla's variable-length batch (``cu_seqlens``) of one row; an
    initial state enters the first run of its row."""
    if seq_idx is None:
        o, S = fn(q, k, v, g=g, beta=beta, scale=scale, initial_state=initial_state,
                  output_final_state=return_final_state)
        return (o, S) if return_final_state else o
    b, L = seq_idx.shape
    seg = segment_ids(seq_idx)
    starts = torch.ones(b, L, dtype=torch.bool, device=q.device)
    starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
    flat = starts.flatten().nonzero().flatten()
    cu = torch.cat([flat, flat.new_tensor([b * L])])
    init = None
    if initial_state is not None:
        init = initial_state.new_zeros(len(flat), *initial_state.shape[1:])
        init = init.index_copy(0, (flat % L == 0).nonzero().flatten(), initial_state)
    q, k, v, g, beta = (t.flatten(0, 1).unsqueeze(0) for t in (q, k, v, g, beta))
    o, S = fn(q, k, v, g=g, beta=beta, scale=scale, initial_state=init, output_final_state=True,
              cu_seqlens=cu)
    o = o.view(b, L, *o.shape[2:])
    last = torch.cat([flat[1:], flat.new_tensor([b * L])]).sub(1)
    row_end = ((last + 1) % L == 0).nonzero().flatten()  # the run ending each row
    return (o, S[row_end]) if return_final_state else o


def gated_delta_rule(q, k, v, g, beta, chunk_size: int = 64, scale: float | None = None,
                     initial_state=None, seq_idx=None, return_final_state: bool = False):
    """The chunked gated delta rule: fla on CUDA when importable, else
    :func:`gated_delta_rule_chunked`. (The fla path is not exercised by the CPU tests.)"""
    fn = _fla() if q.is_cuda else None
    if fn is not None:
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        return _fla_chunked(fn, q, k, v, g.float(), beta, scale, initial_state, seq_idx, return_final_state)
    return gated_delta_rule_chunked(q, k, v, g, beta, chunk_size, scale, initial_state, seq_idx,
                                    return_final_state)
