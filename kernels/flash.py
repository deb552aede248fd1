"""flash-attn path for ``kernels.attention``: packed documents become varlen sequences.

A row of ``doc_ids`` [B, S] holds runs of equal ids (packed documents). Every run, in
every row, becomes one sequence of flash-attn's varlen API, with ``causal=True`` inside
it; that is exactly the reference's "causal and same document" mask. Runs are found by
change of id between neighbours, so ids need not be unique across rows or sorted.
"""

from __future__ import annotations

import torch


def cu_seqlens_from_doc_ids(doc_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(cu_seqlens int32 [n_docs + 1], max_seqlen)`` over the flattened ``[B * S]`` tokens."""
    B, S = doc_ids.shape
    starts = torch.ones(B, S, dtype=torch.bool, device=doc_ids.device)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    idx = starts.reshape(-1).nonzero().squeeze(1)
    total = torch.tensor([B * S], dtype=idx.dtype, device=idx.device)
    cu = torch.cat([idx, total]).to(torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0
    return cu, max_len


def varlen_attention(q, k, v, doc_ids, varlen_fn):
    """Doc-masked causal attention through a flash-attn-style varlen function.

    q: [B, S, H, D]; k, v: [B, S, Hkv, D]. ``varlen_fn`` has the signature of
    ``flash_attn.flash_attn_varlen_func`` (GQA handled by it).
    """
    B, S, H, D = q.shape
    cu, max_len = cu_seqlens_from_doc_ids(doc_ids)
    out = varlen_fn(q.reshape(B * S, H, D), k.reshape(B * S, k.shape[2], D),
                    v.reshape(B * S, v.shape[2], D), cu_seqlens_q=cu, cu_seqlens_k=cu,
                    max_seqlen_q=max_len, max_seqlen_k=max_len, causal=True)
    return out.view(B, S, H, D)


def flash_usable(q: torch.Tensor) -> str | None:
    """Why flash-attn cannot take ``q`` (None if it can)."""
    if q.device.type != "cuda":
        return f"needs a CUDA tensor, got {q.device.type}"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"needs fp16/bf16 inputs, got {q.dtype}"
    if q.shape[-1] > 256:
        return f"supports head_dim <= 256, got {q.shape[-1]}"
    return None


def make_flash_attention(strict: bool):
    """Build the flash-attn ``attention`` op. ``strict`` (backend forced to ``vendor``):
    inputs flash-attn cannot take raise; otherwise they go to the reference."""
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    from kernels.reference import attention as reference

    def attention(q, k, v, doc_ids=None):
        why = flash_usable(q)
        if why is not None:
            if strict:
                raise RuntimeError(f"kernel 'attention': backend 'vendor' (flash-attn) {why}")
            return reference(q, k, v, doc_ids)
        if doc_ids is None:
            return flash_attn_func(q, k, v, causal=True)
        return varlen_attention(q, k, v, doc_ids, flash_attn_varlen_func)

    return attention
