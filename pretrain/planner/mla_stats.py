"""Planner model of multi-head latent attention (``model.attention: mla``, models/mla.py):
GEMM shapes split as parallel/tp_mla.py splits them, element-wise traffic and saved
activations (estimates in the style of model_stats.py's other kinds)."""

from __future__ import annotations

from models.config import ModelConfig


def _dims(cfg: ModelConfig):
    m = cfg.mla
    return m, cfg.n_heads, m.qk_nope_head_dim + m.qk_rope_head_dim


def mla_linears(cfg: ModelConfig) -> list[tuple[str, int, int, str]]:
    """(name, d_in, d_out, tp split) of each GEMM."""
    m, h, qk = _dims(cfg)
    d = cfg.d_model
    if m.q_lora_rank:
        q = [("wq_a", d, m.q_lora_rank, "rep"), ("wq_b", m.q_lora_rank, h * qk, "col")]
    else:
        q = [("wq", d, h * qk, "col")]
    return q + [("wkv_a", d, m.kv_lora_rank + m.qk_rope_head_dim, "rep"),
                ("wkv_b", m.kv_lora_rank, h * (m.qk_nope_head_dim + m.v_head_dim), "col"),
                ("wo", h * m.v_head_dim, d, "row")]


def mla_elementwise_bytes(cfg: ModelConfig, tp: int, a: int) -> float:
    """Per token, fwd + bwd: RoPE on the rope parts, the concatenations building q and k
    (read + write, both passes), and the two latent norms (replicated over tp)."""
    m, h, qk = _dims(cfg)
    rope = 4 * (h + 1) * m.qk_rope_head_dim * a / tp
    cat = 4 * 2 * h * qk * a / tp
    norms = 7 * (m.q_lora_rank + m.kv_lora_rank) * a
    return rope + cat + norms


def mla_activation_bytes(cfg: ModelConfig, tp: int, a: int) -> float:
    """Saved for backward per token: the latents (and their normed copies), q, k, v, the
    attention output and its logsumexp (flash-style kernel)."""
    m, h, qk = _dims(cfg)
    latents = 2 * (m.q_lora_rank + m.kv_lora_rank + m.qk_rope_head_dim) * a
    qkv = h * (2 * qk + m.v_head_dim) * a / tp
    out = h * m.v_head_dim * a / tp + h * 4 / tp
    return latents + qkv + out


def mla_widest(cfg: ModelConfig, tp: int) -> float:
    m, h, qk = _dims(cfg)
    return max(h * qk / tp, h * (m.qk_nope_head_dim + m.v_head_dim) / tp, cfg.d_model)


def mla_reference_extra(cfg: ModelConfig) -> float:
    """What the reference kernels keep on top: the latent norms' fp32 inputs."""
    return 4.0 * (cfg.mla.q_lora_rank + cfg.mla.kv_lora_rank)
