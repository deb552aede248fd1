"""Parallelism applied from outside the model: mesh, FSDP2/HSDP, TP+SP, pipeline, experts."""

from parallel.apply import parallelize  # noqa: F401
from parallel.config import ParallelConfig  # noqa: F401
from parallel.runner import ParallelModel, lm_loss  # noqa: F401
from parallel.world import World, init_world, shutdown_world  # noqa: F401
