"""``pretrain plan --dry-run``: build the model on the meta device under a fake process group
of the target world size, apply the real tensor-parallel and FSDP code of ``parallel/``,
and count each pp rank's local parameter shards exactly (no memory is allocated)."""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.distributed as dist

from pretrain.config import Config
from pretrain.errors import UserError


@contextmanager
def fake_world(world_size: int):
    """A ``fake``-backend default process group of ``world_size`` ranks (this process is rank 0)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise UserError("--dry-run: a process group is already initialised in this process")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _local_numel(module: torch.nn.Module) -> int:
    from torch.distributed.tensor import DTensor

    seen, n = set(), 0
    for p in module.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n += p.to_local().numel() if isinstance(p, DTensor) else p.numel()
    return n


def dry_run(cfg: Config, world_size: int) -> list[dict]:
    """Per pp rank: ``{"pp_rank", "stages", "params"}`` (parameter elements on tp rank 0 /
    dp rank 0, the largest shards). Raises UserError naming what does not divide."""
    from models.transformer import build_model
    from parallel.expert_parallel import apply_ep, expert_fsdp_options
    from parallel.fsdp import apply_data_parallel
    from parallel.tp import TPContext
    from parallel.tp_plans import apply_tp
    from parallel.world import build_world
    from pretrain.layout_check import check_run

    check_run(cfg, world_size)  # the trainer's own verdict, before the (fake) process group
    pcfg = cfg.parallel
    deepspeed = pcfg.dp_engine == "deepspeed"  # ZeRO-1/2/3 partition flat buffers; modules keep full parameters
    with fake_world(world_size):
        world = build_world(pcfg, 0, world_size, 0, torch.device("cpu"))
        model = build_model(cfg.model, init=False)
        out = []
        for pp_rank, parts in enumerate(_stage_parts(model, pcfg, world)):
            n = 0
            for stage, part in parts:
                # the same sharding calls parallel.parallelize makes, without materialising
                if world.ep_size > 1:
                    apply_ep(part, world)
                if world.tp_size > 1:
                    apply_tp(part, TPContext(world.mesh["tp"], part.cfg, pcfg.sequence_parallel))
                if world.dp_size * world.cp_size > 1 and not deepspeed:
                    apply_data_parallel(part, world, pcfg, **expert_fsdp_options(part, world))
                n += _local_numel(part)
            out.append({"pp_rank": pp_rank, "stages": [s for s, _ in parts], "params": n})
        return out


def _stage_parts(model, pcfg, world) -> list[list[tuple[int, torch.nn.Module]]]:
    """Every pp rank's stage copies of the meta model, cut as the trainer cuts them."""
    if world.pp_size == 1:
        return [[(0, model)]]
    from parallel.pipeline import build_stage_model, param_costs, split_stages, stage_rank, stages_per_rank

    n_stages = world.pp_size * stages_per_rank(pcfg)
    costs, embed, head = param_costs(model)
    stages = split_stages(model.cfg, n_stages, list(costs), embed, head)
    out: list[list] = [[] for _ in range(world.pp_size)]
    for s in range(n_stages):
        r = stage_rank(s, n_stages, world.pp_size, pcfg.pp_schedule)
        out[r].append((s, build_stage_model(model, stages[s], s == 0, s == n_stages - 1)))
    return out
