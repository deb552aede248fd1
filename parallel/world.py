"""Process group and device mesh set-up.

Single-process runs need no process group; under torchrun (WORLD_SIZE > 1) the
default group is created with gloo on CPU and NCCL on GPU, and one ``DeviceMesh``
with named dims ``pp, dp_replicate, dp_shard, cp, tp`` describes the layout.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from models.errors import UserError
from parallel.config import ParallelConfig

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
EP_MESH_DIMS = ("pp", "dp_replicate", "edp", "ep", "tp")  # dp_shard split as (edp, ep)


@dataclass
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    mesh: object | None = None  # torch.distributed.DeviceMesh with dims MESH_DIMS
    dp_rank: int = 0  # flattened (dp_replicate, dp_shard) coordinate: which slice of the batch
    dp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    tp_rank: int = 0
    tp_size: int = 1
    dp_replicate: int = 1
    dp_shard: int = 1
    cp_size: int = 1
    cp_rank: int = 0
    # expert parallel (parallel/expert_parallel.py): dp_shard = edp x ep; ep_mesh has dims
    # EP_MESH_DIMS over the same ranks as ``mesh``
    ep_size: int = 1
    ep_mesh: object | None = None

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


def pick_backend(pcfg: ParallelConfig) -> str:
    if pcfg.backend != "auto":
        return pcfg.backend
    return "nccl" if torch.cuda.is_available() else "gloo"


def resolve_layout(pcfg: ParallelConfig, world_size: int) -> dict[str, int]:
    """Sizes of the mesh dims for ``world_size`` processes (``dp_shard=-1``: the rest).

    Raises UserError naming the offending ``parallel.*`` key. Each field's own range and
    choices are its declaration's (``Config.validate``, part of ``pretrain.layout_check``).
    """
    if world_size % pcfg.cp:
        raise UserError(f"parallel.cp: {pcfg.cp} does not divide the world size {world_size}")
    fixed = pcfg.pp * pcfg.dp_replicate * pcfg.cp * pcfg.tp
    shard = pcfg.dp_shard
    if shard == -1:
        if world_size % fixed:
            raise UserError(f"parallel: pp*dp_replicate*cp*tp = {pcfg.pp}*{pcfg.dp_replicate}*{pcfg.cp}*"
                            f"{pcfg.tp} = {fixed} does not divide the world size {world_size}")
        shard = world_size // fixed
    if fixed * shard != world_size:
        raise UserError(f"parallel: pp*dp_replicate*dp_shard*cp*tp = {pcfg.pp}*{pcfg.dp_replicate}*"
                        f"{shard}*{pcfg.cp}*{pcfg.tp} = {fixed * shard} does not match the world "
                        f"size {world_size} (set parallel.dp_shard=-1 to fill the rest)")
    if (shard * pcfg.cp) % pcfg.ep:  # expert parallel: ep is carved out of dp_shard x cp
        raise UserError(f"parallel.ep: {pcfg.ep} does not divide parallel.dp_shard*cp = {shard}*{pcfg.cp}")
    return {"pp": pcfg.pp, "dp_replicate": pcfg.dp_replicate, "dp_shard": shard, "cp": pcfg.cp,
            "tp": pcfg.tp}


def build_world(pcfg: ParallelConfig, rank: int, world_size: int, local_rank: int,
                device: torch.device) -> World:
    """The World (mesh and coordinates) for an already initialised default process group."""
    sizes = resolve_layout(pcfg, world_size)
    world = World(rank=rank, world_size=world_size, local_rank=local_rank, device=device,
                  pp_size=sizes["pp"], tp_size=sizes["tp"], dp_replicate=sizes["dp_replicate"],
                  dp_shard=sizes["dp_shard"], cp_size=sizes["cp"],
                  dp_size=sizes["dp_replicate"] * sizes["dp_shard"], ep_size=pcfg.ep)
    if world_size == 1:
        return world
    from torch.distributed.device_mesh import init_device_mesh

    from parallel.context_parallel import flatten_cp_dims

    world.mesh = init_device_mesh(device.type, tuple(sizes[d] for d in MESH_DIMS),
                                  mesh_dim_names=MESH_DIMS)
    coord = dict(zip(MESH_DIMS, world.mesh.get_coordinate()))
    world.pp_rank, world.tp_rank = coord["pp"], coord["tp"]
    # Ranks that differ only in tp/pp/cp read the same rows of the global batch.
    world.dp_rank = coord["dp_replicate"] * sizes["dp_shard"] + coord["dp_shard"]
    world.cp_rank = coord["cp"]
    flatten_cp_dims(world)  # dp_shard x cp as one FSDP dim (and cp x tp) when cp > 1
    if pcfg.ep > 1:
        # expert parallel: a second mesh over the same ranks with dp_shard x cp unflattened into
        # (edp, ep), row-major, so ep groups are consecutive (dp_shard, cp) coordinates
        ep_sizes = (sizes["pp"], sizes["dp_replicate"], sizes["dp_shard"] * sizes["cp"] // pcfg.ep, pcfg.ep,
                    sizes["tp"])
        world.ep_mesh = init_device_mesh(device.type, ep_sizes, mesh_dim_names=EP_MESH_DIMS)
    return world


def init_world(pcfg: ParallelConfig) -> World:
    """Create the default process group (if launched with WORLD_SIZE > 1) and return the World.

    The layout must have passed ``pretrain.layout_check.check_run`` (the trainer's one check,
    made before this creates the process group).
    """
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
    return build_world(pcfg, rank, world_size, local_rank, device)


def shutdown_world(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()
