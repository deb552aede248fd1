"""The forward/backward of one optimizer step, and gradient clipping.

``ParallelModel`` is what the trainer sees: the model part(s) this rank holds and
how to run a step over micro-batches. Parallel layouts specialise it; the trainer
code is the same for every layout.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

import kernels
from parallel.world import World


def lm_loss(model: nn.Module, batch: dict, z_loss: float = 0.0, fused: bool = False) -> torch.Tensor:
    """Mean next-token cross-entropy of one micro-batch (+ MoE auxiliary losses)."""
    if fused:
        h = model.hidden_states(batch["input_ids"], batch.get("doc_ids"))
        loss = kernels.linear_cross_entropy(h.flatten(0, 1), model.output.weight,
                                            batch["labels"].flatten(), z_loss=z_loss)
    else:
        logits = model(batch["input_ids"], batch.get("doc_ids"))
        loss = kernels.cross_entropy(logits, batch["labels"], z_loss=z_loss)
    return loss + aux_losses(model)


def aux_losses(model: nn.Module) -> torch.Tensor | float:
    """Auxiliary losses the model's sublayers collected during forward (MoE routing)."""
    total = 0.0
    for m in model.modules():
        aux = getattr(m, "aux_loss", None)
        if isinstance(aux, torch.Tensor):
            total = total + aux
    return total


class ParallelModel:
    """One process, one model part: plain gradient accumulation."""

    def __init__(self, parts: list[nn.Module], world: World, *, z_loss: float = 0.0,
                 fused_loss: bool = False, autocast_dtype: torch.dtype | None = None):
        self.parts = parts
        self.world = world
        self.z_loss = z_loss
        self.fused_loss = fused_loss
        self.autocast_dtype = autocast_dtype

    @property
    def model(self) -> nn.Module:
        return self.parts[0]

    def autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.world.device.type, dtype=self.autocast_dtype)

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.world.device, non_blocking=True) for k, v in batch.items()}

    def forward_backward(self, micro_batches: list[dict]) -> torch.Tensor:
        """Accumulate gradients over ``micro_batches``; returns the mean loss (detached)."""
        n = len(micro_batches)
        total = torch.zeros((), device=self.world.device)
        for mb in micro_batches:
            mb = self._to_device(mb)
            with self.autocast():
                loss = lm_loss(self.model, mb, self.z_loss, self.fused_loss)
            (loss / n).backward()
            total += loss.detach().float() / n
        return total

    @torch.no_grad()
    def eval_loss(self, batch: dict) -> tuple[torch.Tensor, int]:
        """Summed token loss and token count of one batch (no auxiliary losses)."""
        batch = self._to_device(batch)
        with self.autocast():
            logits = self.model(batch["input_ids"], batch.get("doc_ids"))
        loss = kernels.cross_entropy(logits, batch["labels"])
        n = batch["labels"].numel()
        return loss.float() * n, n

    def reduce_loss(self, loss: torch.Tensor) -> float:
        """The step's loss as every rank should report it (mean over data-parallel ranks)."""
        return float(loss)

    def after_optimizer_step(self) -> None:
        """Hooks that run after each optimizer step (e.g. MoE bias balancing)."""
        for part in self.parts:
            for m in part.modules():
                if hasattr(m, "pop_load") and hasattr(m, "update_bias"):
                    load = m.pop_load()
                    if load is not None:
                        m.update_bias(load)

    def step_metrics(self) -> dict:
        """Extra per-step metrics from the model (e.g. MoE expert load)."""
        try:
            from models.moe import moe_metrics
        except ImportError:
            return {}
        out = {}
        for part in self.parts:
            out.update(moe_metrics(part))
        return out

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        params = [p for part in self.parts for p in part.parameters() if p.grad is not None]
        if max_norm > 0:
            return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        return torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)

    def train(self, mode: bool = True) -> None:
        for p in self.parts:
            p.train(mode)
