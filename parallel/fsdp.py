"""Data parallelism with FSDP2: fully sharded, hybrid (HSDP) or replicated (DDP semantics).

One FSDP unit per sublayer plus the root (embedding, final norm, head). With
``dp_shard=1`` the same per-sublayer units use torch's FSDP2-based ``replicate``.
Both accept DTensor (tensor-parallel) parameters and shard them further over dp.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from parallel.config import ParallelConfig
from parallel.mtp import fsdp_units


def mp_policy(pcfg: ParallelConfig) -> MixedPrecisionPolicy:
    """bf16 compute with fp32 gradient reduction, or plain fp32."""
    if pcfg.mixed_precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def apply_data_parallel(model: nn.Module, world, pcfg: ParallelConfig, **layer_kw) -> None:
    """Wrap ``model`` (a whole model or one pipeline stage) for data parallelism in place.
    ``layer_kw`` go to each sublayer's ``fully_shard`` (expert parallel: the experts' mesh)."""
    mesh = world.mesh
    mp = mp_policy(pcfg)
    if world.dp_shard * world.cp_size > 1:  # context parallel: shard over dp_shard x cp
        from parallel.context_parallel import fsdp_mesh

        dp_mesh = fsdp_mesh(world)
        for layer in [*model.layers.values(), *fsdp_units(model)]:
            fully_shard(layer, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=pcfg.reshard_after_forward,
                        **layer_kw)
        # the root keeps its parameters (embedding, head) gathered between forward and backward
        fully_shard(model, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=False)
    elif world.dp_replicate > 1:
        from torch.distributed._composable.replicate_with_fsdp import replicate

        dp_mesh = mesh["dp_replicate"]
        for layer in [*model.layers.values(), *fsdp_units(model)]:
            replicate(layer, mesh=dp_mesh, mp_policy=mp)
        replicate(model, mesh=dp_mesh, mp_policy=mp)


def set_gradient_sync(parts: list[nn.Module], sync: bool) -> None:
    """Whether the next backward reduces gradients over dp (False: accumulate locally)."""
    for part in parts:
        if isinstance(part, FSDPModule):
            part.set_requires_gradient_sync(sync)
