"""Shared helpers for the Triton wrappers."""

from __future__ import annotations

import os

import torch
import triton

# Whether the kernels below were decorated as interpreter functions: triton.jit decides
# this once, at decoration, from TRITON_INTERPRET.
_knobs = getattr(triton, "knobs", None)
INTERPRET = bool(_knobs.runtime.interpret) if _knobs is not None else \
    os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")

# Longest row a norm kernel holds in one block (fp32 registers on the GPU).
MAX_ROW = 65536


def rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """``t`` as a 2-D ``[M, n]`` view with unit column stride (any row stride), copying
    only when the leading dims cannot be flattened into one strided dim."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    try:
        return t.view(-1, n)
    except RuntimeError:
        return t.reshape(-1, n)


def num_programs(device: torch.device, m: int) -> int:
    """Programs for a row loop that also reduces a per-column partial (weight grads)."""
    if device.type == "cuda":
        return max(1, min(m, 4 * torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(m, 4))  # the interpreter pays per program, not per row


def warps(block: int) -> int:
    return min(max(block // 256, 1), 16)


def check_row(op: str, n: int) -> None:
    if n > MAX_ROW:
        raise ValueError(f"kernel '{op}': row length {n} exceeds the Triton kernel's limit "
                         f"{MAX_ROW}; use the reference backend")
