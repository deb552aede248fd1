"""Multi-token prediction (DeepSeek-V3, section 2.2): D sequential modules after the stack.

Module k (1..D) at position i combines the previous depth's hidden state h^{k-1}_i
(h^0: the main stack's output before the final norm) with the embedding of token
t_{i+k} (the model's own embedding table)::

    x_i   = proj([enorm(Emb(t_{i+k})); hnorm(h^{k-1}_i)])      (2d -> d, no bias)
    h^k   = block(x)                                            (model.mtp_pattern, standard residual)
    P^k_i = head(norm_k(h^k_i))                                 (shared LM head) -> predicts t_{i+k+1}

The concatenation order (embedding first) is the one of DeepSeek-V3's released ``eh_proj``
and Megatron-LM. Rows keep their full length S: the last k positions have no target
(label -100) and a zero embedding, and since attention is causal they never change the
earlier positions, so the losses equal those of DeepSeek's truncated sequences. Targets
are the main labels shifted by k: as for the main loss, a target in the next packed
document is kept (only padding, -100, is ignored).

The depth losses are computed inside the model's forward (on the last pipeline stage)
by :func:`mtp_losses`; the total objective is ``main + lambda / D * sum_k loss_k``.
"""

from __future__ import annotations

import torch
from torch import nn

from models.config import ModelConfig
from models.layers import ForwardContext, RMSNorm
from models.transformer import Sublayer, join

IGNORE_INDEX = -100


class MTPModule(nn.Module):
    """One prediction depth: norms, 2d -> d projection, one block, its own final norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.enorm = RMSNorm(d, cfg.norm_eps)
        self.hnorm = RMSNorm(d, cfg.norm_eps)
        self.proj = nn.Linear(2 * d, d, bias=False)
        self.layers = nn.ModuleDict({str(i): Sublayer(kind, cfg) for i, kind in enumerate(cfg.mtp_kinds)})
        self.norm = RMSNorm(d, cfg.norm_eps)

    def forward(self, h: torch.Tensor, emb: torch.Tensor, ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor]:
        """(h^{k-1}, embeddings already shifted by k) -> (h^k, norm_k(h^k) for the head)."""
        x = self.proj(torch.cat([self.enorm(emb), self.hnorm(h)], dim=-1))
        for layer in self.layers.values():
            x = join(x, layer(x, ctx))
        return x, self.norm(x)


def build_mtp(cfg: ModelConfig) -> nn.ModuleList | None:
    """The ``model.mtp_depth`` modules (None when 0)."""
    if not cfg.mtp_depth:
        return None
    return nn.ModuleList(MTPModule(cfg) for _ in range(cfg.mtp_depth))


def shift_left(x: torch.Tensor, k: int, fill) -> torch.Tensor:
    """``x[:, i + k]`` at position i along dim 1; the last k positions get ``fill``."""
    pad = x.new_full((x.shape[0], k, *x.shape[2:]), fill)
    return torch.cat([x[:, k:], pad], dim=1)


def mtp_losses(model: nn.Module, h: torch.Tensor, emb: torch.Tensor, ctx: ForwardContext,
               labels: torch.Tensor) -> list[torch.Tensor]:
    """Each depth's mean token loss; ``h`` is h^0, ``emb`` the unshifted input embeddings
    [B, S, d], ``labels`` the main labels [B, S] (``labels[i]`` = t_{i+1}). The head loss
    is ``model.head_loss(normed hidden, labels)`` (parallel code may replace it)."""
    out = []
    for k, module in enumerate(model.mtp, start=1):
        h, normed = module(h, shift_left(emb, k, 0.0), ctx)
        out.append(model.head_loss(normed, shift_left(labels, k, IGNORE_INDEX)))
    return out


def weighted_total(cfg: ModelConfig, losses: list[torch.Tensor]) -> torch.Tensor:
    """``lambda / D * sum_k loss_k`` (what is added to the main loss)."""
    return sum(losses) * (cfg.mtp_loss_weight / cfg.mtp_depth)

