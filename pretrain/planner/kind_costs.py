"""The planner's cost model of each sublayer kind, keyed by its ``models/kinds.py`` name.

What one sublayer costs beyond its record's FLOPs and parameter shapes: its GEMMs and how
tensor parallelism splits them (mirroring its plan in ``parallel/tp_plans.py``), and its
per-token memory traffic and saved activations. ``model_stats`` adds the parts every
sublayer shares (input norm, residual stream). A new kind adds one ``KindCosts`` here
(``tests/test_kinds.py`` fails for a kind without one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from models import gdn
from models.config import ModelConfig
from models.kinds import ATTENTION, GDN, HYBRID, MAMBA, MLP_KIND, MOE
from pretrain.planner import mla_stats as mla


@dataclass(frozen=True)
class Linear:
    """One matmul per token: ``[tokens * token_factor, in] @ [in, out]``."""

    name: str
    d_in: int
    d_out: int
    split: str  # col | row | rep | expert
    token_factor: float = 1.0


@dataclass(frozen=True)
class KindCosts:
    linears: Callable[[ModelConfig, int], list[Linear]]  # (cfg, tp): forward GEMMs of one sublayer
    # (cfg, tp, act_bytes): HBM bytes per token of the mixer's own element-wise kernels, fwd + bwd
    elementwise: Callable[[ModelConfig, int, int], float]
    # (cfg, tp, act_bytes): bytes per token the mixer saves for backward with fused kernels,
    # beyond its input (terms, summed in order)
    saved: Callable[[ModelConfig, int, int], list[float]]
    # (cfg, tp, act_bytes): what kernels/reference.py keeps on top of fused kernels, per token
    reference: Callable[[ModelConfig, int, int], float]
    widest: Callable[[ModelConfig, int], float]  # (cfg, tp): elements per token of the widest intermediate
    # (leaf, cfg, tp): the dim its tp plan shards a mixer parameter on (None: replicated)
    tp_dim: Callable[[str, str, ModelConfig, int], int | None] | None = None
    expert_params: tuple[str, ...] = ()  # stacked [experts, ...] parameters, split over ep on dim 0


def heads_split(leaf: str, last: str, cfg: ModelConfig, tp: int) -> int | None:
    """A Megatron-style split of the mixer by heads: output projections by rows, the rest by
    columns (approximation; the dry run gives exact numbers)."""
    return 1 if leaf in ("out_proj", "w_down") and last == "weight" else 0


# ---- attention (standard, or MLA with ``model.attention: mla``) -----------------------------

def _attention_linears(cfg: ModelConfig, tp: int) -> list[Linear]:
    if cfg.attention == "mla":
        return [Linear(*t) for t in mla.mla_linears(cfg)]
    d, hd = cfg.d_model, cfg.head_dim_resolved
    kv_split = "col" if cfg.n_kv_heads_resolved % max(tp, 1) == 0 else "rep"
    q_out = cfg.n_heads * hd * (2 if cfg.attn_output_gate else 1)  # (wq also yields the gate)
    return [Linear("wq", d, q_out, "col"), Linear("wk", d, cfg.n_kv_heads_resolved * hd, kv_split),
            Linear("wv", d, cfg.n_kv_heads_resolved * hd, kv_split), Linear("wo", cfg.n_heads * hd, d, "row")]


def _attention_tp_dim(leaf: str, last: str, cfg: ModelConfig, tp: int) -> int | None:
    if leaf in ("wk", "wv"):
        return 0 if cfg.n_kv_heads_resolved % tp == 0 else None  # replicated KV heads
    return {"wq": 0, "wo": 1, "wq_b": 0, "wkv_b": 0}.get(leaf)  # (wq_b, wkv_b: MLA)


def _attention_elementwise(cfg: ModelConfig, tp: int, a: int) -> float:
    if cfg.attention == "mla":
        return mla.mla_elementwise_bytes(cfg, tp, a)
    extra = 4 * (cfg.n_heads + cfg.n_kv_heads_resolved) * cfg.head_dim_resolved * a / tp
    return extra + (4 * cfg.n_heads * cfg.head_dim_resolved * a / tp if cfg.attn_output_gate else 0)  # sigmoid, product


def _attention_saved(cfg: ModelConfig, tp: int, a: int) -> list[float]:
    if cfg.attention == "mla":
        return [mla.mla_activation_bytes(cfg, tp, a)]
    hd = cfg.head_dim_resolved
    qkv = (cfg.n_heads + 2 * cfg.n_kv_heads_resolved) * hd * a / tp
    qkv += cfg.n_heads * hd * a / tp if cfg.attn_output_gate else 0  # the gate
    out = cfg.n_heads * hd * a / tp + cfg.n_heads * 4 / tp  # output + logsumexp
    return [qkv, out]


def _attention_reference(cfg: ModelConfig, tp: int, a: int) -> float:
    if cfg.attention == "mla":
        return mla.mla_reference_extra(cfg)
    return 2 * (cfg.n_heads - cfg.n_kv_heads_resolved) * cfg.head_dim_resolved * a / tp  # K, V repeated per query head


def _attention_widest(cfg: ModelConfig, tp: int) -> float:
    if cfg.attention == "mla":
        return mla.mla_widest(cfg, tp)
    return max(cfg.n_heads * cfg.head_dim_resolved / tp, cfg.d_model)


ATTENTION_COSTS = KindCosts(
    linears=_attention_linears, elementwise=_attention_elementwise, saved=_attention_saved,
    reference=_attention_reference, widest=_attention_widest, tp_dim=_attention_tp_dim)


# ---- MLP ----------------------------------------------------------------------------------

def _mlp_linears(cfg: ModelConfig, tp: int) -> list[Linear]:
    d, f = cfg.d_model, cfg.ffn_hidden_resolved
    return [Linear("w_gate", d, f, "col"), Linear("w_up", d, f, "col"), Linear("w_down", f, d, "row")]


MLP_COSTS = KindCosts(
    linears=_mlp_linears,
    elementwise=lambda cfg, tp, a: 8 * cfg.ffn_hidden_resolved * a / tp,
    saved=lambda cfg, tp, a: [3 * cfg.ffn_hidden_resolved * a / tp],
    reference=lambda cfg, tp, a: cfg.ffn_hidden_resolved * a / tp,  # silu(gate)
    widest=lambda cfg, tp: cfg.ffn_hidden_resolved / tp,
    tp_dim=lambda leaf, last, cfg, tp: {"w_gate": 0, "w_up": 0, "w_down": 1}.get(leaf))


# ---- MoE ----------------------------------------------------------------------------------

def _moe_linears(cfg: ModelConfig, tp: int) -> list[Linear]:
    from models.moe import expert_width

    d, m, fe = cfg.d_model, cfg.moe, expert_width(cfg)
    out = [Linear("router", d, m.n_experts, "rep"),
           Linear("experts.w_gate", d, fe, "expert", m.top_k),
           Linear("experts.w_up", d, fe, "expert", m.top_k),
           Linear("experts.w_down", fe, d, "expert", m.top_k)]
    if m.n_shared_experts:
        fs = fe * m.n_shared_experts
        out += [Linear("shared.w_gate", d, fs, "col"), Linear("shared.w_up", d, fs, "col"),
                Linear("shared.w_down", fs, d, "row")]
    return out


def _moe_elementwise(cfg: ModelConfig, tp: int, a: int) -> float:
    from models.moe import expert_width

    m, d = cfg.moe, cfg.d_model
    return m.top_k * (8 * d + 8 * expert_width(cfg)) * a + 8 * m.n_shared_experts * expert_width(cfg) * a / tp


def _moe_saved(cfg: ModelConfig, tp: int, a: int) -> list[float]:
    from models.moe import expert_width

    m, fe, d = cfg.moe, expert_width(cfg), cfg.d_model
    routed = m.top_k * (2 * d + 3 * fe) * a + m.n_experts * 4 * 2
    shared = 3 * fe * m.n_shared_experts * a / tp
    return [routed, shared]


def _moe_reference(cfg: ModelConfig, tp: int, a: int) -> float:
    from models.moe import expert_width

    return (cfg.moe.top_k + cfg.moe.n_shared_experts / tp) * expert_width(cfg) * a


def _moe_widest(cfg: ModelConfig, tp: int) -> float:
    from models.moe import expert_width

    return max(cfg.moe.top_k * expert_width(cfg), cfg.d_model)


MOE_COSTS = KindCosts(
    linears=_moe_linears, elementwise=_moe_elementwise, saved=_moe_saved, reference=_moe_reference,
    widest=_moe_widest,
    tp_dim=lambda leaf, last, cfg, tp: None,  # parallel/tp_moe.py: token-wise, replicated over tp
    expert_params=("w_gate", "w_up", "w_down"))


# ---- Mamba-2 and hybrid heads ---------------------------------------------------------------

def _ssm_heads(kind: str, cfg: ModelConfig) -> int:
    mc = cfg.mamba
    return mc.expand * cfg.d_model // mc.head_dim if kind == MAMBA.name else cfg.hybrid.n_mamba_heads


def _ssm_linears(kind: str, cfg: ModelConfig, tp: int) -> list[Linear]:
    d, hd, mc = cfg.d_model, cfg.head_dim_resolved, cfg.mamba
    H = _ssm_heads(kind, cfg)
    di, gn = H * mc.head_dim, mc.n_groups * mc.d_state
    out = [Linear("z_proj", d, di, "col"), Linear("x_proj", d, di, "col"),
           Linear("B_proj", d, gn, "col"), Linear("C_proj", d, gn, "col"),
           Linear("dt_proj", d, H, "col")]
    if kind == MAMBA.name:
        return out + [Linear("out_proj", di, d, "row")]
    from models.hybrid import hybrid_kv_heads

    na, kv = cfg.hybrid.n_attn_heads, hybrid_kv_heads(cfg)
    return out + [Linear("wq", d, na * hd, "col"), Linear("wk", d, kv * hd, "col"),
                  Linear("wv", d, kv * hd, "col"), Linear("out_proj", na * hd + di, d, "row")]


def _ssm_elementwise(kind: str, cfg: ModelConfig, tp: int, a: int) -> float:
    """conv, SiLU, gating and grouped norm over d_inner (+ rope over the hybrid's attention)."""
    mc = cfg.mamba
    extra = 12 * _ssm_heads(kind, cfg) * mc.head_dim * a / tp
    if kind == HYBRID.name:
        extra += 4 * 2 * cfg.hybrid.n_attn_heads * cfg.head_dim_resolved * a / tp
    return extra


def _ssm_saved(kind: str, cfg: ModelConfig, tp: int, a: int) -> list[float]:
    mc, hd = cfg.mamba, cfg.head_dim_resolved
    H = _ssm_heads(kind, cfg)
    di, gn = H * mc.head_dim, mc.n_groups * mc.d_state
    ssm = (5 * di + 4 * gn + 2 * H) * a / tp + H * mc.head_dim * mc.d_state * 4 / (mc.chunk_size * tp)
    if kind == HYBRID.name:
        ssm += (cfg.hybrid.n_attn_heads * 2 + 2 * cfg.n_kv_heads_resolved) * hd * a / tp
    return [ssm]


def _ssm_reference(kind: str, cfg: ModelConfig, tp: int, a: int) -> float:
    # kernels/ssd.py's chunked scan in fp32: the decay and score matrices and the einsums'
    # copies of them (4 x H x chunk), x*dt, its einsum copy, y before D and the state inputs
    # (4 x H x P), the chunk states and their copy (2 x H x P x N / chunk)
    mc = cfg.mamba
    H = _ssm_heads(kind, cfg) / tp
    return 4 * (4 * H * mc.chunk_size + 4 * H * mc.head_dim + 2 * H * mc.head_dim * mc.d_state / mc.chunk_size)


def _ssm_costs(kind: str) -> KindCosts:
    return KindCosts(
        linears=lambda cfg, tp: _ssm_linears(kind, cfg, tp),
        elementwise=lambda cfg, tp, a: _ssm_elementwise(kind, cfg, tp, a),
        saved=lambda cfg, tp, a: _ssm_saved(kind, cfg, tp, a),
        reference=lambda cfg, tp, a: _ssm_reference(kind, cfg, tp, a),
        widest=lambda cfg, tp: max(_ssm_heads(kind, cfg) * cfg.mamba.head_dim / tp, cfg.d_model))


# ---- Gated DeltaNet (models/gdn.py keeps its formulas) ----------------------------------------

GDN_COSTS = KindCosts(
    linears=lambda cfg, tp: [Linear(*t) for t in gdn.gdn_linears(cfg)],
    elementwise=lambda cfg, tp, a: gdn.gdn_elementwise_elems(cfg) * a / tp,
    saved=lambda cfg, tp, a: [gdn.gdn_saved_bytes(cfg, a) / tp],
    reference=lambda cfg, tp, a: gdn.gdn_reference_bytes(cfg) / tp,
    widest=lambda cfg, tp: gdn.gdn_widest(cfg) / tp,
    tp_dim=lambda leaf, last, cfg, tp: gdn.gdn_tp_dim(leaf))


COSTS: dict[str, KindCosts] = {
    ATTENTION.name: ATTENTION_COSTS,
    MLP_KIND.name: MLP_COSTS,
    MAMBA.name: _ssm_costs(MAMBA.name),
    MOE.name: MOE_COSTS,
    HYBRID.name: _ssm_costs(HYBRID.name),
    GDN.name: GDN_COSTS,
}
