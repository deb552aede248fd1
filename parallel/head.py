"""Model entry/exit adapters applied from outside: how a (part of a) model is called.

- :func:`accept_stage_inputs` lets every model part be called as ``part(x[, pending], doc_ids=...,
  labels=...)``: a pipeline stage receives ``(stream, pending)`` positionally in ladder
  mode, and the loss head needs the labels.
- :class:`FusedLossHead` turns the LM head into head + loss (``train.fused_loss``), so
  the loss runs inside the head's forward: FSDP unshards the weight there, and under
  tensor parallelism the vocab-parallel chunked loss never builds full logits.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Replicate

import kernels


class FusedLossHead(nn.Linear):
    """An ``nn.Linear`` LM head whose forward returns the mean token loss of its input
    (shape [1], so a pipeline schedule can merge it over micro-batches)."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        labels = self.__dict__.pop("_labels", None)
        if labels is None:
            raise RuntimeError("fused loss head called without labels (call the model with labels=...)")
        w, group, reduce_hidden_grad = self.weight, None, True
        if isinstance(w, DTensor):  # vocab shard over tp
            group = w.device_mesh.get_group()
            w = w.to_local()
        if isinstance(h, DTensor):  # sequence-parallel stream: gather it; the hidden-state
            # gradient is then a partial sum, reduce-scattered by DTensor in backward
            h = h.redistribute(placements=[Replicate()]).to_local(grad_placements=[Partial()])
            reduce_hidden_grad = False
        loss = kernels.linear_cross_entropy(h, w, labels, z_loss=self.z_loss, process_group=group,
                                            reduce_hidden_grad=reduce_hidden_grad)
        return loss.reshape(1)


def make_fused_head(model: nn.Module, z_loss: float) -> None:
    """Swap ``model.output`` (if present) for a :class:`FusedLossHead`; parameter names stay."""
    if model.output is not None:
        model.output.__class__ = FusedLossHead
        model.output.z_loss = z_loss


def _route(module: nn.Module, args: tuple, kwargs: dict):
    from parallel.mtp import route_mtp

    args, kwargs = route_mtp(module, args, kwargs)  # MTP: the input embeddings from stage 0
    labels = kwargs.pop("labels", None)
    if labels is not None and isinstance(module.output, FusedLossHead):
        module.output._labels = labels
    if len(args) == 2 and "pending" not in kwargs:  # (stream, pending) from the previous stage
        kwargs["pending"] = args[1]
        args = args[:1]
    return args, kwargs


def accept_stage_inputs(model: nn.Module) -> None:
    """Accept ``labels=`` and a positional ladder ``pending`` on ``model`` (a forward pre-hook)."""
    model.register_forward_pre_hook(_route, with_kwargs=True)
