"""Multi-head latent attention (DeepSeek-V2/V3), ``model.attention: mla``; and the checks of
the standard attention's options (``qk_norm``, ``attn_output_gate``, ``partial_rotary_factor``).

MLA per token ``x``:
- query: ``wq_b(q_norm(wq_a x))`` (low-rank, ``q_lora_rank > 0``) or ``wq x``; each head's
  ``qk_nope_head_dim + qk_rope_head_dim`` dims are ``[nope | rope]``;
- ``wkv_a x = [latent (kv_lora_rank) | k_rope (qk_rope_head_dim)]``: the latent is normed and
  expanded by ``wkv_b`` into each head's ``[k_nope | v]``; ``k_rope`` is one RoPE key shared by
  all heads. A KV cache holds only the latent and ``k_rope`` per token.
- scores over ``[nope | rope]`` with scale ``1/sqrt(nope + rope)`` (times ``mscale^2`` under
  yarn rope scaling with ``mla.mscale_all_dim``, as DeepSeek-V3).

RoPE is rotate-half (as every other sublayer here). DeepSeek checkpoints store the rope rows
interleaved (pairs ``(2i, 2i+1)``), which transformers de-interleaves at run time
(``rope_interleave``); the same scores come from permuting those weight rows once at import
(see tests/test_mla.py for the mapping).

Single-device code: shapes come from the weights (``view(..., -1, dim)``), so column shards of
``wq``/``wq_b``/``wkv_b`` yield fewer local heads (parallel/tp_mla.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from models.config import ModelConfig, UserError
from models.layers import Attention, ForwardContext, RMSNorm

# transformers' DeepseekV3 builds q_a_layernorm / kv_a_layernorm with their default eps
LATENT_NORM_EPS = 1e-6


def make_attention(cfg: ModelConfig) -> nn.Module:
    """The ``*`` sublayer's mixer: MLA or the standard (MHA/GQA/MQA) attention."""
    return MLAttention(cfg) if cfg.attention == "mla" else Attention(cfg)


def check_attention_options(cfg: ModelConfig) -> None:
    """Rules across ``model.attention`` / ``model.mla`` and the attention options."""
    def need(cond: bool, key: str, msg: str) -> None:
        if not cond:
            raise UserError(f"model.{key}: {msg}")

    kinds = set(cfg.sublayer_kinds)
    rope = cfg.position == "rope"
    if cfg.attention == "mla":
        for key in ("qk_norm", "attn_output_gate"):
            need(not getattr(cfg, key), key, "is an option of attention: mha, not mla")
        need(cfg.partial_rotary_factor == 1, "partial_rotary_factor",
             "is an option of attention: mha (mla sets its rope dims with mla.qk_rope_head_dim)")
        need(not cfg.qkv_bias, "qkv_bias", "not supported with attention: mla")
        need(cfg.mla.qk_rope_head_dim % 2 == 0 or not rope, "mla.qk_rope_head_dim",
             f"{cfg.mla.qk_rope_head_dim} must be even for RoPE")
        need("hybrid" not in kinds, "attention", "mla does not apply to 'P' sublayers; use attention: mha")
        return
    need(cfg.rope_dim >= 2 or not rope, "partial_rotary_factor",
         f"{cfg.partial_rotary_factor} x head dim {cfg.head_dim_resolved} leaves no dims to rotate")
    need(cfg.rope_dim % 2 == 0 or not rope, "partial_rotary_factor",
         f"{cfg.partial_rotary_factor} x head dim {cfg.head_dim_resolved} = {cfg.rope_dim} dims must be even for RoPE")
    need(cfg.partial_rotary_factor == 1 or "hybrid" not in kinds, "partial_rotary_factor",
         "not supported with 'P' sublayers")


def mla_mscale(cfg: ModelConfig) -> float:
    """DeepSeek-V3's multiplier of the softmax scale (its square is applied): yarn only."""
    sc, m = cfg.rope_scaling, cfg.mla.mscale_all_dim
    if sc.type != "yarn" or not m or sc.factor <= 1:
        return 1.0
    return 0.1 * m * math.log(sc.factor) + 1.0


class MLAttention(nn.Module):
    """Causal multi-head latent attention (names: ``wq`` or ``wq_a``/``q_norm``/``wq_b``,
    ``wkv_a``, ``kv_norm``, ``wkv_b``, ``wo``)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        m, d, h = cfg.mla, cfg.d_model, cfg.n_heads
        self.nope, self.rope, self.v_dim = m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim
        self.qk_dim = self.nope + self.rope
        self.kv_lora_rank = m.kv_lora_rank
        if m.q_lora_rank:
            self.wq_a = nn.Linear(d, m.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(m.q_lora_rank, LATENT_NORM_EPS)
            self.wq_b = nn.Linear(m.q_lora_rank, h * self.qk_dim, bias=False)
        else:
            self.wq = nn.Linear(d, h * self.qk_dim, bias=False)
        self.wkv_a = nn.Linear(d, m.kv_lora_rank + self.rope, bias=False)
        self.kv_norm = RMSNorm(m.kv_lora_rank, LATENT_NORM_EPS)
        self.wkv_b = nn.Linear(m.kv_lora_rank, h * (self.nope + self.v_dim), bias=False)
        self.wo = nn.Linear(h * self.v_dim, d, bias=False)
        # the attention kernels scale by 1/sqrt(q's head dim); the yarn adjustment goes on q
        self.q_mult = mla_mscale(cfg) ** 2
        self.use_doc_mask = cfg.doc_mask

    def project_q(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "wq"):
            return self.wq(x)
        return self.wq_b(self.q_norm(self.wq_a(x)))

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        B, S, _ = x.shape
        q = self.project_q(x).view(B, S, -1, self.qk_dim)
        q_nope, q_rope = q.split([self.nope, self.rope], dim=-1)
        latent, k_rope = self.wkv_a(x).split([self.kv_lora_rank, self.rope], dim=-1)
        kv = self.wkv_b(self.kv_norm(latent)).view(B, S, -1, self.nope + self.v_dim)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k_rope = k_rope.unsqueeze(2)  # [B, S, 1, rope]: one key for every head
        if ctx.rope is not None:
            q_rope, k_rope = kernels.apply_rotary(q_rope, k_rope, *ctx.rope)
        h = q.shape[2]
        q = torch.cat([q_nope, q_rope], dim=-1)
        k = torch.cat([k_nope, k_rope.expand(B, S, h, self.rope)], dim=-1)
        if self.q_mult != 1.0:
            q = q * self.q_mult
        out = self.attend(q, k, v, ctx)
        return self.wo(out.reshape(B, S, -1))

    def attend(self, q, k, v, ctx: ForwardContext) -> torch.Tensor:
        """Attention with value dim ``v_head_dim``. The context-parallel attention and the
        flash-attn path need one head dim for q, k and v: there v (or q and k) is padded with
        zeros, which changes neither the scores' scale (q is rescaled to keep 1/sqrt(qk_dim))
        nor the output (the padded columns are dropped)."""
        attend = ctx.attention or kernels.attention
        doc_ids = ctx.doc_ids if self.use_doc_mask else None
        dq, dv = q.shape[-1], v.shape[-1]
        if dq == dv or (ctx.attention is None and q.device.type == "cpu"):
            return attend(q, k, v, doc_ids)
        d = max(dq, dv)
        if dq < d:
            q = F.pad(q, (0, d - dq)) * math.sqrt(d / dq)
            k = F.pad(k, (0, d - dq))
        return attend(q, k, F.pad(v, (0, d - dv)), doc_ids)[..., :dv]


# ---- accounting ----------------------------------------------------------------------------

def mla_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token of one MLA mixer, as FlopCounterMode counts them (matmuls;
    QK^T over qk dims and AV over v dims on the full S x S square, as its SDPA formula does)."""
    m, d, h = cfg.mla, cfg.d_model, cfg.n_heads
    qk = m.qk_nope_head_dim + m.qk_rope_head_dim
    if m.q_lora_rank:
        q = 2 * d * m.q_lora_rank + 2 * m.q_lora_rank * h * qk
    else:
        q = 2 * d * h * qk
    kv = 2 * d * (m.kv_lora_rank + m.qk_rope_head_dim) + 2 * m.kv_lora_rank * h * (m.qk_nope_head_dim + m.v_head_dim)
    out = 2 * h * m.v_head_dim * d
    return float(q + kv + out + mla_score_flops_per_token(cfg, seq_len))


def mla_score_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """QK^T and AV (forward) over the full S x S square."""
    m = cfg.mla
    return float(2 * seq_len * cfg.n_heads * (m.qk_nope_head_dim + m.qk_rope_head_dim + m.v_head_dim))


def kv_cache_elems_per_token(cfg: ModelConfig) -> dict[str, int]:
    """Elements a KV cache holds per token, per attention kind of the stack (summed over its
    layers): MLA the latent and the shared rope key, GQA/MHA K and V of every KV head."""
    kinds = cfg.sublayer_kinds
    out = {}
    n_attn = kinds.count("attention")
    if n_attn:
        if cfg.attention == "mla":
            per = cfg.mla.kv_lora_rank + cfg.mla.qk_rope_head_dim
        else:
            per = 2 * cfg.n_kv_heads_resolved * cfg.head_dim_resolved
        out["attention"] = n_attn * per
    if kinds.count("hybrid"):
        from models.hybrid import hybrid_kv_heads

        out["hybrid"] = kinds.count("hybrid") * 2 * hybrid_kv_heads(cfg) * cfg.head_dim_resolved
    return out


def kv_cache_bytes_per_token(cfg: ModelConfig, bytes_per_elem: int = 2) -> int:
    """KV-cache bytes per token of the whole stack (default bf16); Mamba state is per
    sequence, not per token, and is not counted."""
    return bytes_per_elem * sum(kv_cache_elems_per_token(cfg).values())
