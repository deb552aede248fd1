"""The language model: embedding, a stack of residual sublayers, final norm, LM head.

How sublayer outputs join the stream is the stack's residual mode (see
``ARCHITECTURE.md``): ``standard``, ``ladder`` or ``parallel``.

Seams for ``parallel/`` (no-ops on one device):
- ``layers`` is a ``ModuleDict`` keyed by the global sublayer index, so a pipeline
  stage that deletes other layers keeps checkpoint names stable; ``tok_embeddings``,
  ``norm`` and ``output`` may be set to ``None`` on middle/last stages.
- ``Sublayer.forward`` returns the sublayer's output *before* it joins the stream,
  so a row-parallel reduction may be left pending until ``join`` uses it.
- ``stream_shards``: the stream holds ``1/stream_shards`` of each sequence's positions
  (sequence and context parallel split it), so ``make_context`` builds RoPE tables for
  the full length; ``context_hooks`` (``hook(ctx, seq_len, doc_ids) -> ctx``, in order)
  give each forward's ``ForwardContext`` its parallel fields.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

import kernels
from models import kinds
from models.config import ModelConfig
from models.layers import ForwardContext, RMSNorm, rope_tables


class Sublayer(nn.Module):
    """One residual sublayer: input norm, mixer, and (Peri-LN) output norm."""

    def __init__(self, kind: str, cfg: ModelConfig):
        super().__init__()
        record = kinds.kind(kind)
        self.kind = kind
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = record.factory(cfg)
        self.out_norm = RMSNorm(cfg.d_model, cfg.norm_eps) if cfg.norm == "peri" else None

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        h = self.mixer(self.norm(x), ctx)
        if self.out_norm is not None:
            h = self.out_norm(h)
        return h


def join(stream: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Add a sublayer's output to the residual stream (where a pending collective is waited)."""
    return stream + out


class LanguageModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleDict(
            {str(i): Sublayer(kind, cfg) for i, kind in enumerate(cfg.sublayer_kinds)})
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.output = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.mtp = None  # multi-token prediction modules (models/mtp.py), on the last stage
        self.mtp_loss = None  # their weighted loss from the last forward given mtp_labels
        self.mtp_depth_losses: list[torch.Tensor] = []  # (detached, per depth)
        if cfg.mtp_depth:
            from models.mtp import build_mtp

            self.mtp = build_mtp(cfg)
        self.tie_weights()
        self.stream_shards = 1
        self.context_hooks: list[Callable] = []

    def tie_weights(self) -> None:
        """Share the embedding with the LM head (re-run after ``to_empty``, which unties)."""
        if self.cfg.tie_embeddings and self.output is not None and self.tok_embeddings is not None:
            self.output.weight = self.tok_embeddings.weight

    # ---- forward ----------------------------------------------------------------
    def make_context(self, seq_len: int, device, doc_ids: torch.Tensor | None) -> ForwardContext:
        """The forward's ForwardContext for a stream of ``seq_len`` local positions."""
        seq_len *= self.stream_shards
        rope = None
        kinds_here = [l.kind for l in self.layers.values()] + (self.cfg.mtp_kinds if self.mtp is not None else [])
        if self.cfg.position == "rope" and any(kinds.KINDS[k].uses_rope for k in kinds_here):
            rope = rope_tables(self.cfg.rope_dim, seq_len, self.cfg.rope_theta, device,
                               scaling=self.cfg.rope_scaling, max_seq_len=self.cfg.max_seq_len)
        ctx = ForwardContext(rope=rope, doc_ids=doc_ids)
        for hook in self.context_hooks:
            ctx = hook(ctx, seq_len, doc_ids)
        return ctx

    def forward(self, x: torch.Tensor, doc_ids: torch.Tensor | None = None,
                pending: torch.Tensor | None = None, mtp_labels: torch.Tensor | None = None,
                mtp_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens [B, S] (or hidden [B, S, D] on a later pipeline stage) -> logits
        (or the final hidden stream when this stage has no head).

        ``pending`` is a ladder-mode output not yet added (it crosses stage boundaries);
        with ladder and no head, the stage returns ``(stream, pending)``.
        With ``mtp_depth`` > 0: given ``mtp_labels`` (the main labels) with gradients on, the
        forward also sets ``self.mtp_loss``; a stage without the head appends the input
        embeddings (``mtp_embeds`` on a later stage) to its outputs for the last stage.
        """
        h = self.tok_embeddings(x) if self.tok_embeddings is not None else x
        emb = h if self.tok_embeddings is not None else mtp_embeds
        ctx = self.make_context(h.shape[1], h.device, doc_ids)
        h, pending = self.run_stack(h, ctx, pending)
        if self.output is None:
            out = h if pending is None else (h, pending)
            if self.cfg.mtp_depth:
                out = (*(out if isinstance(out, tuple) else (out,)), emb)
            return out
        if pending is not None:
            h = join(h, pending)
        logits = self.output(self.norm(h))
        if self.mtp is not None:  # after the main head (a fused head consumes its labels first)
            self.mtp_loss = None
            if mtp_labels is not None and torch.is_grad_enabled():
                from models.mtp import mtp_losses, weighted_total

                losses = mtp_losses(self, h, emb, ctx, mtp_labels)
                self.mtp_loss = weighted_total(self.cfg, losses)
                self.mtp_depth_losses = [l.detach().float() for l in losses]
        return logits

    def head_loss(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean token loss of the LM head on final-normed ``h`` (the MTP depths' loss;
        parallel code replaces it for vocab-sharded or fused heads)."""
        return kernels.cross_entropy(self.output(h), labels)

    def hidden_states(self, tokens: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Final-normed hidden states [B, S, D] (for a fused LM-head loss)."""
        h = self.tok_embeddings(tokens)
        h, pending = self.run_stack(h, self.make_context(h.shape[1], h.device, doc_ids), None)
        if pending is not None:
            h = join(h, pending)
        return self.norm(h)

    def run_stack(self, h: torch.Tensor, ctx: ForwardContext, pending: torch.Tensor | None):
        mode = self.cfg.residual
        items = list(self.layers.items())
        i = 0
        while i < len(items):
            idx, layer = int(items[i][0]), items[i][1]
            if mode == "parallel" and i + 1 < len(items) and layer.kind == "attention" \
                    and items[i + 1][1].kind == "mlp":
                # PaLM: attention and MLP of a block read the same input.
                a = layer(h, ctx)
                m = items[i + 1][1](h, ctx)
                h = join(join(h, a), m)
                i += 2
                continue
            if mode == "ladder" and idx >= self.cfg.ladder_from:
                # Sublayer k reads the stream without sublayer k-1's (pending) output.
                if ctx.grad_seam is not None:  # marks where a deferred input gradient is added
                    h, pending = ctx.grad_seam.before_sublayer(idx, h, pending)
                out = layer(h, ctx)
                if pending is not None:
                    h = join(h, pending)
                pending = out
            else:
                if pending is not None:
                    h = join(h, pending)
                    pending = None
                h = join(h, layer(h, ctx))
            i += 1
        return h, pending

    # ---- initialisation ---------------------------------------------------------
    def init_weights(self, seed: int = 0) -> None:
        """Initialise every parameter deterministically from (seed, parameter name),
        so the values do not depend on how the model is later sharded."""
        with torch.no_grad():
            for name, p in self.named_parameters():
                full = init_tensor(self, name, tuple(p.shape), seed)
                p.copy_(full.to(p.dtype))
        for m in self.modules():
            if hasattr(m, "reset_buffers"):
                m.reset_buffers()

    def num_params(self, exclude_embedding: bool = False) -> int:
        """Every parameter, the multi-token-prediction modules included."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embedding and self.tok_embeddings is not None:
            n -= self.tok_embeddings.weight.numel()
        return n


OUTPUT_PROJECTIONS = ("wo", "w_down", "out_proj")


def init_tensor(model: nn.Module, name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The full (unsharded) initial value of parameter ``name``.

    Mixers may define ``init_param(local_name, shape, generator)`` returning a tensor,
    or ``None`` to fall back to the default: ones for norms, zeros for biases,
    normal(0, init_std) for weights, depth-scaled for output projections.
    """
    cfg: ModelConfig = model.cfg
    gen = torch.Generator().manual_seed((seed * 1_000_003 + _stable_hash(name)) % (2**63))
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if hasattr(owner, "init_param"):
        t = owner.init_param(leaf, shape, gen)
        if t is not None:
            return t
    if isinstance(owner, RMSNorm) or leaf in ("norm_weight",):
        return torch.ones(shape)
    if leaf == "bias":
        return torch.zeros(shape)
    std = cfg.init_std
    if cfg.depth_scaled_init and owner_name.rsplit(".", 1)[-1] in OUTPUT_PROJECTIONS:
        std = std / math.sqrt(max(cfg.n_sublayers, 1))  # Megatron: std/sqrt(2*blocks)
    return torch.randn(shape, generator=gen) * std


def _stable_hash(s: str) -> int:
    h = 1469598103934665603
    for ch in s.encode():
        h = ((h ^ ch) * 1099511628211) % (2**64)
    return h


def build_model(cfg: ModelConfig, device: str | torch.device = "cpu", seed: int = 0,
                init: bool = True) -> LanguageModel:
    """Build on the meta device, then materialise on ``device`` (no double allocation)."""
    with torch.device("meta"):
        model = LanguageModel(cfg)
    if not init:
        return model
    model.to_empty(device=device)
    model.tie_weights()
    model.init_weights(seed)
    return model
