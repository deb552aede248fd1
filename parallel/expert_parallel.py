"""Expert parallelism: MoE experts sharded over an ``ep`` group carved out of ``dp_shard``.

Layout (as torchtitan): ``dp_shard = edp x ep``; the data-parallel batch split is
unchanged (every dp rank still reads its own rows). In each MoE sublayer the expert
weights ``[E, ...]`` become DTensors ``Shard(0)`` on the 1-D ``ep`` mesh, so rank ``r`` of
the ep group holds experts ``[r E/ep, (r+1) E/ep)``. Routed rows travel with
:class:`AllToAllExpertComm` (per-expert counts exchanged first, then the rows, both
``all_to_all_single``; the row exchange is autograd-aware), on gloo and NCCL alike.

Data parallelism of the expert weights: FSDP2 shards them further over the ranks that hold
the same experts and read different rows (``edp``, HSDP with ``dp_replicate``), through the
per-parameter mesh of ``fully_shard``'s ``shard_placement_fn`` (:func:`expert_fsdp_options`):
they join their sublayer's FSDP unit as a second parameter group, all-gathered and
reduce-scattered over ``edp`` while the dense parameters use ``dp``. A rank thus keeps
``E / (ep * edp)`` experts' weights, gradients and optimizer state, and the gradient-sync
switches the runner flips for dense FSDP (no reduction before the last micro-batch, pipeline
schedules) and mixed precision apply to the experts too (with ``dp_shard == ep`` the expert
mesh has one rank: nothing is sharded). :func:`reduce_expert_grads` then does the
rest once per step: the tp sum under sequence parallel, and the ``1/ep`` factor FSDP's
average over ``edp x dp_replicate`` leaves out (the all-to-all already summed the ep
group's tokens into each expert's gradient).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from models.config import UserError

EXPERT_PARAMS = ("w_gate", "w_up", "w_down")


def moe_modules(model: nn.Module) -> list[nn.Module]:
    from models.moe import MoE

    return [m for m in model.modules() if isinstance(m, MoE)]


def check_ep(cfg, ep: int) -> None:
    """Reject a model whose experts cannot be split ``ep`` ways (UserError naming the key)."""
    if ep == 1 or cfg.moe is None or "moe" not in cfg.sublayer_kinds:
        return
    if cfg.moe.n_experts % ep:
        raise UserError(f"parallel.ep: {ep} does not divide model.moe.n_experts={cfg.moe.n_experts}")


class AllToAllExpertComm:
    """Expert-parallel ``ep_comm`` for ``models.moe.MoE`` (contract: ``LocalExpertComm``).

    ``dispatch``: counts per (source rank, local expert) are exchanged with one
    ``all_to_all_single`` of the ``[E]`` count vector, then the rows (uneven splits), which
    arrive grouped by source rank and are regrouped by local expert. ``combine`` undoes both.
    """

    def __init__(self, group, ep: int, n_experts: int):
        self.group, self.ep = group, ep
        self.rank = dist.get_rank(group)
        self.n_local = n_experts // ep
        self.last_bytes = 0  # bytes this rank sent to other ranks in the last dispatch+combine

    def _rows(self, x: torch.Tensor, out_splits: list[int], in_splits: list[int]) -> torch.Tensor:
        y = funcol.all_to_all_single_autograd(x.contiguous(), out_splits, in_splits, self.group)
        return funcol.wait_tensor(y)

    def dispatch(self, tokens_sorted: torch.Tensor, counts_per_expert: torch.Tensor):
        ep, nl = self.ep, self.n_local
        counts = counts_per_expert.to(torch.int64)
        recv = torch.empty_like(counts)
        dist.all_to_all_single(recv, counts, group=self.group)  # [ep * nl]: source-major
        recv = recv.view(ep, nl)
        in_splits = counts.view(ep, nl).sum(1).tolist()
        out_splits = recv.sum(1).tolist()
        rows = self._rows(tokens_sorted, out_splits, in_splits)
        # rows arrive (source rank, local expert)-major; regroup by local expert (stable)
        expert_of_row = torch.arange(nl, device=rows.device).repeat(ep)
        expert_of_row = expert_of_row.repeat_interleave(recv.reshape(-1).to(rows.device))
        order = torch.argsort(expert_of_row, stable=True)
        self.last_bytes = (sum(in_splits) - in_splits[self.rank]) * tokens_sorted.shape[-1] * tokens_sorted.element_size()
        return rows.index_select(0, order), recv.sum(0), (order, in_splits, out_splits)

    def combine(self, out: torch.Tensor, ctx) -> torch.Tensor:
        order, in_splits, out_splits = ctx
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        rows = out.index_select(0, inverse)
        self.last_bytes += (sum(out_splits) - out_splits[self.rank]) * out.shape[-1] * out.element_size()
        return self._rows(rows, in_splits, out_splits)


def apply_ep(model: nn.Module, world) -> None:
    """Shard the experts of every MoE sublayer of ``model`` (meta, before TP/FSDP) over ep."""
    mesh = world.ep_mesh["ep"]
    ep, rank = mesh.size(), mesh.get_local_rank()
    group = mesh.get_group()
    for moe in moe_modules(model):
        nl = moe.n_experts // ep
        moe.local_experts = range(rank * nl, (rank + 1) * nl)
        moe.ep_comm = AllToAllExpertComm(group, ep, moe.n_experts)
        for name in EXPERT_PARAMS:
            p = getattr(moe, name)
            moe.register_parameter(name, nn.Parameter(
                distribute_tensor(p, mesh, [Shard(0)], src_data_rank=None), p.requires_grad))


def expert_params(model: nn.Module) -> list[nn.Parameter]:
    return [getattr(m, n) for m in moe_modules(model) for n in EXPERT_PARAMS
            if isinstance(getattr(m, n), DTensor)]


def expert_fsdp_options(model: nn.Module, world) -> dict:
    """Extra ``fully_shard`` keyword arguments for the sublayers of ``model`` under expert
    parallel: a ``shard_placement_fn`` putting the expert weights on the expert-data-parallel
    mesh (``edp``, or ``(dp_replicate, edp)`` as HSDP). With ``dp_shard == ep`` that mesh has
    one rank: nothing is sharded, but FSDP still applies mixed precision and the gradient-sync
    switches to the experts as to the dense parameters. ``{}`` without expert parallel."""
    params = expert_params(model) if world.ep_size > 1 else []
    if not params:
        return {}
    mesh = world.ep_mesh
    try:  # torch >= 2.14: per-parameter meshes in one FSDP unit (made for MoE experts)
        from torch.distributed.fsdp._fully_shard._fsdp_common import (
            FSDPMeshInfo,
            HSDPMeshInfo,
            ShardPlacementResult,
        )
    except ImportError as e:
        raise UserError("parallel.ep: sharding experts over parallel.dp_shard/ep > 1 needs torch "
                          ">= 2.14 (per-parameter FSDP meshes)") from e
    if mesh["dp_replicate"].size() > 1:
        info = HSDPMeshInfo(mesh["dp_replicate", "edp"], shard_mesh_dim=1, replicate_mesh_dim=0)
    else:
        info = FSDPMeshInfo(mesh["edp"], shard_mesh_dim=0)
    # one result object for every expert weight: FSDP groups parameters by mesh info identity
    result = ShardPlacementResult(placement=Shard(0), mesh_info=info)
    ids = {id(p) for p in params}
    return {"shard_placement_fn": lambda p: result if id(p) in ids else None}


@torch.no_grad()
def reduce_expert_grads(parts: list[nn.Module], world) -> None:
    """Finish the expert gradients after the step's backward (FSDP, or nothing, has reduced
    them over ``edp x dp_replicate``, averaging): sum the partial tp gradients under sequence
    parallel, and divide by ``ep`` so the result is the mean over all ``dp_size`` ranks."""
    if getattr(world, "ep_mesh", None) is None:
        return
    params = [p for part in parts for p in expert_params(part) if p.requires_grad]
    for p in params:  # every rank sums (under SP) and clips the same tensors
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad.to_local() for p in params]
    if not grads:
        return
    if world.tp_size > 1 and any(getattr(m, "tp_partial_grads", False) for part in parts
                                 for m in moe_modules(part)):
        # sequence parallel: tp ranks routed different tokens (see parallel/tp_moe.py)
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=world.ep_mesh["tp"].get_group())
        for g, v in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(v.view_as(g))
    torch._foreach_mul_(grads, 1.0 / world.ep_size)


def expert_numel(model: nn.Module) -> tuple[int, int]:
    """``(held by this rank, total)`` elements of the routed experts' weights."""
    local = total = 0
    for m in moe_modules(model):
        for n in EXPERT_PARAMS:
            p = getattr(m, n)
            local += (p.to_local() if isinstance(p, DTensor) else p).numel()
            total += p.numel()
    return local, total


def all_to_all_bytes(model: nn.Module) -> int:
    """Bytes this rank sent to other ranks in the last forward's expert all-to-alls (token
    rows, dispatch + combine; backward sends the same again; the count exchange is excluded)."""
    return sum(getattr(m.ep_comm, "last_bytes", 0) for m in moe_modules(model))
