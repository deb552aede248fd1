"""Pure-torch reference implementations of every fused op.

Each function here has the same signature as its fused counterpart and is the
oracle the fused kernels are tested against; on CPU these are what runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.fused_loss import chunked_linear_cross_entropy


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, computed in fp32, returned in x's dtype."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotary embedding, rotate-half layout (as Hugging Face Llama).

    q: [B, S, H, D], k: [B, S, Hkv, D]; cos/sin: [S, D//2] or [B, S, D//2].
    """
    cos = torch.cat((cos, cos), dim=-1).unsqueeze(-2)
    sin = torch.cat((sin, sin), dim=-1).unsqueeze(-2)

    def rot(t):
        tf = t.float()
        return (tf * cos + rotate_half(tf) * sin).to(t.dtype)

    return rot(q), rot(k)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` in the inputs' dtype."""
    return F.silu(gate) * up


def gated_rms_norm(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float,
                   group_size: int) -> torch.Tensor:
    """Mamba-2 gated RMSNorm: rms_norm(x * silu(z)) per group of ``group_size`` channels."""
    dtype = x.dtype
    h = x.float() * F.silu(z.float())
    shape = h.shape
    h = h.view(*shape[:-1], shape[-1] // group_size, group_size)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (h.view(shape) * weight.float()).to(dtype)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                  z_loss: float = 0.0, reduction: str = "mean") -> torch.Tensor:
    """Token cross-entropy in fp32 (+ ``z_loss * logsumexp^2`` per token).

    ``reduction``: ``mean`` over non-ignored tokens (0 when every label is ignored,
    rather than NaN) or ``sum`` (for token-weighted gradient accumulation).
    """
    logits = logits.float().reshape(-1, logits.shape[-1])
    labels = labels.reshape(-1)
    loss = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    valid = labels != ignore_index
    if z_loss:
        lse = torch.logsumexp(logits, dim=-1)
        loss = loss + z_loss * (lse.pow(2) * valid).sum()
    return _reduce(loss, valid, reduction)


def _reduce(total: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "sum":
        return total
    if reduction != "mean":
        raise ValueError(f"cross_entropy: reduction '{reduction}' not in mean|sum")
    return total / valid.sum().clamp(min=1)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         ignore_index: int = -100, z_loss: float = 0.0,
                         chunk_size: int = 0, reduction: str = "mean",
                         process_group=None, reduce_hidden_grad: bool = True) -> torch.Tensor:
    """LM head + cross-entropy without materialising the ``[tokens, vocab]`` logits.

    hidden: [..., D]; weight: [V, D] (or a vocab shard [V/tp, D] with ``process_group``);
    labels: [...] global token ids. Tokens are processed ``chunk_size`` at a time
    (0: chosen so one chunk's logits are about the size of ``hidden``); the gradients
    wrt hidden and weight are computed chunk by chunk during the forward and only
    they are kept. With ``process_group`` the weight holds rank r's contiguous slice
    of the vocabulary and the logsumexp and target logit are combined across the group;
    the gradient wrt ``hidden`` is summed over the group unless ``reduce_hidden_grad``
    is False (when the caller's own collective, e.g. a sequence-parallel
    reduce-scatter, sums it). Equals ``cross_entropy(hidden @ weight.t(), labels, ...)``.
    """
    return chunked_linear_cross_entropy(hidden, weight, labels, ignore_index, z_loss, chunk_size,
                                        reduction, process_group, reduce_hidden_grad,
                                        chunk_fn=None)


def doc_segments(doc_ids: torch.Tensor) -> torch.Tensor:
    """[..., S] ids -> run index (+1 wherever the id changes): a document is a contiguous
    run of equal ids, even if an id value recurs later in the row."""
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[..., 1:] = doc_ids[..., 1:] != doc_ids[..., :-1]
    return starts.cumsum(-1)


def doc_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """Boolean [B, 1, S, S] mask: causal and within the same document (run of equal ids)."""
    S = doc_ids.shape[-1]
    causal = torch.ones(S, S, dtype=torch.bool, device=doc_ids.device).tril()
    seg = doc_segments(doc_ids)
    same = seg.unsqueeze(-1) == seg.unsqueeze(-2)
    return (same & causal).unsqueeze(1)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention. q: [B, S, H, D]; k, v: [B, S, Hkv, D]; returns [B, S, H, D].

    With ``doc_ids`` ([B, S] ints), a token attends only to earlier tokens of its own
    document, a contiguous run of equal ids (as flash-attn's varlen path sees it).
    """
    H, Hkv = q.shape[2], k.shape[2]
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if Hkv != H:
        k = k.repeat_interleave(H // Hkv, dim=1)
        v = v.repeat_interleave(H // Hkv, dim=1)
    if doc_ids is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=doc_mask(doc_ids))
    return out.transpose(1, 2)
