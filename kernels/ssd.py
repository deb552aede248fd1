"""Mamba-2 state-space duality (SSD): chunked scan, recurrent form, causal depthwise conv.

Shapes (``b`` batch, ``L`` length, ``H`` heads, ``P`` head dim, ``G`` groups, ``N`` state):
x [b, L, H, P]; dt [b, L, H] (already softplus'd and clamped); A [H] (negative);
B, C [b, L, G, N] with head ``h`` reading group ``h // (H // G)``; D [H];
states [b, H, P, N]. The recurrence being computed is::

    h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t        y_t = C_t h_t + D x_t

``seq_idx`` [b, L] (e.g. packed-document ids) resets the state wherever it changes
between consecutive tokens, so no document sees another's state. The references
here are pure torch and compute in fp32 (fp64 if given fp64); ``ssd`` and
``causal_conv1d`` dispatch to mamba_ssm / causal_conv1d on CUDA when importable.
Set ``PRETRAIN_SSD_IMPL=reference`` to force the torch path.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F


def segment_ids(seq_idx: torch.Tensor) -> torch.Tensor:
    """[b, L] ids -> non-decreasing run index (0 at t=0, +1 at every change).

    Equal run index at s <= t means no reset in (s, t], even when the caller's ids
    repeat non-contiguously.
    """
    change = (seq_idx[:, 1:] != seq_idx[:, :-1]).to(torch.int64)
    return F.pad(change.cumsum(-1), (1, 0))


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _segsum(a: torch.Tensor, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """a [..., T] -> [..., T, T] with out[i, j] = sum_{j<k<=i} a_k (i >= j), -inf above the
    diagonal and where ``exclude`` (broadcastable bool [..., T, T]) is set.

    Summing masked copies (rather than cumsum[i] - cumsum[j]) avoids cancellation when
    the cumulative decay is large.
    """
    T = a.shape[-1]
    ones = torch.ones(T, T, dtype=torch.bool, device=a.device)
    rep = a.unsqueeze(-1).expand(*a.shape, T)  # [..., k, j] = a_k
    rep = rep.masked_fill(~torch.tril(ones, -1), 0.0)
    out = rep.cumsum(dim=-2)
    drop = ~torch.tril(ones)
    if exclude is not None:
        drop = drop | exclude
    return out.masked_fill(drop, float("-inf"))


# ---- chunked (training) form ---------------------------------------------------------

def ssd_chunked(x, dt, A, B, C, chunk_size: int, D=None, seq_idx=None, initial_state=None,
                return_final_state: bool = False):
    """SSD by chunks: masked matmul within a chunk, a short state recurrence across chunks.

    Any length works (padded internally to a multiple of the chunk; padding has dt=0,
    so it neither decays nor feeds the state). Returns y [b, L, H, P] in x's dtype,
    plus the final state [b, H, P, N] (fp32, or fp64 for fp64 inputs) if ``return_final_state``.
    """
    b, L, H, P = x.shape
    G, N = B.shape[-2], B.shape[-1]
    R = H // G
    Q = max(1, min(chunk_size, L))
    pad = (-L) % Q
    c = (L + pad) // Q
    cd = _compute_dtype(x)
    xf, dtf, Bf, Cf = x.to(cd), dt.to(cd), B.to(cd), C.to(cd)
    Af = A.to(cd)
    if pad:
        xf = F.pad(xf, (0, 0, 0, 0, 0, pad))
        dtf = F.pad(dtf, (0, 0, 0, pad))
        Bf = F.pad(Bf, (0, 0, 0, 0, 0, pad))
        Cf = F.pad(Cf, (0, 0, 0, 0, 0, pad))
    seg = None
    if seq_idx is not None:
        seg = segment_ids(seq_idx)
        if pad:
            seg = torch.cat([seg, seg[:, -1:].expand(b, pad)], dim=1)
        seg = seg.view(b, c, Q)

    xc = xf.view(b, c, Q, H, P)
    Bc = Bf.view(b, c, Q, G, N)
    Cc = Cf.view(b, c, Q, G, N)
    xdt = xc * dtf.view(b, c, Q, H, 1)
    a = (dtf * Af).view(b, c, Q, H).transpose(2, 3)  # [b, c, H, Q] log-decays
    a_cs = a.cumsum(-1)

    # 1) within each chunk: y_l = sum_{s<=l} C_l.B_s exp(a_{s+1..l}) dt_s x_s
    seg_mask = None
    if seg is not None:
        seg_mask = (seg.unsqueeze(-1) != seg.unsqueeze(-2)).unsqueeze(2)  # [b, c, 1, Q, Q]
    decay = torch.exp(_segsum(a, seg_mask))  # [b, c, H, Q, Q]
    CB = torch.einsum("bclgn,bcsgn->bcgls", Cc, Bc)  # [b, c, G, Q, Q]
    scores = decay.view(b, c, G, R, Q, Q) * CB.unsqueeze(3)
    y = torch.einsum("bchls,bcshp->bclhp", scores.view(b, c, H, Q, Q), xdt)

    # 2) each chunk's own contribution to the state at its end
    to_end = torch.exp(a_cs[..., -1:] - a_cs).transpose(2, 3)  # [b, c, Q, H]
    if seg is not None:
        to_end = to_end * (seg == seg[..., -1:]).unsqueeze(-1)
    xw = (xdt * to_end.unsqueeze(-1)).view(b, c, Q, G, R * P)
    states = torch.einsum("bcsgn,bcsgq->bcgqn", Bc, xw).reshape(b, c, H, P, N)

    # 3) pass states across chunks (matmul with the chunk-level decay matrix)
    init = (initial_state.to(cd) if initial_state is not None
            else torch.zeros(b, H, P, N, dtype=cd, device=x.device))
    states = torch.cat([init.unsqueeze(1), states], dim=1)  # [b, c+1, H, P, N]
    seg_end = None
    chunk_mask = None
    if seg is not None:
        # the initial state belongs to run 0, i.e. to the first token's document
        seg_end = F.pad(seg[..., -1], (1, 0))  # [b, c+1]
        chunk_mask = (seg_end.unsqueeze(-1) != seg_end.unsqueeze(-2)).unsqueeze(1)
    chunk_sums = F.pad(a_cs[..., -1].transpose(1, 2), (1, 0))  # [b, H, c+1]
    chunk_decay = torch.exp(_segsum(chunk_sums, chunk_mask))  # [b, H, c+1, c+1]
    passed = torch.einsum("bhzc,bchq->bzhq", chunk_decay, states.view(b, c + 1, H, P * N))
    passed = passed.view(b, c + 1, H, P, N)
    prev, final = passed[:, :-1], passed[:, -1]

    # 4) contribution of the state entering each chunk
    from_start = torch.exp(a_cs).transpose(2, 3)  # [b, c, Q, H]
    if seg is not None:
        from_start = from_start * (seg == seg_end[:, :-1].unsqueeze(-1)).unsqueeze(-1)
    prev_g = prev.reshape(b, c, G, R * P, N)
    y_off = torch.einsum("bclgn,bcgqn->bclgq", Cc, prev_g).reshape(b, c, Q, H, P)
    y = y + y_off * from_start.unsqueeze(-1)

    y = y.reshape(b, c * Q, H, P)[:, :L]
    if D is not None:
        y = y + xf[:, :L] * D.to(cd).view(H, 1)
    y = y.to(x.dtype)
    return (y, final) if return_final_state else y


def ssd_state_output(C, dt, A, state, seq_idx=None):
    """The output contribution of an initial ``state`` [b, H, P, N] to a segment:
    ``y_t = exp(sum_{s<=t} dt_s A) C_t . state`` for tokens before the first reset of
    ``seq_idx`` (0 after it). ``ssd(..., initial_state=S)`` equals ``ssd(...)`` plus this,
    which lets context parallelism add a late-known state cheaply. Returns fp32 [b, L, H, P]
    (fp64 for fp64 inputs)."""
    b, L, G, N = C.shape
    H, P = state.shape[1], state.shape[2]
    cd = _compute_dtype(state)
    decay = torch.exp((dt.to(cd) * A.to(cd)).cumsum(1))  # [b, L, H]
    if seq_idx is not None:
        decay = decay * (segment_ids(seq_idx) == 0).unsqueeze(-1).to(cd)
    y = torch.einsum("blgn,bgqn->blgq", C.to(cd), state.to(cd).reshape(b, G, (H // G) * P, N))
    return y.reshape(b, L, H, P) * decay.unsqueeze(-1)


def ssd_flops(batch: int, seq_len: int, n_heads: int, head_dim: int, n_groups: int, d_state: int,
              chunk_size: int) -> float:
    """Matmul FLOPs of ``ssd_chunked`` as torch's FlopCounterMode counts them (forward)."""
    Q = max(1, min(chunk_size, seq_len))
    c = -(-seq_len // Q)
    H, P, G, N = n_heads, head_dim, n_groups, d_state
    f = 2 * c * G * Q * Q * N  # C.B within chunks
    f += 2 * c * H * Q * Q * P  # scores @ (dt x)
    f += 2 * c * H * P * Q * N  # chunk end states
    f += 2 * H * (c + 1) ** 2 * P * N  # state passing across chunks
    f += 2 * c * H * Q * N * P  # C @ entering state
    return float(batch * f)


# ---- recurrent (generation / oracle) form -------------------------------------------

def ssd_step(state, x_t, dt_t, A, B_t, C_t, D=None):
    """One recurrence step. state [b, H, P, N]; x_t [b, H, P]; dt_t [b, H]; B_t, C_t [b, G, N].

    Returns ``(y_t [b, H, P] in x_t's dtype, new_state)``; the state stays in its own dtype.
    """
    H, G = x_t.shape[1], B_t.shape[1]
    cd = state.dtype
    xf, dtf = x_t.to(cd), dt_t.to(cd)
    Bh = B_t.to(cd).repeat_interleave(H // G, dim=1)  # [b, H, N]
    Ch = C_t.to(cd).repeat_interleave(H // G, dim=1)
    dA = torch.exp(dtf * A.to(cd))
    new = state * dA[..., None, None] + (xf * dtf[..., None]).unsqueeze(-1) * Bh.unsqueeze(-2)
    y = torch.einsum("bhpn,bhn->bhp", new, Ch)
    if D is not None:
        y = y + xf * D.to(cd).view(H, 1)
    return y.to(x_t.dtype), new


def ssd_recurrent(x, dt, A, B, C, D=None, seq_idx=None, initial_state=None,
                  return_final_state: bool = False):
    """The sequential recurrence, token by token (oracle for ``ssd_chunked``)."""
    b, L, H, P = x.shape
    N = B.shape[-1]
    cd = _compute_dtype(x)
    state = (initial_state.to(cd) if initial_state is not None
             else torch.zeros(b, H, P, N, dtype=cd, device=x.device))
    seg = segment_ids(seq_idx) if seq_idx is not None else None
    ys = []
    for t in range(L):
        if seg is not None and t > 0:
            keep = (seg[:, t] == seg[:, t - 1]).to(cd)
            state = state * keep.view(b, 1, 1, 1)
        y, state = ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D)
        ys.append(y)
    y = torch.stack(ys, dim=1) if ys else x.new_zeros(x.shape)
    return (y, state) if return_final_state else y


# ---- causal depthwise conv1d ---------------------------------------------------------

def causal_conv1d_ref(x, weight, bias=None, seq_idx=None, activation: str | None = None):
    """Causal depthwise conv. x [b, L, C]; weight [C, K]; output [b, L, C].

    With ``seq_idx``, a token's window excludes tokens of earlier documents.
    """
    b, L, Ch = x.shape
    K = weight.shape[-1]
    if seq_idx is None:
        xt = F.pad(x.transpose(1, 2), (K - 1, 0))
        out = F.conv1d(xt, weight.unsqueeze(1), bias, groups=Ch).transpose(1, 2)
    else:
        seg = segment_ids(seq_idx)
        out = x * weight[:, K - 1]
        for j in range(1, min(K, L)):  # tap j reads x[t - j]
            shifted = F.pad(x[:, :-j], (0, 0, j, 0))
            same = F.pad(seg[:, :-j], (j, 0), value=-1) == seg
            out = out + shifted * same.unsqueeze(-1).to(x.dtype) * weight[:, K - 1 - j]
        if bias is not None:
            out = out + bias
    if activation in ("silu", "swish"):
        out = F.silu(out)
    elif activation is not None:
        raise ValueError(f"unsupported activation '{activation}'")
    return out


def causal_conv1d_step(x_t, conv_state, weight, bias=None, activation: str | None = None):
    """One step. x_t [b, C]; conv_state [b, C, K-1] (oldest first). Returns (y_t, new_state)."""
    window = torch.cat([conv_state, x_t.unsqueeze(-1)], dim=-1)  # [b, C, K]
    out = (window * weight).sum(-1)
    if bias is not None:
        out = out + bias
    if activation in ("silu", "swish"):
        out = F.silu(out)
    return out, window[..., 1:]


# ---- dispatch ------------------------------------------------------------------------

def _impl() -> str:
    v = os.environ.get("PRETRAIN_SSD_IMPL", "auto")
    if v not in ("auto", "reference", "mamba_ssm"):
        raise ValueError(f"PRETRAIN_SSD_IMPL='{v}' not in auto|reference|mamba_ssm")
    return v


def _fast(t: torch.Tensor, module: str):
    """Import ``module`` lazily when ``t`` is on CUDA and the impl allows it; else None."""
    impl = _impl()
    if impl == "reference" or not t.is_cuda:
        if impl == "mamba_ssm" and not t.is_cuda:
            raise RuntimeError("PRETRAIN_SSD_IMPL=mamba_ssm needs CUDA tensors")
        return None
    try:
        import importlib
        return importlib.import_module(module)
    except ImportError:
        if impl == "mamba_ssm":
            raise
        return None


def ssd(x, dt, A, B, C, chunk_size: int, D=None, seq_idx=None, initial_state=None,
        return_final_state: bool = False):
    """SSD entry point: mamba_ssm's fused chunk scan on CUDA if available, else ``ssd_chunked``."""
    mod = _fast(x, "mamba_ssm.ops.triton.ssd_combined")
    if mod is None:
        return ssd_chunked(x, dt, A, B, C, chunk_size, D=D, seq_idx=seq_idx,
                           initial_state=initial_state, return_final_state=return_final_state)
    seg = segment_ids(seq_idx).to(torch.int32).contiguous() if seq_idx is not None else None
    out = mod.mamba_chunk_scan_combined(
        x, dt, A, B, C, chunk_size, D=D, seq_idx=seg, initial_states=initial_state,
        return_final_states=return_final_state)
    return out


def causal_conv1d(x, weight, bias=None, seq_idx=None, activation: str | None = None):
    """Causal depthwise conv entry point (causal_conv1d's CUDA kernel when importable)."""
    mod = _fast(x, "causal_conv1d")
    if mod is None:
        return causal_conv1d_ref(x, weight, bias, seq_idx, activation)
    seg = segment_ids(seq_idx).to(torch.int32).contiguous() if seq_idx is not None else None
    # x.transpose(1, 2) of a [b, L, C] tensor is channel-last, the layout seq_idx requires
    out = mod.causal_conv1d_fn(x.transpose(1, 2), weight, bias, seq_idx=seg, activation=activation)
    return out.transpose(1, 2)
