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
from models.kinds import KINDS

# Dense bf16 peak FLOP/s per device (vendor datasheets, no sparsity).
PEAK_FLOPS = {
    "h100": 989e12,
    "h200": 989e12,
    "a100": 312e12,
    "b200": 2250e12,
    "l40s": 362e12,
    "a10": 125e12,
}


def sublayer_flops_per_token(kind: str, cfg: ModelConfig, seq_len: int) -> float:
    if kind not in KINDS:
        raise ValueError(f"no FLOPs formula for sublayer kind '{kind}'")
    return KINDS[kind].flops_per_token(cfg, seq_len)


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


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward + backward FLOPs per token (what MFU divides by)."""
    scores = sum(KINDS[k].score_flops(cfg, seq_len) for k in cfg.sublayer_kinds)
    scores += cfg.mtp_depth * sum(KINDS[k].score_flops(cfg, seq_len) for k in cfg.mtp_kinds)
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
