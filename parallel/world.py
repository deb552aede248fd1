"""Process group and device mesh set-up.

Single-process runs need no process group; under torchrun (WORLD_SIZE > 1) the
default group is created with gloo on CPU and NCCL on GPU.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from parallel.config import ParallelConfig


@dataclass
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    mesh: object | None = None  # torch.distributed.DeviceMesh with named dims
    dp_rank: int = 0
    dp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    tp_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce(self, t: torch.Tensor, op=dist.ReduceOp.SUM, group=None) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(t, op=op, group=group)
        return t

    def broadcast_object(self, obj):
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def pick_backend(pcfg: ParallelConfig) -> str:
    if pcfg.backend != "auto":
        return pcfg.backend
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_world(pcfg: ParallelConfig) -> World:
    """Create the default process group (if launched with WORLD_SIZE > 1) and return the World."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = pick_backend(pcfg)
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=pcfg.timeout_s))
    return World(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def shutdown_world(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()
