"""Falcon-H1-style parallel hybrid mixer (pattern symbol ``P``).

Attention heads and Mamba-2 heads read the same normalised input side by side; their
outputs are concatenated ([attention | mamba]) and mixed by one ``out_proj``.
Attention uses ``cfg.head_dim_resolved`` with ``cfg.hybrid.n_attn_heads`` query heads and
``min(cfg.n_kv_heads_resolved, n_attn_heads)`` KV heads (reduced to a divisor of the query heads);
the Mamba part is a ``Mamba2Mixer`` with ``cfg.hybrid.n_mamba_heads`` heads of
``cfg.mamba.head_dim`` and no projection of its own.

Note for tensor parallelism: ``out_proj``'s input columns are [all attention | all mamba],
so a row-parallel shard must take its slice of each part (not one contiguous block).
"""

from __future__ import annotations

import math

import torch
from torch import nn

import kernels
from models.config import ModelConfig, UserError
from models.fields import need
from models.mamba2 import Mamba2Mixer, check_ssm_params, mamba_flops_per_token


def hybrid_kv_heads(cfg: ModelConfig) -> int:
    n_attn = cfg.hybrid.n_attn_heads
    kv = min(cfg.n_kv_heads_resolved, n_attn)
    return kv if n_attn % kv == 0 else math.gcd(n_attn, kv)


class HybridHeadsMixer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hc = cfg.hybrid
        if hc.n_attn_heads < 1 or hc.n_mamba_heads < 1:
            raise UserError("model.hybrid: n_attn_heads and n_mamba_heads must both be >= 1")
        hd = cfg.head_dim_resolved
        self.head_dim = hd
        kv = hybrid_kv_heads(cfg)
        self.wq = nn.Linear(cfg.d_model, hc.n_attn_heads * hd, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.d_model, kv * hd, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.d_model, kv * hd, bias=cfg.qkv_bias)
        self.mamba = Mamba2Mixer(cfg, n_heads=hc.n_mamba_heads, out_proj=False)
        d_cat = hc.n_attn_heads * hd + hc.n_mamba_heads * cfg.mamba.head_dim
        self.out_proj = nn.Linear(d_cat, cfg.d_model, bias=False)
        self.use_doc_mask = cfg.doc_mask
        self.mamba_doc_reset = cfg.mamba.doc_reset

    def attend(self, x: torch.Tensor, ctx) -> torch.Tensor:
        """The attention heads' output before projection: [B, S, n_attn * head_dim]."""
        B, S, _ = x.shape
        q = self.wq(x).view(B, S, -1, self.head_dim)
        k = self.wk(x).view(B, S, -1, self.head_dim)
        v = self.wv(x).view(B, S, -1, self.head_dim)
        if ctx is not None and ctx.rope is not None:
            q, k = kernels.apply_rotary(q, k, *ctx.rope)
        doc_ids = ctx.doc_ids if ctx is not None and self.use_doc_mask else None
        attend = getattr(ctx, "attention", None) or kernels.attention
        return attend(q, k, v, doc_ids).reshape(B, S, -1)

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:
        doc_ids = ctx.doc_ids if ctx is not None and self.mamba_doc_reset else None
        a = self.attend(x, ctx)
        m = self.mamba.mix(x, doc_ids, shard=ctx.recurrent_shard if ctx is not None else None)
        return self.out_proj(torch.cat([a, m.to(a.dtype)], dim=-1))


def check_hybrid(cfg: ModelConfig) -> None:
    check_ssm_params(cfg)
    mc, hc = cfg.mamba, cfg.hybrid
    need(hc.n_mamba_heads % mc.n_groups == 0, "mamba.n_groups",
         f"{mc.n_groups} groups do not divide hybrid.n_mamba_heads={hc.n_mamba_heads}")


def hybrid_attention_heads(cfg: ModelConfig) -> tuple[str, int, int]:
    return "model.hybrid.n_attn_heads", cfg.hybrid.n_attn_heads, hybrid_kv_heads(cfg)


def hybrid_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token of one ``P`` mixer, counted as FlopCounterMode counts them
    (attention scores over the full S x S matrix, as its SDPA formula does)."""
    hc, hd = cfg.hybrid, cfg.head_dim_resolved
    kv = hybrid_kv_heads(cfg)
    f = 2 * cfg.d_model * (hc.n_attn_heads + 2 * kv) * hd  # q, k, v
    f += 4 * seq_len * hc.n_attn_heads * hd  # QK^T and AV
    f += mamba_flops_per_token(cfg, seq_len, n_heads=hc.n_mamba_heads, out_proj=False)
    f += 2 * (hc.n_attn_heads * hd + hc.n_mamba_heads * cfg.mamba.head_dim) * cfg.d_model
    return float(f)
