"""Tensor (+ sequence) parallel plan for Mamba-2 sublayers (kind ``mamba``).

Each tp rank holds ``H/tp`` whole heads and ``G/tp`` whole groups:
- ``z_proj``, ``x_proj``, ``dt_proj`` column-parallel (heads); ``B_proj``, ``C_proj``
  column-parallel (groups); ``conv_x``/``conv_B``/``conv_C`` sharded on their channel
  dim to match; ``dt_bias``, ``A_log``, ``D`` sharded by heads.
- the gated norm keeps its group size ``d_inner/G``; a rank's channels are whole groups,
  so it normalises locally with its slice of ``norm.weight`` (no collective).
- ``out_proj`` row-parallel, reduced by ``reduce_sublayer_output`` (all-reduce, or
  reduce-scatter along the sequence with SP), like attention's ``wo``.

The mixer reads every size from its weights at run time, so it runs unchanged on the
local shards. The parameters it uses directly (not through a linear) are DTensors for
FSDP, the optimizer and checkpoints; :func:`local_params_in_forward` hands the mixer
their local shards for the duration of its forward (differentiably, so gradients land
on the DTensor parameters with their own placement).
"""

from __future__ import annotations

from torch import nn
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

from models.config import ModelConfig, UserError
from models.mamba2 import mamba_heads
from parallel.tp import (
    TPContext,
    TPPlan,
    _mixer_input,
    _norms,
    sublayer_output,
)

HEAD_PROJ = ("z_proj", "x_proj", "dt_proj")
GROUP_PROJ = ("B_proj", "C_proj")
# (submodule path inside the Mamba mixer, parameter) sharded on dim 0, used directly
DIRECT_PARAMS = (("", "dt_bias"), ("", "A_log"), ("", "D"), ("norm", "weight"),
                 ("conv_x", "weight"), ("conv_x", "bias"), ("conv_B", "weight"), ("conv_B", "bias"),
                 ("conv_C", "weight"), ("conv_C", "bias"))


def check_mamba_split(n_heads: int, n_groups: int, tp: int, heads_key: str = "model.mamba") -> None:
    """Each tp rank must hold whole groups (and so whole heads): ``tp`` divides n_groups."""
    if n_groups % tp:
        raise UserError(f"model.mamba.n_groups: {n_groups} groups cannot be split over parallel.tp={tp} "
                          f"(each rank needs whole groups; use a tp that divides n_groups)")
    if n_heads % tp:  # implied by the groups dividing the heads; kept for a clear message
        raise UserError(f"parallel.tp: {tp} does not divide the {n_heads} Mamba heads ({heads_key})")


def _mamba_check(cfg: ModelConfig, tp: int) -> None:
    check_mamba_split(mamba_heads(cfg), cfg.mamba.n_groups, tp)


def mamba_inner_plan(prefix: str) -> dict:
    """Column-parallel in-projections of a Mamba mixer at ``prefix`` (e.g. ``"mixer."``)."""
    return {prefix + name: ColwiseParallel(use_local_output=True) for name in HEAD_PROJ + GROUP_PROJ}


def shard_direct_params(mamba: nn.Module, ctx: TPContext) -> list[tuple[nn.Module, str]]:
    """Make the mixer's directly-used parameters dim-0 shards over tp; returns them as
    (module, name) pairs for :func:`local_params_in_forward`."""
    out = []
    for path, name in DIRECT_PARAMS:
        mod = mamba.get_submodule(path) if path else mamba
        p = mod._parameters.get(name)
        if p is None:  # e.g. conv without bias
            continue
        mod.register_parameter(name, nn.Parameter(
            distribute_tensor(p, ctx.mesh, [Shard(0)], src_data_rank=None), p.requires_grad))
        out.append((mod, name))
    return out


def local_params_in_forward(owner: nn.Module, targets: list[tuple[nn.Module, str]],
                            local=lambda p: p.to_local()) -> None:
    """During ``owner``'s forward, ``mod.name`` reads ``local(p)`` (default: the local shard)
    of each DTensor parameter in ``targets``; the parameters themselves are restored afterwards.

    Runs inside any FSDP hooks of the enclosing sublayer, so it sees (and restores) the
    parameters FSDP has just unsharded.
    """
    inner = owner.forward

    def forward(*args, **kwargs):
        saved = []
        try:
            for mod, name in targets:
                p = mod._parameters.pop(name)
                saved.append((mod, name, p))
                mod.__dict__[name] = local(p) if isinstance(p, DTensor) else p
            return inner(*args, **kwargs)
        finally:
            for mod, name, p in reversed(saved):
                mod.__dict__.pop(name, None)
                mod._parameters[name] = p

    owner.forward = forward


def _mamba_plan(sub: nn.Module, ctx: TPContext) -> None:
    plan = _norms(sub, ctx)
    plan["mixer"] = _mixer_input(ctx)
    plan.update(mamba_inner_plan("mixer."))
    plan["mixer.out_proj"] = sublayer_output(ctx)
    parallelize_module(sub, ctx.mesh, plan)
    targets = shard_direct_params(sub.mixer, ctx)
    local_params_in_forward(sub.mixer, targets)


PLAN = TPPlan(_mamba_plan, _mamba_check)
