"""Tensor (+ sequence) parallel plan for Falcon-H1-style hybrid-heads sublayers (kind ``hybrid``).

Attention heads are split as in the attention plan (``wq``/``wk``/``wv`` column-parallel,
or replicated KV heads when tp exceeds them) and the inner Mamba-2 mixer as in
``parallel/tp_mamba.py``. So rank r's ``out_proj`` input is ``[attention heads of r |
mamba heads of r]``, which is not one contiguous column block of ``out_proj.weight``
(whose columns are ``[all attention | all mamba]``) and so no DTensor ``Shard`` layout.

Chosen approach: ``out_proj.weight`` stays a Replicate DTensor with its canonical layout
(so initialisation and checkpoints are layout-independent under the same FQN), and
each rank multiplies its input by the two column slices it owns. The product is a
partial sum over tp, reduced by ``reduce_sublayer_output`` like any row-parallel output;
the weight's local gradient (non-zero only in those columns) is marked ``Partial`` and
summed by ``finalize_grads`` or FSDP, as for replicated KV heads. Cost: one replicated
``d_model x (attention + mamba width)`` matrix per ``P`` sublayer; compute and
communication are those of a row-parallel projection.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Replicate, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module
from torch.distributed.tensor.parallel.style import ParallelStyle

from models.config import ModelConfig, UserError
from parallel.tp import ReplicatedKVHeads, TPContext, TPPlan, _mixer_input, _norms, reduce_sublayer_output
from parallel.tp_mamba import check_mamba_split, local_params_in_forward, mamba_inner_plan, shard_direct_params


class SplitColumnsRowwise(ParallelStyle):
    """Row-parallel linear (no bias) whose local input columns are several slices of the
    replicated weight: ``slices`` = [(start, stop), ...] in the full weight's columns."""

    def __init__(self, slices: list[tuple[int, int]], output_layout):
        super().__init__()
        self.slices, self.output_layout = slices, output_layout

    @staticmethod
    def _partition(name, module, mesh):
        for pname, p in list(module.named_parameters(recurse=False)):
            module.register_parameter(pname, nn.Parameter(
                distribute_tensor(p, mesh, [Replicate()], src_data_rank=None), p.requires_grad))

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        if module.bias is not None:
            raise ValueError("SplitColumnsRowwise: a bias would be added once per tp rank")
        distribute_module(module, device_mesh, self._partition)
        slices, layout = self.slices, self.output_layout

        def forward(x: torch.Tensor) -> torch.Tensor:
            w = module.weight
            # each rank uses (and so gets a gradient for) only its own columns
            w = w.to_local(grad_placements=(Partial(),)) if isinstance(w, DTensor) else w
            w = torch.cat([w[:, a:b] for a, b in slices], dim=1)
            y = F.linear(x, w)
            y = DTensor.from_local(y, device_mesh, (Partial(),), run_check=False)
            return reduce_sublayer_output(y, layout)

        module.forward = forward
        return module


def _hybrid_kv(cfg: ModelConfig) -> int:
    from models.hybrid import hybrid_kv_heads

    return hybrid_kv_heads(cfg)


def _hybrid_check(cfg: ModelConfig, tp: int) -> None:
    hc = cfg.hybrid
    if hc.n_attn_heads % tp:
        raise UserError(f"parallel.tp: {tp} does not divide model.hybrid.n_attn_heads={hc.n_attn_heads}")
    kv = _hybrid_kv(cfg)
    if kv % tp and tp % kv:
        raise UserError(f"parallel.tp: {tp} and the hybrid mixer's {kv} KV heads (model.n_kv_heads) "
                          f"must divide one another")
    check_mamba_split(hc.n_mamba_heads, cfg.mamba.n_groups, tp, "model.hybrid.n_mamba_heads")


def _hybrid_plan(sub: nn.Module, ctx: TPContext) -> None:
    cfg, tp, r = ctx.cfg, ctx.size, ctx.rank
    hc, hd = cfg.hybrid, cfg.head_dim_resolved
    plan = _norms(sub, ctx)
    plan["mixer"] = _mixer_input(ctx)
    plan["mixer.wq"] = ColwiseParallel(use_local_output=True)
    kv = _hybrid_kv(cfg)
    if kv % tp == 0:
        plan["mixer.wk"] = ColwiseParallel(use_local_output=True)
        plan["mixer.wv"] = ColwiseParallel(use_local_output=True)
    else:  # tp > KV heads: each rank's query heads share one KV head
        kv_head = (r * (hc.n_attn_heads // tp)) // (hc.n_attn_heads // kv)
        plan["mixer.wk"] = ReplicatedKVHeads(kv_head, hd)
        plan["mixer.wv"] = ReplicatedKVHeads(kv_head, hd)
    plan.update(mamba_inner_plan("mixer.mamba."))
    attn, mamba = hc.n_attn_heads * hd // tp, hc.n_mamba_heads * cfg.mamba.head_dim // tp
    a0, m0 = r * attn, hc.n_attn_heads * hd + r * mamba
    plan["mixer.out_proj"] = SplitColumnsRowwise([(a0, a0 + attn), (m0, m0 + mamba)], ctx.stream_layout)
    parallelize_module(sub, ctx.mesh, plan)
    # the parent calls mamba.mix directly, so the local views are set around its forward
    local_params_in_forward(sub.mixer, shard_direct_params(sub.mixer.mamba, ctx))


PLAN = TPPlan(_hybrid_plan, _hybrid_check)
