"""Tensor (+ sequence) parallel plan for Gated DeltaNet sublayers (kind ``gdn``).

Each tp rank holds ``n_heads/tp`` whole q/k heads and the ``n_v_heads/tp`` value heads that
read them (value head ``h`` reads q/k head ``h // r``, so contiguous blocks stay together):
- ``q_proj``, ``k_proj`` column-parallel by q/k heads; ``v_proj``, ``z_proj``, ``a_proj``,
  ``b_proj`` column-parallel by value heads; ``conv_q``/``conv_k``/``conv_v`` sharded on their
  channel dim to match; ``dt_bias``, ``A_log`` sharded by value heads.
- the gated norm is per head: it runs locally. Its weight [head_v_dim] is shared by all heads,
  so it is replicated over tp and its local gradient (from the rank's heads) is a partial
  sum, marked ``Partial`` and summed by FSDP or ``finalize_grads``.
- ``out_proj`` row-parallel, reduced by ``reduce_sublayer_output`` like attention's ``wo``.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

from models.config import ModelConfig, UserError
from parallel.tp import TPContext, TPPlan, _mixer_input, _norms, sublayer_output
from parallel.tp_mamba import local_params_in_forward

COLUMN = ("q_proj", "k_proj", "v_proj", "z_proj", "a_proj", "b_proj")
# (submodule path inside the mixer, parameter, placement) of the parameters it uses directly
DIRECT = (("", "dt_bias", Shard(0)), ("", "A_log", Shard(0)), ("conv_q", "weight", Shard(0)),
          ("conv_k", "weight", Shard(0)), ("conv_v", "weight", Shard(0)), ("norm", "weight", Replicate()))


def _gdn_check(cfg: ModelConfig, tp: int) -> None:
    gc = cfg.gdn
    if gc.n_heads % tp:
        raise UserError(f"model.gdn.n_heads: {gc.n_heads} q/k heads cannot be split over parallel.tp={tp} "
                          f"(each rank needs whole heads; use a tp that divides gdn.n_heads)")


def _direct_params(mixer: nn.Module, mesh) -> list[tuple[nn.Module, str]]:
    out = []
    for path, name, placement in DIRECT:
        mod = mixer.get_submodule(path) if path else mixer
        p = mod._parameters.get(name)
        if p is None:
            continue
        mod.register_parameter(name, nn.Parameter(
            distribute_tensor(p, mesh, [placement], src_data_rank=None), p.requires_grad))
        out.append((mod, name))
    return out


def _local(p: DTensor):
    # a replicated parameter used by this rank's heads only: its local gradient is partial
    return p.to_local(grad_placements=(Partial(),)) if p.placements[0].is_replicate() else p.to_local()


def _gdn_plan(sub: nn.Module, ctx: TPContext) -> None:
    plan = _norms(sub, ctx)
    plan["mixer"] = _mixer_input(ctx)
    plan.update({f"mixer.{name}": ColwiseParallel(use_local_output=True) for name in COLUMN})
    plan["mixer.out_proj"] = sublayer_output(ctx)
    parallelize_module(sub, ctx.mesh, plan)
    local_params_in_forward(sub.mixer, _direct_params(sub.mixer, ctx.mesh), local=_local)


PLAN = TPPlan(_gdn_plan, _gdn_check)
