"""Materialise a meta-device model after parallelism is applied, with layout-independent values.

Every parameter's full initial value comes from ``models.transformer.init_tensor`` (a
function of the run seed and the parameter's name), and each rank keeps its shard of
it, so every layout starts from exactly the same weights.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from models.transformer import init_tensor

# name components added by wrappers (activation checkpointing, torch.compile, FSDP1)
_WRAPPER_PARTS = ("_checkpoint_wrapped_module", "_orig_mod", "_fsdp_wrapped_module")


def canonical_name(name: str) -> str:
    """The parameter's name in the unwrapped model (what checkpoints and init use)."""
    return ".".join(p for p in name.split(".") if p not in _WRAPPER_PARTS)


def local_shard(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``full`` laid out as ``like`` (a DTensor or a plain tensor)."""
    if not isinstance(like, DTensor):
        return full
    # src_data_rank=None: every rank holds the same full tensor, so slicing needs no comm
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None).to_local()


def is_meta(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


@torch.no_grad()
def materialize(model: nn.Module, device: torch.device, seed: int) -> None:
    """``to_empty`` on ``device`` then fill every parameter from ``init_tensor``."""
    model.to_empty(device=device)
    if hasattr(model, "tie_weights") and not _wrapped(model):
        model.tie_weights()  # to_empty unties shared parameters
    for name, p in model.named_parameters():
        full = init_tensor(model, canonical_name(name), tuple(p.shape), seed)
        local = p.to_local() if isinstance(p, DTensor) else p
        local.copy_(local_shard(full.to(device=device, dtype=p.dtype), p))
    for m in model.modules():
        if hasattr(m, "reset_buffers"):
            m.reset_buffers()


def _wrapped(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)
