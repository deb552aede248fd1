"""Tensor-parallel plan for MoE sublayers (kind ``moe``): token-wise, so the only tp
communication is one small all-reduce of routing statistics under sequence parallel.

The MoE mixer runs on the local stream (the full sequence, replicated over tp, or this
rank's sequence shard with sequence parallel). Its parameters are Replicate DTensors over tp
(experts: unless expert parallel already made them ``Shard(0)`` DTensors on the ep mesh)
so FSDP and the optimizer see one layout; during forward the mixer computes with their
local values. Without SP every tp rank computes the same thing (identical gradients); with
SP the gradients are partial sums over tp (``Partial``, reduced by FSDP or
``finalize_grads``; expert-parallel experts by ``reduce_expert_grads``), and the router's
Switch/z losses and load metrics use the counts summed over tp (``MoE.token_group_sum``), so
they are those of the whole sequence.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Replicate, distribute_tensor
from torch.distributed.tensor.parallel import parallelize_module

from parallel.tp import TPContext, TPPlan, _norms


def _local_params(mixer: nn.Module, ctx: TPContext) -> None:
    mesh = ctx.mesh
    owners = []  # (module, name) of every tp-replicated parameter under the mixer
    for mod in mixer.modules():
        for name, p in list(mod.named_parameters(recurse=False)):
            if isinstance(p, DTensor):  # expert parallel: already sharded over ep
                mixer.tp_partial_grads = ctx.sequence_parallel
                continue
            mod.register_parameter(name, nn.Parameter(
                distribute_tensor(p, mesh, [Replicate()], src_data_rank=None), p.requires_grad))
            owners.append((mod, name))
    grad_pl = (Partial(),) if ctx.sequence_parallel else (Replicate(),)

    def pre(module, args):
        # a plain tensor in the instance __dict__ shadows the registered (DTensor) parameter
        for mod, name in owners:
            mod.__dict__[name] = mod._parameters[name].to_local(grad_placements=grad_pl)

    def post(module, args, out):
        for mod, name in owners:
            mod.__dict__.pop(name, None)
        return out

    mixer.register_forward_pre_hook(pre)
    mixer.register_forward_hook(post)


def _tp_sum(group, t: torch.Tensor) -> torch.Tensor:
    return funcol.wait_tensor(funcol.all_reduce(t, "sum", group))


def _moe_plan(sub: nn.Module, ctx: TPContext) -> None:
    parallelize_module(sub, ctx.mesh, _norms(sub, ctx))
    _local_params(sub.mixer, ctx)
    if ctx.sequence_parallel:  # aux losses and load metrics over the whole sequence
        sub.mixer.token_group_sum = partial(_tp_sum, ctx.mesh.get_group())


PLAN = TPPlan(_moe_plan, ladder_deferrable=False)
