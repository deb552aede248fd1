"""One declarative record per sublayer kind: everything ``models/`` knows about it.

A kind is added here, in one ``SublayerKind`` entry of ``KINDS``, pointing at its module
and formulas. The rest of the system reads the record instead of testing kind names:
``ModelConfig`` (pattern symbols, cross-field rules), the stack (factory, RoPE),
``pretrain/flops.py`` (FLOPs), the planner (parameter shapes, attention heads),
context parallel (recurrent state passing). Parallelism keeps its own per-kind tables
keyed by the same names, so ``models/`` never imports ``parallel/``: the TP plan in
``parallel/tp_plans.py`` and the planner's cost model in ``pretrain/planner/kind_costs.py``
(``tests/test_kinds.py`` checks every kind has both).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from models.config import ModelConfig
from models.gdn import GatedDeltaNetMixer, check_gdn_config, gdn_flops_per_token
from models.hybrid import HybridHeadsMixer, check_hybrid, hybrid_attention_heads, hybrid_flops_per_token
from models.layers import MLP
from models.mla import make_attention, mla_flops_per_token, mla_score_flops_per_token
from models.mamba2 import Mamba2Mixer, check_mamba, mamba_flops_per_token
from models.moe import MoE, check_moe, moe_flops_per_token, moe_inactive_params


@dataclass(frozen=True)
class SublayerKind:
    name: str  # what ``cfg.sublayer_kinds`` lists, and the key of every per-kind table
    symbol: str  # its character in ``model.pattern`` (Megatron-LM hybrid symbols)
    factory: Callable[[ModelConfig], nn.Module]  # cfg -> mixer with forward(x, ctx)
    # forward FLOPs per token on a seq_len sequence, counted as FlopCounterMode counts them
    flops_per_token: Callable[[ModelConfig, int], float]
    # (config key, query heads, KV heads) of its causal softmax attention, if any: its score
    # matrix (FLOPs, context parallel K/V exchange, causal-skip kernels)
    attention_heads: Callable[[ModelConfig], tuple[str, int, int]] | None = None
    validate: Callable[[ModelConfig], None] | None = None  # cross-field rules (UserError)
    uses_rope: bool = False  # the model builds RoPE tables when such a kind is present
    recurrent: bool = False  # carries state along the sequence (context parallel passes it)
    routed_experts: bool = False  # holds experts split over expert-parallel ranks
    # parameters of one sublayer a token does not use (MoE: the experts it is not routed to)
    inactive_params: Callable[[ModelConfig], int] | None = None
    # the score FLOPs when its heads' dims are not ``cfg.head_dim_resolved`` (see ``score_flops``)
    scores: Callable[[ModelConfig, int], float] | None = None

    def score_flops(self, cfg: ModelConfig, seq_len: int) -> float:
        """Forward FLOPs per token of the attention scores (QK^T and AV over the full S x S
        square, as the SDPA counter counts them); 0 without attention."""
        if self.scores is not None:
            return self.scores(cfg, seq_len)
        if self.attention_heads is None:
            return 0.0
        return attention_score_flops_per_token(cfg, seq_len, self.attention_heads(cfg)[1])

    def param_shapes(self, cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
        """{name inside the mixer: shape} of every parameter (built once on the meta device)."""
        key = (self.name, repr(cfg))
        if key not in _SHAPES:
            with torch.device("meta"):
                mixer = self.factory(cfg)
            _SHAPES[key] = {n: tuple(p.shape) for n, p in mixer.named_parameters()}
        return _SHAPES[key]


_SHAPES: dict[tuple[str, str], dict[str, tuple[int, ...]]] = {}


# ---- dense attention and MLP formulas ------------------------------------------------------

def attention_score_flops_per_token(cfg: ModelConfig, seq_len: int, n_heads: int | None = None) -> float:
    """QK^T and AV over the full S x S square (forward)."""
    h = cfg.n_heads if n_heads is None else n_heads
    return 2 * 2 * seq_len * cfg.head_dim_resolved * h


def attention_flops_per_token(cfg: ModelConfig, seq_len: int, n_heads: int | None = None) -> float:
    d, hd = cfg.d_model, cfg.head_dim_resolved
    h = cfg.n_heads if n_heads is None else n_heads
    kv = min(cfg.n_kv_heads_resolved, h)
    proj = 2 * d * hd * (2 * h + 2 * kv)  # q, o and k, v projections
    return proj + attention_score_flops_per_token(cfg, seq_len, h)


def mlp_flops_per_token(cfg: ModelConfig) -> float:
    return 2 * 3 * cfg.d_model * cfg.ffn_hidden_resolved


def _attention_flops(cfg: ModelConfig, seq_len: int) -> float:
    return mla_flops_per_token(cfg, seq_len) if cfg.attention == "mla" else attention_flops_per_token(cfg, seq_len)


def _attention_scores(cfg: ModelConfig, seq_len: int) -> float:
    if cfg.attention == "mla":
        return mla_score_flops_per_token(cfg, seq_len)
    return attention_score_flops_per_token(cfg, seq_len)


# ---- the registry --------------------------------------------------------------------------

# ``*``: standard (MHA/GQA/MQA) attention or, with ``model.attention: mla``, DeepSeek's MLA
ATTENTION = SublayerKind(
    "attention", "*", make_attention, _attention_flops,
    attention_heads=lambda cfg: ("model.n_heads", cfg.n_heads, cfg.n_kv_heads_resolved), uses_rope=True,
    scores=_attention_scores)
MLP_KIND = SublayerKind("mlp", "-", lambda cfg: MLP(cfg.d_model, cfg.ffn_hidden_resolved),
                        lambda cfg, seq_len: mlp_flops_per_token(cfg))
MAMBA = SublayerKind("mamba", "M", Mamba2Mixer, lambda cfg, seq_len: mamba_flops_per_token(cfg, seq_len),
                     validate=check_mamba, recurrent=True)
MOE = SublayerKind("moe", "E", MoE, moe_flops_per_token, validate=check_moe, routed_experts=True,
                   inactive_params=moe_inactive_params)
HYBRID = SublayerKind("hybrid", "P", HybridHeadsMixer, hybrid_flops_per_token,
                      attention_heads=hybrid_attention_heads, validate=check_hybrid, uses_rope=True,
                      recurrent=True)

GDN = SublayerKind("gdn", "G", GatedDeltaNetMixer, gdn_flops_per_token,
                   validate=lambda cfg: check_gdn_config(cfg.gdn), recurrent=True)

KINDS: dict[str, SublayerKind] = {k.name: k for k in (ATTENTION, MLP_KIND, MAMBA, MOE, HYBRID, GDN)}
BY_SYMBOL: dict[str, SublayerKind] = {k.symbol: k for k in KINDS.values()}


def kind(name: str) -> SublayerKind:
    if name not in KINDS:
        raise ValueError(f"no implementation for sublayer kind '{name}'")
    return KINDS[name]


def present(cfg: ModelConfig) -> list[SublayerKind]:
    """The kinds ``cfg``'s stack (and its multi-token-prediction blocks) uses, each once, in
    the order of ``KINDS``."""
    names = set(cfg.sublayer_kinds) | (set(cfg.mtp_kinds) if cfg.mtp_depth else set())
    return [k for k in KINDS.values() if k.name in names]


def has_experts(cfg: ModelConfig) -> bool:
    return any(k.routed_experts for k in present(cfg))


def inactive_params(cfg: ModelConfig) -> int:
    """Parameters of the whole stack one token does not use."""
    return sum(KINDS[k].inactive_params(cfg) for k in cfg.sublayer_kinds
               if KINDS[k].inactive_params is not None)
