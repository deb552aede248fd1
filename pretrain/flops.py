"""Analytic FLOPs per token and model FLOPs utilisation (MFU).

Counts matmul FLOPs the way ``torch.utils.flop_counter.FlopCounterMode`` does
(2 * m * n * k per matmul; attention scores over the full S x S square, as the
SDPA counter does), so the count can be checked against the real model.
Training = forward + backward: 3x forward for matmuls; the attention score
matmuls count 3.5x, since fused (flash) attention backward recomputes the scores.
"""

from __future__ import annotations

import torch

from models.config import ModelConfig

# Dense bf16 peak FLOP/s per device (vendor datasheets, no sparsity).
PEAK_FLOPS = {
    "h100": 989e12,
    "h200": 989e12,
    "a100": 312e12,
    "b200": 2250e12,
    "l40s": 362e12,
    "a10": 125e12,
}


def attention_score_flops_per_token(cfg: ModelConfig, seq_len: int, n_heads: int | None = None) -> float:
    """QK^T and AV over the full S x S square (forward)."""
    h = cfg.n_heads if n_heads is None else n_heads
    return 2 * 2 * seq_len * cfg.dim_head * h


def attention_flops_per_token(cfg: ModelConfig, seq_len: int, n_heads: int | None = None) -> float:
    d, hd = cfg.d_model, cfg.dim_head
    h = cfg.n_heads if n_heads is None else n_heads
    kv = min(cfg.kv_heads, h)
    proj = 2 * d * hd * (2 * h + 2 * kv)  # q, o and k, v projections
    return proj + attention_score_flops_per_token(cfg, seq_len, h)


def mlp_flops_per_token(cfg: ModelConfig) -> float:
    return 2 * 3 * cfg.d_model * cfg.ffn_dim


def sublayer_flops_per_token(kind: str, cfg: ModelConfig, seq_len: int) -> float:
    if kind == "attention" and cfg.attention == "mla":
        from models.mla import mla_flops_per_token

        return mla_flops_per_token(cfg, seq_len)
    if kind == "attention":
        return attention_flops_per_token(cfg, seq_len)
    if kind == "mlp":
        return mlp_flops_per_token(cfg)
    if kind == "mamba":
        from models.mamba2 import mamba_flops_per_token

        return mamba_flops_per_token(cfg, seq_len)
    if kind == "moe":
        from models.moe import moe_flops_per_token

        return moe_flops_per_token(cfg, seq_len)
    if kind == "hybrid":
        from models.hybrid import hybrid_flops_per_token

        return hybrid_flops_per_token(cfg, seq_len)
    if kind == "gdn":
        return __import__("models.gdn", fromlist=["_"]).gdn_flops_per_token(cfg, seq_len)
    raise ValueError(f"no FLOPs formula for sublayer kind '{kind}'")


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward matmul FLOPs per token: every sublayer plus the LM head."""
    total = sum(sublayer_flops_per_token(k, cfg, seq_len) for k in cfg.sublayer_kinds)
    return total + 2 * cfg.d_model * cfg.vocab_size + mtp_flops_per_token(cfg, seq_len)


def mtp_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs of the multi-token-prediction modules (models/mtp.py): per depth the
    2d -> d projection, its block and the shared LM head (every position, as computed)."""
    block = sum(sublayer_flops_per_token(k, cfg, seq_len) for k in cfg.mtp_kinds)
    d = cfg.d_model
    return cfg.mtp_depth * (2 * 2 * d * d + block + 2 * d * cfg.vocab_size)


def _score_flops(kind: str, cfg: ModelConfig, seq_len: int) -> float:
    if kind == "attention" and cfg.attention == "mla":
        from models.mla import mla_score_flops_per_token

        return mla_score_flops_per_token(cfg, seq_len)
    if kind == "attention":
        return attention_score_flops_per_token(cfg, seq_len)
    if kind == "hybrid":
        return attention_score_flops_per_token(cfg, seq_len, cfg.hybrid.n_attn_heads)
    return 0.0


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward + backward FLOPs per token (what MFU divides by)."""
    scores = sum(_score_flops(k, cfg, seq_len) for k in cfg.sublayer_kinds)
    scores += cfg.mtp_depth * sum(_score_flops(k, cfg, seq_len) for k in cfg.mtp_kinds)
    return 3 * forward_flops_per_token(cfg, seq_len) + 0.5 * scores


def device_peak_flops(device: torch.device | str) -> float | None:
    """Peak bf16 FLOP/s of one device, or None where unknown (e.g. CPU)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device).lower()
    for key, peak in PEAK_FLOPS.items():
        if key in name:
            return peak
    return None


def cpu_attention_flop_mapping() -> dict:
    """FlopCounterMode formulas for the CPU SDPA kernels, which torch's counter misses.

    Use as ``FlopCounterMode(custom_mapping=cpu_attention_flop_mapping())``.
    """
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten

    def fwd(q, k, v, *args, **kwargs):
        return sdpa_flop_count(q, k, v)

    def bwd(grad_out, q, k, v, *args, **kwargs):
        return sdpa_backward_flop_count(grad_out, q, k, v)

    return {aten._scaled_dot_product_flash_attention_for_cpu: fwd,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: bwd}
