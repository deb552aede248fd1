"""The engine that runs training (``parallel.dp_engine``): builds its runner."""

from __future__ import annotations

from torch import nn

from parallel.apply import parallelize
from parallel.config import ParallelConfig
from parallel.deepspeed_engine import deepspeed_parallelize
from parallel.runner import Runner
from parallel.world import World


def build_runner(model: nn.Module, pcfg: ParallelConfig, world: World, *, micro_batch: int,
                 accumulation: int, grad_clip: float, stage_costs=None, **options) -> Runner:
    """This rank's runner for ``model``: ``parallelize`` (FSDP2/TP/pipeline) or a DeepSpeed
    ZeRO engine, which is configured up front with the micro-batch size, accumulation steps
    and clipping norm of a step. ``options`` are ``parallelize``'s (activation checkpointing,
    compile, loss and precision options, seed)."""
    if pcfg.dp_engine == "deepspeed":
        return deepspeed_parallelize(model, pcfg, world, micro_batch=micro_batch, accumulation=accumulation,
                                     grad_clip=grad_clip, **options)
    return parallelize(model, pcfg, world, stage_costs=stage_costs, **options)
