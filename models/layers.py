"""Sublayer mixers: attention, SwiGLU MLP, and the norms around them.

Written as single-device code. Parallelism is applied from outside (``parallel/``)
by sharding the named linears; shapes are read from the weights (``view(..., -1, hd)``)
so a column-sharded projection simply yields fewer local heads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

import kernels
from models.config import ModelConfig


@dataclass
class ForwardContext:
    """Per-forward side inputs shared by all sublayers."""

    rope: tuple[torch.Tensor, torch.Tensor] | None = None  # cos, sin: [S, hd/2]
    doc_ids: torch.Tensor | None = None  # [B, S] document index per token
    # set by parallel code: ``before_sublayer(idx, stream, pending) -> (stream, pending)``,
    # called in ladder mode before each sublayer (see parallel/ladder.py)
    grad_seam: object | None = None
    # set by parallel code (context parallel): replaces ``kernels.attention`` for this
    # forward, same signature ``(q, k, v, doc_ids) -> out`` on this rank's tokens
    attention: Callable | None = None
    # set by context-parallel code: this rank's pieces of each sequence and the state/halo
    # exchanges recurrent mixers need (``parallel.cp_recurrent.RecurrentShard``: split, cat,
    # halo, entering_states); None on one device
    recurrent_shard: object | None = None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rms_norm(x, self.weight, self.eps)


def rope_tables(head_dim: int, seq_len: int, theta: float, device=None,
                positions: torch.Tensor | None = None, scaling=None,
                max_seq_len: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [S, head_dim/2] (fp32) for rotate-half RoPE; ``scaling`` is a
    ``RopeScalingConfig`` (context extension, see models/rope_scaling.py)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    mult = 1.0
    if scaling is not None and scaling.type != "none":
        from models.rope_scaling import rope_inv_freq

        inv_freq, mult = rope_inv_freq(head_dim, theta, scaling, device, max_seq_len)
    pos = positions.float() if positions is not None else torch.arange(seq_len, dtype=torch.float32, device=device)
    freqs = torch.outer(pos, inv_freq)
    if mult != 1.0:  # YaRN's attention factor scales q and k alike
        return freqs.cos() * mult, freqs.sin() * mult
    return freqs.cos(), freqs.sin()


class Attention(nn.Module):
    """Causal self-attention with RoPE and grouped-query heads."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hd = cfg.head_dim_resolved
        self.head_dim = hd
        # attn_output_gate: each head's q rows are followed by its gate rows ([q_h | g_h]), as
        # Qwen3-Next lays them out, so a column shard by heads keeps every gate with its head
        self.gated = cfg.attn_output_gate
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * hd * (2 if self.gated else 1), bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.d_model, cfg.n_kv_heads_resolved * hd, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.d_model, cfg.n_kv_heads_resolved * hd, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.n_heads * hd, cfg.d_model, bias=False)
        self.use_doc_mask = cfg.doc_mask
        # qk_norm: one RMSNorm over the head dim, shared by all heads (Qwen3)
        self.q_norm = RMSNorm(hd, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(hd, cfg.norm_eps) if cfg.qk_norm else None

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        B, S, _ = x.shape
        q = self.wq(x).view(B, S, -1, self.head_dim * (2 if self.gated else 1))
        if self.gated:
            q, gate = q.chunk(2, dim=-1)
        k = self.wk(x).view(B, S, -1, self.head_dim)
        v = self.wv(x).view(B, S, -1, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if ctx.rope is not None:
            q, k = rotary(q, k, ctx.rope)
        attend = ctx.attention or kernels.attention
        out = attend(q, k, v, ctx.doc_ids if self.use_doc_mask else None)
        if self.gated:
            out = out * torch.sigmoid(gate)
        return self.wo(out.reshape(B, S, -1))


def rotary(q: torch.Tensor, k: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]):
    """RoPE on the first ``2 * cos.shape[-1]`` dims of each head (all of them, or a fraction:
    ``partial_rotary_factor``, as GPT-NeoX / Qwen3-Next); the rest pass through."""
    cos, sin = rope
    rd = 2 * cos.shape[-1]
    if rd == q.shape[-1]:
        return kernels.apply_rotary(q, k, cos, sin)
    qr, kr = kernels.apply_rotary(q[..., :rd], k[..., :rd], cos, sin)
    return torch.cat([qr, q[..., rd:]], -1), torch.cat([kr, k[..., rd:]], -1)


class MLP(nn.Module):
    """SwiGLU feed-forward: w_down(silu(w_gate x) * w_up x)."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.w_gate = nn.Linear(d_model, hidden, bias=False)
        self.w_up = nn.Linear(d_model, hidden, bias=False)
        self.w_down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor, ctx: ForwardContext | None = None) -> torch.Tensor:
        return self.w_down(kernels.swiglu(self.w_gate(x), self.w_up(x)))
