"""What the planner needs to know about a model: its parameter tensors (exact shapes, from
one meta-device copy of each sublayer kind), how tensor/expert parallelism splits them
(the rules ``parallel/tp.py`` applies), its linear layers (GEMM shapes) and its
element-wise memory traffic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from models.config import ModelConfig

@dataclass(frozen=True)
class Param:
    name: str  # name inside its sublayer ("mixer.wq.weight") or top-level name
    shape: tuple[int, ...]
    tp_dim: int | None  # dim split over tp (None: replicated over tp)
    ep_dim: int | None = None  # dim split over expert-parallel ranks (MoE experts)


@dataclass(frozen=True)
class Linear:
    """One matmul per token: ``[tokens * token_factor, in] @ [in, out]``."""

    name: str
    d_in: int
    d_out: int
    split: str  # col | row | rep | expert
    token_factor: float = 1.0


# ---- parameters ------------------------------------------------------------------------

def _meta_sublayer(kind: str, cfg: ModelConfig):
    import torch

    from models.transformer import Sublayer

    with torch.device("meta"):
        return Sublayer(kind, cfg)


_SHAPES: dict[tuple[str, str], tuple[tuple[str, tuple[int, ...]], ...]] = {}


def _sublayer_shapes(kind: str, cfg: ModelConfig) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """(name, shape) of every parameter of one ``kind`` sublayer (built once on meta)."""
    key = (kind, repr(cfg))
    if key not in _SHAPES:
        sub = _meta_sublayer(kind, cfg)
        _SHAPES[key] = tuple((n, tuple(p.shape)) for n, p in sub.named_parameters())
    return _SHAPES[key]


def tp_dim(kind: str, name: str, cfg: ModelConfig, tp: int) -> int | None:
    """The dim ``parallel/tp.py`` shards over tp for sublayer parameter ``name``."""
    parts = name.split(".")
    if tp <= 1 or parts[0] in ("norm", "out_norm"):
        return None
    leaf = parts[-2] if parts[-1] in ("weight", "bias") and len(parts) >= 3 else parts[-1]
    if kind == "attention":
        if leaf in ("wk", "wv"):
            return 0 if cfg.kv_heads % tp == 0 else None  # replicated KV heads
        return {"wq": 0, "wo": 1, "wq_b": 0, "wkv_b": 0}.get(leaf)  # (wq_b, wkv_b: MLA)
    if kind == "mlp":
        return {"w_gate": 0, "w_up": 0, "w_down": 1}.get(leaf)
    if kind == "moe":  # parallel/tp_moe.py: token-wise, every parameter replicated over tp
        return None
    if kind == "gdn":
        return __import__("models.gdn").gdn.gdn_tp_dim(leaf)
    # Kinds without an exact rule here: a Megatron-style split of the mixer by heads
    # (approximation; the dry run gives exact numbers when a plan is registered).
    return 1 if leaf in ("out_proj", "w_down") and parts[-1] == "weight" else 0


def sublayer_params(kind: str, cfg: ModelConfig, tp: int = 1) -> list[Param]:
    out = []
    for name, shape in _sublayer_shapes(kind, cfg):
        ep = 0 if kind == "moe" and name.rsplit(".", 1)[-1] in ("w_gate", "w_up", "w_down") \
            and len(shape) == 3 else None
        td = None if ep is not None else tp_dim(kind, name, cfg, tp)
        out.append(Param(name, shape, td, ep))
    return out


def top_params(cfg: ModelConfig, first: bool, last: bool, tp: int = 1) -> list[Param]:
    """Embedding (first stage), final norm, LM head and MTP modules (last stage; their
    sublayers split as for ``tp``)."""
    out = []
    if first:
        out.append(Param("tok_embeddings.weight", (cfg.vocab_size, cfg.d_model), 0))
    if last:
        out.append(Param("norm.weight", (cfg.d_model,), None))
        if not (cfg.tie_embeddings and first):
            out.append(Param("output.weight", (cfg.vocab_size, cfg.d_model), 0))
        out += mtp_params(cfg, tp)
    return out


def mtp_params(cfg: ModelConfig, tp: int = 1) -> list[Param]:
    """The multi-token-prediction modules (last stage; parallel/mtp.py: norms and the
    2d -> d projection replicated over tp, the block's sublayers as their kind)."""
    out, d = [], cfg.d_model
    for k in range(cfg.mtp_depth):
        pre = f"mtp.{k}."
        out += [Param(pre + "enorm.weight", (d,), None), Param(pre + "hnorm.weight", (d,), None),
                Param(pre + "proj.weight", (d, 2 * d), None), Param(pre + "norm.weight", (d,), None)]
        for i, kind in enumerate(cfg.mtp_kinds):
            out += [Param(f"{pre}layers.{i}.{p.name}", p.shape, p.tp_dim, p.ep_dim)
                    for p in sublayer_params(kind, cfg, tp)]
    return out


def local_numel(p: Param, tp: int, ep: int = 1, shard: int = 1, shard_rank: int = 0) -> int:
    """Elements of ``p`` one rank holds: split over tp (or ep), then FSDP's dim-0 chunk
    ``shard_rank`` of ``shard`` (``torch.chunk`` sizes: ceil, the tail ranks get less)."""
    shape = list(p.shape)
    if p.tp_dim is not None and tp > 1:
        shape[p.tp_dim] //= tp
    if p.ep_dim is not None and ep > 1:
        shape[p.ep_dim] //= ep
    if shard > 1 and shape:
        c = math.ceil(shape[0] / shard)
        shape[0] = max(0, min(c, shape[0] - shard_rank * c))
    return math.prod(shape)


def numel(p: Param) -> int:
    return math.prod(p.shape)


def total_params(cfg: ModelConfig) -> int:
    per_kind = {k: sum(numel(p) for p in sublayer_params(k, cfg)) for k in set(cfg.sublayer_kinds)}
    n = sum(per_kind[k] for k in cfg.sublayer_kinds)
    return n + sum(numel(p) for p in top_params(cfg, True, True))


def active_params(cfg: ModelConfig) -> int:
    """Parameters one token uses (MoE: router, top-k and shared experts only)."""
    n = total_params(cfg)
    if "moe" in cfg.sublayer_kinds:
        from models.moe import moe_active_params, moe_total_params

        n -= cfg.sublayer_kinds.count("moe") * (moe_total_params(cfg) - moe_active_params(cfg))
    return n


# ---- linears and element-wise traffic ---------------------------------------------------

def linears(kind: str, cfg: ModelConfig, tp: int = 1) -> list[Linear]:
    d, hd = cfg.d_model, cfg.dim_head
    kv_split = "col" if cfg.kv_heads % max(tp, 1) == 0 else "rep"
    if kind == "attention" and cfg.attention == "mla":
        from pretrain.planner.mla_stats import mla_linears

        return mla_linears(cfg)
    if kind == "attention":  # (attn_output_gate: wq also yields the gate)
        return [Linear("wq", d, cfg.n_heads * hd * (2 if cfg.attn_output_gate else 1), "col"), Linear("wk", d, cfg.kv_heads * hd, kv_split),
                Linear("wv", d, cfg.kv_heads * hd, kv_split), Linear("wo", cfg.n_heads * hd, d, "row")]
    if kind == "mlp":
        f = cfg.ffn_dim
        return [Linear("w_gate", d, f, "col"), Linear("w_up", d, f, "col"), Linear("w_down", f, d, "row")]
    if kind == "moe":
        from models.moe import expert_width

        m, fe = cfg.moe, expert_width(cfg)
        out = [Linear("router", d, m.n_experts, "rep"),
               Linear("experts.w_gate", d, fe, "expert", m.top_k),
               Linear("experts.w_up", d, fe, "expert", m.top_k),
               Linear("experts.w_down", fe, d, "expert", m.top_k)]
        if m.n_shared_experts:
            fs = fe * m.n_shared_experts
            out += [Linear("shared.w_gate", d, fs, "col"), Linear("shared.w_up", d, fs, "col"),
                    Linear("shared.w_down", fs, d, "row")]
        return out
    if kind == "gdn":
        return [Linear(*t) for t in __import__("models.gdn").gdn.gdn_linears(cfg)]
    if kind in ("mamba", "hybrid"):
        mc = cfg.mamba
        H = mc.expand * d // mc.head_dim if kind == "mamba" else cfg.hybrid.n_mamba_heads
        di, gn = H * mc.head_dim, mc.n_groups * mc.d_state
        out = [Linear("z_proj", d, di, "col"), Linear("x_proj", d, di, "col"),
               Linear("B_proj", d, gn, "col"), Linear("C_proj", d, gn, "col"),
               Linear("dt_proj", d, H, "col")]
        if kind == "mamba":
            return out + [Linear("out_proj", di, d, "row")]
        from models.hybrid import hybrid_kv_heads

        na, kv = cfg.hybrid.n_attn_heads, hybrid_kv_heads(cfg)
        return out + [Linear("wq", d, na * hd, "col"), Linear("wk", d, kv * hd, "col"),
                      Linear("wv", d, kv * hd, "col"), Linear("out_proj", na * hd + di, d, "row")]
    raise ValueError(f"planner: no GEMM model for sublayer kind '{kind}'")


def local_dims(lin: Linear, tp: int) -> tuple[int, int]:
    if lin.split == "col":
        return lin.d_in, lin.d_out // tp
    if lin.split == "row":
        return lin.d_in // tp, lin.d_out
    return lin.d_in, lin.d_out


def linear_flops_per_token(kind: str, cfg: ModelConfig) -> float:
    """Forward GEMM FLOPs per token of one sublayer (whole, not per tp rank)."""
    return sum(2.0 * l.d_in * l.d_out * l.token_factor for l in linears(kind, cfg))


def fused_flops_per_token(kind: str, cfg: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs outside GEMMs (attention scores, SSD scan, conv): the project's FLOPs
    count for the sublayer minus its linears."""
    from pretrain.flops import sublayer_flops_per_token

    return max(0.0, sublayer_flops_per_token(kind, cfg, seq_len) - linear_flops_per_token(kind, cfg))


def elementwise_bytes_per_token(kind: str, cfg: ModelConfig, tp: int, sp: bool,
                                stream_bytes: int, act_bytes: int) -> float:
    """HBM bytes per token of one sublayer's element-wise kernels, forward + backward:
    input norm (fwd read x, write y; bwd read dy, x, write dx), residual add, and the
    mixer's own (rope, SwiGLU, conv/gating, token permutation)."""
    d, a, s = cfg.d_model, act_bytes, stream_bytes
    common = d * (8 * s + 3 * a) / (tp if sp else 1)
    if cfg.norm == "peri":
        common *= 1.5
    hd = cfg.dim_head
    if kind == "attention" and cfg.attention == "mla":
        from pretrain.planner.mla_stats import mla_elementwise_bytes

        extra = mla_elementwise_bytes(cfg, tp, a)
    elif kind == "attention":
        extra = 4 * (cfg.n_heads + cfg.kv_heads) * hd * a / tp
        extra += 4 * cfg.n_heads * hd * a / tp if cfg.attn_output_gate else 0  # sigmoid, product
    elif kind == "mlp":
        extra = 8 * cfg.ffn_dim * a / tp
    elif kind == "moe":
        from models.moe import expert_width

        m = cfg.moe
        extra = m.top_k * (8 * d + 8 * expert_width(cfg)) * a + 8 * m.n_shared_experts * expert_width(cfg) * a / tp
    elif kind == "gdn":
        extra = __import__("models.gdn").gdn.gdn_elementwise_elems(cfg) * a / tp
    else:  # mamba / hybrid: conv, SiLU, gating and grouped norm over d_inner
        mc = cfg.mamba
        H = mc.expand * d // mc.head_dim if kind == "mamba" else cfg.hybrid.n_mamba_heads
        extra = 12 * H * mc.head_dim * a / tp
        if kind == "hybrid":
            extra += 4 * 2 * cfg.hybrid.n_attn_heads * hd * a / tp
    return common + extra


def activation_bytes_per_token(kind: str, cfg: ModelConfig, tp: int, sp: bool,
                               stream_bytes: int, act_bytes: int, sp_sharded_input: bool = False,
                               reference: bool = False) -> float:
    """Bytes one sublayer keeps for backward per token (no recomputation). Flash-style
    kernels: no S x S score matrix is stored. ``sp_sharded_input``, ``reference``: see
    ``Recipe``."""
    extra = _reference_extra(kind, cfg, tp, sp, act_bytes) if reference else 0.0
    return extra + _fused_activation_bytes(kind, cfg, tp, sp, stream_bytes, act_bytes, sp_sharded_input)


def widest_per_token(kind: str, cfg: ModelConfig, tp: int) -> float:
    """Elements per token of a sublayer's widest intermediate (per tp rank)."""
    d = cfg.d_model
    if kind == "mlp":
        return cfg.ffn_dim / tp
    if kind == "moe":
        from models.moe import expert_width

        return max(cfg.moe.top_k * expert_width(cfg), d)
    if kind == "attention" and cfg.attention == "mla":
        from pretrain.planner.mla_stats import mla_widest

        return mla_widest(cfg, tp)
    if kind == "attention":
        return max(cfg.n_heads * cfg.dim_head / tp, d)
    if kind == "gdn":
        return __import__("models.gdn").gdn.gdn_widest(cfg) / tp
    mc = cfg.mamba
    H = mc.expand * d // mc.head_dim if kind == "mamba" else cfg.hybrid.n_mamba_heads
    return max(H * mc.head_dim / tp, d)


def _reference_extra(kind: str, cfg: ModelConfig, tp: int, sp: bool, a: int) -> float:
    """What ``kernels/reference.py`` keeps on top of fused kernels, per token."""
    d, hd = cfg.d_model, cfg.dim_head
    extra = d * 4 / (tp if sp else 1)  # RMSNorm's fp32 x * rsqrt (its weight gradient needs it)
    if kind == "attention" and cfg.attention == "mla":
        from pretrain.planner.mla_stats import mla_reference_extra

        extra += mla_reference_extra(cfg)
    elif kind == "attention":
        extra += 2 * (cfg.n_heads - cfg.kv_heads) * hd * a / tp  # K, V repeated per query head
    elif kind == "mlp":
        extra += cfg.ffn_dim * a / tp  # silu(gate)
    elif kind == "moe":
        from models.moe import expert_width

        extra += (cfg.moe.top_k + cfg.moe.n_shared_experts / tp) * expert_width(cfg) * a
    elif kind == "gdn":
        extra += __import__("models.gdn").gdn.gdn_reference_bytes(cfg) / tp
    elif kind in ("mamba", "hybrid"):
        # kernels/ssd.py's chunked scan in fp32: the decay and score matrices and the
        # einsums' copies of them (4 x H x chunk), x*dt, its einsum copy, y before D and the
        # state inputs (4 x H x P), the chunk states and their copy (2 x H x P x N / chunk)
        mc = cfg.mamba
        H = (mc.expand * d // mc.head_dim if kind == "mamba" else cfg.hybrid.n_mamba_heads) / tp
        extra += 4 * (4 * H * mc.chunk_size + 4 * H * mc.head_dim
                      + 2 * H * mc.head_dim * mc.d_state / mc.chunk_size)
    return extra


def _fused_activation_bytes(kind: str, cfg: ModelConfig, tp: int, sp: bool, stream_bytes: int,
                            act_bytes: int, sp_sharded_input: bool) -> float:
    d, a = cfg.d_model, act_bytes
    stream = d * stream_bytes / (tp if sp else 1)  # the sublayer input (norm backward)
    # the mixer input: gathered to full length with sp, unless saved sharded
    normed = d * a / (tp if sp and sp_sharded_input else 1)
    hd = cfg.dim_head
    if cfg.norm == "peri":
        stream += d * a
    if kind == "attention" and cfg.attention == "mla":
        from pretrain.planner.mla_stats import mla_activation_bytes

        return stream + normed + mla_activation_bytes(cfg, tp, a)
    if kind == "attention":
        qkv = (cfg.n_heads + 2 * cfg.kv_heads) * hd * a / tp
        qkv += cfg.n_heads * hd * a / tp if cfg.attn_output_gate else 0  # the gate
        out = cfg.n_heads * hd * a / tp + cfg.n_heads * 4 / tp  # output + logsumexp
        return stream + normed + qkv + out
    if kind == "mlp":
        return stream + normed + 3 * cfg.ffn_dim * a / tp
    if kind == "moe":
        from models.moe import expert_width

        m, fe = cfg.moe, expert_width(cfg)
        routed = m.top_k * (2 * d + 3 * fe) * a + m.n_experts * 4 * 2
        shared = 3 * fe * m.n_shared_experts * a / tp
        return stream + normed + routed + shared
    if kind == "gdn":
        return stream + normed + __import__("models.gdn").gdn.gdn_saved_bytes(cfg, a) / tp
    mc = cfg.mamba
    H = mc.expand * d // mc.head_dim if kind == "mamba" else cfg.hybrid.n_mamba_heads
    di, gn = H * mc.head_dim, mc.n_groups * mc.d_state
    ssm = (5 * di + 4 * gn + 2 * H) * a / tp + H * mc.head_dim * mc.d_state * 4 / (mc.chunk_size * tp)
    if kind == "hybrid":
        ssm += (cfg.hybrid.n_attn_heads * 2 + 2 * cfg.kv_heads) * hd * a / tp
    return stream + normed + ssm
