"""Model configuration: one dataclass tree shared by every architecture.

The stack is described by ``pattern`` (Megatron-LM hybrid symbols) repeated
``n_layers`` times: ``*`` attention, ``-`` SwiGLU MLP, ``M`` Mamba-2 mixer,
``E`` MoE MLP, ``P`` parallel attention+Mamba-2 heads (Falcon-H1 style),
``|`` a pipeline-stage boundary (not a sublayer). The symbols and each kind's rules
live in its record in ``models/kinds.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from models.fields import UserError, check_fields, spec  # noqa: F401  (UserError re-exported)

STAGE_BOUNDARY = "|"


@dataclass
class MambaConfig:
    d_state: int = spec(128, ge=1)
    head_dim: int = spec(64, ge=1)
    n_groups: int = spec(1, ge=1)
    d_conv: int = spec(4, ge=1)
    expand: int = spec(2, ge=1)
    chunk_size: int = spec(256, ge=1)
    dt_min: float = spec(0.001, gt=0)
    dt_max: float = spec(0.1, gt=0)
    dt_init_floor: float = spec(1e-4, ge=0)
    dt_limit: tuple[float, float] = spec((0.0, float("inf")), ge=0, allow_inf=True)  # (low, high) clamp of dt
    A_init_range: tuple[float, float] = spec((1.0, 16.0), gt=0)
    conv_bias: bool = True
    # Reset the SSM state at document boundaries of packed sequences.
    doc_reset: bool = True


@dataclass
class GDNConfig:
    """Gated DeltaNet mixer ``G`` (models/gdn.py; Qwen3-Next's linear-attention layer)."""

    n_heads: int = spec(4, ge=1)  # query/key heads (Qwen3-Next linear_num_key_heads)
    n_v_heads: int = spec(0, ge=0, note="0: same as n_heads")  # value heads, a multiple of n_heads
    head_k_dim: int = spec(64, ge=1)
    head_v_dim: int = spec(64, ge=1)
    conv_size: int = spec(4, ge=1)  # short causal depthwise conv on q, k, v
    chunk_size: int = spec(64, ge=1)
    norm_eps: float = spec(1e-6, gt=0)  # the gated output RMSNorm
    dt_min: float = spec(0.001, gt=0)  # init of dt_bias: softplus^-1 of log-uniform [dt_min, dt_max]
    dt_max: float = spec(0.1, gt=0)
    A_init_range: tuple[float, float] = spec((1.0, 16.0), gt=0)  # A_log = log U(range)
    # Reset the state (and the conv window) at document boundaries of packed sequences.
    doc_reset: bool = True


@dataclass
class HybridHeadsConfig:
    """Falcon-H1-style mixer ``P``: attention and Mamba-2 heads side by side."""

    n_attn_heads: int = spec(4, ge=1)
    n_mamba_heads: int = spec(4, ge=1)


@dataclass
class MoEConfig:
    n_experts: int = spec(8, ge=1)
    top_k: int = spec(2, ge=1)
    ffn_hidden: int = spec(0, ge=0, note="0: same as the dense MLP")  # 0: same as the dense MLP
    score_fn: str = spec("softmax", choices=("softmax", "sigmoid"))
    renormalize: bool = True
    n_groups: int = spec(1, ge=1)  # group-limited routing: experts split into groups
    topk_groups: int = spec(1, ge=1)
    aux_loss_coef: float = spec(1e-2, ge=0)
    z_loss_coef: float = spec(1e-3, ge=0)
    # Switch-loss statistics per sequence (DeepSeek-V3's sequence-wise balance loss, averaged
    # over sequences: the same loss under every layout and micro-batch split) or per
    # micro-batch (Switch/Mixtral; changes with the number of rows a rank holds).
    aux_loss_scope: str = spec("sequence", choices=("sequence", "micro_batch"))
    bias_update_rate: float = spec(0.0, ge=0)  # >0 enables DeepSeek-V3 aux-loss-free balancing
    n_shared_experts: int = spec(0, ge=0)
    shared_expert_gate: bool = False
    capacity_factor: float = spec(0.0, ge=0, note="0: dropless")  # 0: dropless
    drop_policy: str = spec("probs", choices=("probs", "position"))
    router_bias: bool = False
    expert_impl: str = spec("auto", choices=("auto", "grouped_mm", "loop", "bmm"))  # see models/moe_experts.py


@dataclass
class RopeScalingConfig:
    """RoPE scaling for context extension, HF ``rope_scaling`` semantics (models/rope_scaling.py)."""

    type: str = spec("none", choices=("none", "linear", "llama3", "yarn"))
    factor: float = spec(1.0, ge=1)  # new context length / original context length
    original_max_seq_len: int = spec(0, ge=0)  # the pretraining length (llama3: required; yarn: 0 = max_seq_len)
    low_freq_factor: float = spec(1.0, gt=0)  # llama3
    high_freq_factor: float = spec(4.0, gt=0)  # llama3
    beta_fast: float = spec(32.0, gt=0)  # yarn
    beta_slow: float = spec(1.0, gt=0)  # yarn
    attention_factor: float = spec(0.0, ge=0, note="0: 0.1 ln(factor) + 1")  # yarn: cos/sin multiplier
    truncate: bool = True  # yarn: round the ramp's ends to whole dimensions


@dataclass
class MLAConfig:
    """Multi-head latent attention (DeepSeek-V2/V3), used when ``model.attention: mla`` (models/mla.py)."""

    q_lora_rank: int = spec(0, ge=0, note="0: plain q projection")  # low-rank query compression
    kv_lora_rank: int = spec(512, ge=1)  # the compressed KV latent (what the KV cache holds)
    qk_nope_head_dim: int = spec(128, ge=1)  # per-head query/key dims without RoPE
    qk_rope_head_dim: int = spec(64, ge=2)  # decoupled RoPE dims (one shared rope key per token)
    v_head_dim: int = spec(128, ge=1)
    # yarn rope scaling: softmax scale x mscale(factor, mscale_all_dim)^2 (DeepSeek-V3: 1.0)
    mscale_all_dim: float = spec(0.0, ge=0, note="0: no adjustment")


@dataclass
class ModelConfig:
    vocab_size: int = spec(32000, ge=1)
    d_model: int = spec(256, ge=1)
    n_layers: int = spec(4, ge=1, le=10_000)  # (the stack is built as pattern * n_layers)
    pattern: str = spec("*-", nonempty=True)
    n_heads: int = spec(8, ge=1)
    n_kv_heads: int = spec(0, ge=0, note="0: same as n_heads")
    head_dim: int = spec(0, ge=0, note="0: d_model // n_heads")
    ffn_hidden: int = spec(0, ge=0, note="0: from d_model")  # 0: 8/3 * d_model rounded up to ffn_multiple_of
    ffn_multiple_of: int = spec(64, ge=1)
    max_seq_len: int = spec(2048, ge=1)
    position: str = spec("rope", choices=("rope", "none"))
    rope_theta: float = spec(10000.0, gt=0)
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)  # context extension
    norm_eps: float = spec(1e-5, gt=0)
    norm: str = spec("pre", choices=("pre", "peri"))  # peri (Peri-LN: also a norm on each sublayer output)
    tie_embeddings: bool = False
    residual: str = spec("standard", choices=("standard", "ladder", "parallel"))
    ladder_from: int = spec(0, ge=0)  # ladder from this sublayer index on
    doc_mask: bool = True  # packed documents do not attend across EOS
    init_std: float = spec(0.02, gt=0)
    depth_scaled_init: bool = True
    qkv_bias: bool = False
    mamba: MambaConfig = field(default_factory=MambaConfig)
    hybrid: HybridHeadsConfig = field(default_factory=HybridHeadsConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    attention: str = spec("mha", choices=("mha", "mla"))  # kind of the '*' sublayer (mha: MHA/GQA/MQA)
    mla: MLAConfig = field(default_factory=MLAConfig)
    qk_norm: bool = False  # RMSNorm per head on q and k before RoPE (Qwen3)
    attn_output_gate: bool = False  # sigmoid gate from the q projection on the output (Qwen3-Next)
    partial_rotary_factor: float = spec(1.0, gt=0, le=1)  # RoPE on this fraction of the head dims
    gdn: GDNConfig = field(default_factory=GDNConfig)
    # multi-token prediction (DeepSeek-V3, models/mtp.py): D extra modules, module k predicting
    # token t+1+k; loss = main + mtp_loss_weight / D * sum of the D depth losses
    mtp_depth: int = spec(0, ge=0, le=64, note="0: off")
    mtp_loss_weight: float = spec(0.3, ge=0)
    mtp_pattern: str = spec("*-", nonempty=True)  # the sublayers of each MTP module's block

    # ---- derived -----------------------------------------------------------------
    @property
    def n_kv_heads_resolved(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim_resolved(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def rope_dim(self) -> int:
        """Dims per head RoPE rotates: MLA's decoupled key, else a fraction of the head (as HF)."""
        if self.attention == "mla":
            return self.mla.qk_rope_head_dim
        return int(self.head_dim_resolved * self.partial_rotary_factor)

    @property
    def ffn_hidden_resolved(self) -> int:
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
        from models.kinds import BY_SYMBOL  # (imports the mixers, which import this module)

        return [BY_SYMBOL[c].name for c in self.full_pattern if c != STAGE_BOUNDARY]

    @property
    def mtp_kinds(self) -> list[str]:
        """Sublayer kinds of each multi-token-prediction module's block."""
        from models.kinds import BY_SYMBOL

        return [BY_SYMBOL[c].name for c in self.mtp_pattern if c in BY_SYMBOL]

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
                raise UserError(f"model.{key}: {msg}")

        check_fields(self, "model")  # each field's declared range; below: rules across fields
        from models.kinds import BY_SYMBOL, present

        bad = sorted({c for c in self.pattern if c not in BY_SYMBOL and c != STAGE_BOUNDARY})
        need(not bad, "pattern", f"unknown symbol(s) {bad}; allowed: "
             + ", ".join(f"'{k}' {v.name}" for k, v in BY_SYMBOL.items()) + ", '|' stage boundary")
        need(self.n_sublayers > 0, "pattern", "must contain at least one sublayer")
        bad = sorted({c for c in self.mtp_pattern if c not in BY_SYMBOL})
        need(not bad, "mtp_pattern", f"unknown symbol(s) {bad}; allowed: {', '.join(BY_SYMBOL)}")
        if not self.head_dim:
            need(self.d_model % self.n_heads == 0, "n_heads",
                 f"{self.n_heads} heads do not divide d_model={self.d_model} (or set model.head_dim)")
        need(self.head_dim_resolved % 2 == 0 or self.position != "rope", "head_dim",
             f"head dim {self.head_dim_resolved} must be even for RoPE")
        need(0 < self.n_kv_heads_resolved <= self.n_heads and self.n_heads % self.n_kv_heads_resolved == 0, "n_kv_heads",
             f"{self.n_kv_heads_resolved} KV heads must divide n_heads={self.n_heads}")
        if self.attention == "mla" or self.qk_norm or self.attn_output_gate or self.partial_rotary_factor != 1:
            from models.mla import check_attention_options

            check_attention_options(self)
        need(0 <= self.ladder_from < max(self.n_sublayers, 1), "ladder_from",
             f"{self.ladder_from} outside 0..{self.n_sublayers - 1}")
        for k in present(self):
            if k.validate is not None:
                k.validate(self)
        if self.rope_scaling.type != "none":
            from models.rope_scaling import check_rope_scaling

            check_rope_scaling(self.rope_scaling, self.max_seq_len)
        if self.residual == "parallel":
            need(all(c in "*-|" for c in self.pattern) and "*-" in self.full_pattern.replace("|", ""),
                 "residual", "'parallel' needs a pattern of attention+MLP pairs ('*-')")
