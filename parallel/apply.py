"""Turn a single-device model into this rank's parallel model.

Order (as torchtitan): pipeline split -> tensor/sequence parallel -> activation
checkpointing -> torch.compile -> FSDP2/replicate.
"""

from __future__ import annotations

import torch
from torch import nn

from parallel.config import ParallelConfig
from parallel.runner import ParallelModel
from parallel.world import World


def apply_activation_checkpointing(model: nn.Module, mode: str, every: int) -> None:
    """Recompute sublayers in backward: all of them (``full``) or every n-th (``every_n``)."""
    if mode == "off":
        return
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for name, layer in list(model.layers.items()):
        if mode == "full" or int(name) % every == 0:
            model.layers[name] = checkpoint_wrapper(layer, preserve_rng_state=False)


def apply_compile(model: nn.Module) -> None:
    """Compile each sublayer separately (fast compiles, and composes with FSDP per block)."""
    for layer in model.layers.values():
        layer.compile(dynamic=False)  # in place: parameter names stay unprefixed


def parallelize(model: nn.Module, pcfg: ParallelConfig, world: World, *, ac: str = "off",
                ac_every: int = 2, compile: bool = False, z_loss: float = 0.0,
                fused_loss: bool = False, autocast_dtype: torch.dtype | None = None) -> ParallelModel:
    if world.world_size > 1:
        raise NotImplementedError("multi-process layouts are not wired yet")
    apply_activation_checkpointing(model, ac, ac_every)
    if compile:
        apply_compile(model)
    return ParallelModel([model], world, z_loss=z_loss, fused_loss=fused_loss,
                         autocast_dtype=autocast_dtype)
