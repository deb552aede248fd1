"""What the planner needs to know about a model: its parameter tensors (exact shapes, from
one meta-device copy of each sublayer kind), how tensor/expert parallelism splits them
(the rules ``parallel/tp.py`` applies), its linear layers (GEMM shapes) and its
element-wise memory traffic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from models.config import ModelConfig
from models.kinds import KINDS, inactive_params
from pretrain.planner.kind_costs import COSTS, Linear, heads_split

@dataclass(frozen=True)
class Param:
    name: str  # name inside its sublayer ("mixer.wq.weight") or top-level name
    shape: tuple[int, ...]
    tp_dim: int | None  # dim split over tp (None: replicated over tp)
    ep_dim: int | None = None  # dim split over expert-parallel ranks (MoE experts)


# ---- parameters ------------------------------------------------------------------------

def _sublayer_shapes(kind: str, cfg: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every parameter of one ``kind`` sublayer, in ``Sublayer``'s order:
    input norm, the mixer (its record's shapes), Peri-LN output norm."""
    d = (cfg.d_model,)
    mixer = [(f"mixer.{n}", shape) for n, shape in KINDS[kind].param_shapes(cfg).items()]
    return [("norm.weight", d)] + mixer + ([("out_norm.weight", d)] if cfg.norm == "peri" else [])


def tp_dim(kind: str, name: str, cfg: ModelConfig, tp: int) -> int | None:
    """The dim ``parallel/tp.py`` shards over tp for sublayer parameter ``name``."""
    parts = name.split(".")
    if tp <= 1 or parts[0] in ("norm", "out_norm"):
        return None
    leaf = parts[-2] if parts[-1] in ("weight", "bias") and len(parts) >= 3 else parts[-1]
    return (COSTS[kind].tp_dim or heads_split)(leaf, parts[-1], cfg, tp)


def sublayer_params(kind: str, cfg: ModelConfig, tp: int = 1) -> list[Param]:
    out = []
    for name, shape in _sublayer_shapes(kind, cfg):
        ep = 0 if name.rsplit(".", 1)[-1] in COSTS[kind].expert_params and len(shape) == 3 else None
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
    return total_params(cfg) - inactive_params(cfg)


# ---- linears and element-wise traffic ---------------------------------------------------

def linears(kind: str, cfg: ModelConfig, tp: int = 1) -> list[Linear]:
    if kind not in COSTS:
        raise ValueError(f"planner: no GEMM model for sublayer kind '{kind}'")
    return COSTS[kind].linears(cfg, tp)


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
    return common + COSTS[kind].elementwise(cfg, tp, a)


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
    return COSTS[kind].widest(cfg, tp)


def _reference_extra(kind: str, cfg: ModelConfig, tp: int, sp: bool, a: int) -> float:
    """What ``kernels/reference.py`` keeps on top of fused kernels, per token."""
    extra = cfg.d_model * 4 / (tp if sp else 1)  # RMSNorm's fp32 x * rsqrt (its weight gradient needs it)
    return extra + COSTS[kind].reference(cfg, tp, a)


def _fused_activation_bytes(kind: str, cfg: ModelConfig, tp: int, sp: bool, stream_bytes: int,
                            act_bytes: int, sp_sharded_input: bool) -> float:
    d, a = cfg.d_model, act_bytes
    stream = d * stream_bytes / (tp if sp else 1)  # the sublayer input (norm backward)
    # the mixer input: gathered to full length with sp, unless saved sharded
    normed = d * a / (tp if sp and sp_sharded_input else 1)
    if cfg.norm == "peri":
        stream += d * a
    total = stream + normed
    for term in COSTS[kind].saved(cfg, tp, a):
        total += term
    return total
