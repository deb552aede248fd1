"""Expert parallelism: MoE experts sharded over an ``ep`` group carved out of ``dp_shard``.

Layout (as torchtitan): ``dp_shard = edp x ep``; the data-parallel batch split is
unchanged (every dp rank still reads its own rows). In each MoE sublayer the expert
weights ``[E, ...]`` become DTensors ``Shard(0)`` on the 1-D ``ep`` mesh, so rank ``r`` of
the ep group holds experts ``[r E/ep, (r+1) E/ep)``. Routed rows travel with
:class:`AllToAllExpertComm` (per-expert counts exchanged first, then the rows, both
``all_to_all_single``; the row exchange is autograd-aware), on gloo and NCCL alike.

Data parallelism of the expert weights: the dense FSDP units do not manage them (they are
hidden from ``fully_shard``); instead :func:`reduce_expert_grads` sums their gradients over
the ranks that hold the same experts and see different tokens (``edp`` and
``dp_replicate``) and divides by the data-parallel size, once per optimizer step.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from models.config import ConfigError

EXPERT_PARAMS = ("w_gate", "w_up", "w_down")


def moe_modules(model: nn.Module) -> list[nn.Module]:
    from models.moe import MoE

    return [m for m in model.modules() if isinstance(m, MoE)]


def check_ep(cfg, ep: int) -> None:
    """Reject a model whose experts cannot be split ``ep`` ways (ConfigError naming the key)."""
    if ep == 1 or cfg.moe is None or "moe" not in cfg.sublayer_kinds:
        return
    if cfg.moe.n_experts % ep:
        raise ConfigError(f"parallel.ep: {ep} does not divide model.moe.n_experts={cfg.moe.n_experts}")


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


@contextmanager
def hidden_expert_params(model: nn.Module, world):
    """Under expert parallel, detach the expert weights from their modules while data
    parallelism wraps ``model``, so the dense FSDP units neither manage nor reduce them (they
    are reduced by :func:`reduce_expert_grads`). No-op without expert parallel."""
    saved = []
    for m in moe_modules(model) if world.ep_size > 1 else ():
        for n in EXPERT_PARAMS:
            if isinstance(getattr(m, n), DTensor):
                saved.append((m, n, m._parameters.pop(n)))
    try:
        yield
    finally:
        for m, n, p in saved:
            m._parameters[n] = p


@torch.no_grad()
def reduce_expert_grads(parts: list[nn.Module], world) -> None:
    """Average the expert gradients over data parallelism: sum over the ranks holding the same
    experts (edp, dp_replicate), then divide by ``dp_size`` (the ep all-to-all already summed
    the contributions of the ep group's tokens into each expert's gradient)."""
    if getattr(world, "ep_mesh", None) is None:
        return
    params = [p for part in parts for p in expert_params(part) if p.requires_grad]
    for p in params:  # experts that got no rows this step: every rank must join the reduction
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad.to_local() for p in params]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    for dim in ("dp_replicate", "edp"):
        if world.ep_mesh[dim].size() > 1:
            dist.all_reduce(flat, group=world.ep_mesh[dim].get_group())
    if world.tp_size > 1 and any(getattr(m, "tp_partial_grads", False) for part in parts
                                 for m in moe_modules(part)):
        # sequence parallel: tp ranks routed different tokens (see parallel/tp_moe.py)
        dist.all_reduce(flat, group=world.ep_mesh["tp"].get_group())
    flat /= world.dp_size
    for g, v in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(v.view_as(g))


def all_to_all_bytes(model: nn.Module) -> int:
    """Bytes this rank sent to other ranks in the last forward's expert all-to-alls (token
    rows, dispatch + combine; backward sends the same again; the count exchange is excluded)."""
    return sum(getattr(m.ep_comm, "last_bytes", 0) for m in moe_modules(model))
