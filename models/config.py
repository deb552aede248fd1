"""Model configuration: one dataclass tree shared by every architecture.

The stack is described by ``pattern`` (Megatron-LM hybrid symbols) repeated
``n_layers`` times: ``*`` attention, ``-`` SwiGLU MLP, ``M`` Mamba-2 mixer,
``E`` MoE MLP, ``P`` parallel attention+Mamba-2 heads (Falcon-H1 style),
``|`` a pipeline-stage boundary (not a sublayer).
"""

from __future__ import annotations

from dataclasses import dataclass, field

SUBLAYER_SYMBOLS = {"*": "attention", "-": "mlp", "M": "mamba", "E": "moe", "P": "hybrid"}
STAGE_BOUNDARY = "|"


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and what is allowed."""


@dataclass
class MambaConfig:
    d_state: int = 128
    head_dim: int = 64
    n_groups: int = 1
    d_conv: int = 4
    expand: int = 2
    chunk_size: int = 256
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    dt_limit: tuple[float, float] = (0.0, float("inf"))
    A_init_range: tuple[float, float] = (1.0, 16.0)
    conv_bias: bool = True
    # Reset the SSM state at document boundaries of packed sequences.
    doc_reset: bool = True


@dataclass
class HybridHeadsConfig:
    """Falcon-H1-style mixer ``P``: attention and Mamba-2 heads side by side."""

    n_attn_heads: int = 4
    n_mamba_heads: int = 4


@dataclass
class MoEConfig:
    n_experts: int = 8
    top_k: int = 2
    ffn_hidden: int = 0  # 0: same as the dense MLP
    score_fn: str = "softmax"  # softmax | sigmoid
    renormalize: bool = True
    n_groups: int = 1  # group-limited routing: experts split into groups
    topk_groups: int = 1
    aux_loss_coef: float = 1e-2
    z_loss_coef: float = 1e-3
    bias_update_rate: float = 0.0  # >0 enables DeepSeek-V3 aux-loss-free balancing
    n_shared_experts: int = 0
    shared_expert_gate: bool = False
    capacity_factor: float = 0.0  # 0: dropless
    drop_policy: str = "probs"  # probs | position
    router_bias: bool = False
    expert_impl: str = "auto"  # auto | grouped_mm | loop | bmm (see models/moe_experts.py)


@dataclass
class RopeScalingConfig:
    """RoPE scaling for context extension, HF ``rope_scaling`` semantics (models/rope_scaling.py)."""

    type: str = "none"  # none | linear | llama3 | yarn
    factor: float = 1.0  # new context length / original context length
    original_max_seq_len: int = 0  # the pretraining length (llama3: required; yarn: 0 = max_seq_len)
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    attention_factor: float = 0.0  # yarn: cos/sin multiplier (0: 0.1 ln(factor) + 1)
    truncate: bool = True  # yarn: round the ramp's ends to whole dimensions


@dataclass
class ModelConfig:
    vocab_size: int = 32000
    d_model: int = 256
    n_layers: int = 4
    pattern: str = "*-"
    n_heads: int = 8
    n_kv_heads: int = 0  # 0: same as n_heads
    head_dim: int = 0  # 0: d_model // n_heads
    ffn_hidden: int = 0  # 0: 8/3 * d_model rounded up to ffn_multiple_of
    ffn_multiple_of: int = 64
    max_seq_len: int = 2048
    position: str = "rope"  # rope | none
    rope_theta: float = 10000.0
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)  # context extension
    norm_eps: float = 1e-5
    norm: str = "pre"  # pre | peri (Peri-LN: also a norm on each sublayer output)
    tie_embeddings: bool = False
    residual: str = "standard"  # standard | ladder | parallel
    ladder_from: int = 0  # ladder from this sublayer index on
    doc_mask: bool = True  # packed documents do not attend across EOS
    init_std: float = 0.02
    depth_scaled_init: bool = True
    qkv_bias: bool = False
    mamba: MambaConfig = field(default_factory=MambaConfig)
    hybrid: HybridHeadsConfig = field(default_factory=HybridHeadsConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)

    # ---- derived -----------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def dim_head(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def ffn_dim(self) -> int:
        if self.ffn_hidden:
            return self.ffn_hidden
        hidden = int(8 * self.d_model / 3)
        m = self.ffn_multiple_of
        return m * ((hidden + m - 1) // m)

    @property
    def full_pattern(self) -> str:
        """The whole stack, stage boundaries included."""
        return self.pattern * self.n_layers

    @property
    def sublayer_kinds(self) -> list[str]:
        return [SUBLAYER_SYMBOLS[c] for c in self.full_pattern if c != STAGE_BOUNDARY]

    @property
    def n_sublayers(self) -> int:
        return len(self.sublayer_kinds)

    def stage_boundaries(self) -> list[int]:
        """Sublayer indices at which a ``|`` starts a new pipeline stage."""
        out, k = [], 0
        for c in self.full_pattern:
            if c == STAGE_BOUNDARY:
                out.append(k)
            else:
                k += 1
        return out

    def validate(self) -> None:
        """Reject impossible combinations before any work starts."""
        def need(cond: bool, key: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"model.{key}: {msg}")

        need(self.vocab_size > 0, "vocab_size", f"must be positive, got {self.vocab_size}")
        need(self.d_model > 0, "d_model", f"must be positive, got {self.d_model}")
        need(self.n_layers > 0, "n_layers", f"must be positive, got {self.n_layers}")
        bad = sorted({c for c in self.pattern if c not in SUBLAYER_SYMBOLS and c != STAGE_BOUNDARY})
        need(not bad, "pattern", f"unknown symbol(s) {bad}; allowed: "
             + ", ".join(f"'{k}' {v}" for k, v in SUBLAYER_SYMBOLS.items()) + ", '|' stage boundary")
        need(self.n_sublayers > 0, "pattern", "must contain at least one sublayer")
        need(self.n_heads > 0, "n_heads", f"must be positive, got {self.n_heads}")
        if not self.head_dim:
            need(self.d_model % self.n_heads == 0, "n_heads",
                 f"{self.n_heads} heads do not divide d_model={self.d_model} (or set model.head_dim)")
        need(self.dim_head % 2 == 0 or self.position != "rope", "head_dim",
             f"head dim {self.dim_head} must be even for RoPE")
        need(0 < self.kv_heads <= self.n_heads and self.n_heads % self.kv_heads == 0, "n_kv_heads",
             f"{self.kv_heads} KV heads must divide n_heads={self.n_heads}")
        need(self.position in ("rope", "none"), "position", f"'{self.position}' not in rope|none")
        need(self.norm in ("pre", "peri"), "norm", f"'{self.norm}' not in pre|peri")
        need(self.residual in ("standard", "ladder", "parallel"), "residual",
             f"'{self.residual}' not in standard|ladder|parallel")
        need(0 <= self.ladder_from < max(self.n_sublayers, 1), "ladder_from",
             f"{self.ladder_from} outside 0..{self.n_sublayers - 1}")
        need(self.max_seq_len > 0, "max_seq_len", "must be positive")
        kinds = set(self.sublayer_kinds)
        if "mamba" in kinds or "hybrid" in kinds:
            mc = self.mamba
            need(mc.chunk_size > 0, "mamba.chunk_size", "must be positive")
            need(mc.d_conv >= 1, "mamba.d_conv", "must be >= 1")
            need(mc.n_groups >= 1, "mamba.n_groups", "must be >= 1")
        if "mamba" in kinds:
            d_inner = mc.expand * self.d_model
            need(d_inner % mc.head_dim == 0, "mamba.head_dim",
                 f"{mc.head_dim} does not divide expand*d_model={d_inner}")
            n_heads = d_inner // mc.head_dim
            need(n_heads % mc.n_groups == 0, "mamba.n_groups",
                 f"{mc.n_groups} groups do not divide {n_heads} Mamba heads")
        if "hybrid" in kinds:
            hc = self.hybrid
            need(hc.n_attn_heads >= 1, "hybrid.n_attn_heads", "must be >= 1")
            need(hc.n_mamba_heads >= 1, "hybrid.n_mamba_heads", "must be >= 1")
            need(hc.n_mamba_heads % mc.n_groups == 0, "mamba.n_groups",
                 f"{mc.n_groups} groups do not divide hybrid.n_mamba_heads={hc.n_mamba_heads}")
        if "moe" in kinds:
            m = self.moe
            need(m.n_experts >= 1, "moe.n_experts", "must be >= 1")
            need(1 <= m.top_k <= m.n_experts, "moe.top_k", f"must be in 1..{m.n_experts}")
            need(m.score_fn in ("softmax", "sigmoid"), "moe.score_fn", f"'{m.score_fn}' not in softmax|sigmoid")
            need(m.n_groups >= 1, "moe.n_groups", "must be >= 1")
            need(m.n_experts % m.n_groups == 0, "moe.n_groups",
                 f"{m.n_groups} groups do not divide {m.n_experts} experts")
            need(1 <= m.topk_groups <= m.n_groups, "moe.topk_groups", f"must be in 1..{m.n_groups}")
            need(m.top_k <= m.topk_groups * (m.n_experts // m.n_groups), "moe.top_k",
                 f"{m.top_k} exceeds the {m.topk_groups * (m.n_experts // m.n_groups)} experts in topk_groups groups")
            need(m.drop_policy in ("probs", "position"), "moe.drop_policy", "not in probs|position")
            need(m.capacity_factor >= 0, "moe.capacity_factor", "must be >= 0 (0 = dropless)")
            need(m.expert_impl in ("auto", "grouped_mm", "loop", "bmm"), "moe.expert_impl",
                 f"'{m.expert_impl}' not in auto|grouped_mm|loop|bmm")
        if self.rope_scaling.type != "none":
            from models.rope_scaling import check_rope_scaling

            check_rope_scaling(self.rope_scaling, self.max_seq_len)
        if self.residual == "parallel":
            need(all(c in "*-|" for c in self.pattern) and "*-" in self.full_pattern.replace("|", ""),
                 "residual", "'parallel' needs a pattern of attention+MLP pairs ('*-')")
