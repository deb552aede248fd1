"""Turn a single-device (meta) model into this rank's parallel model.

Order (as torchtitan, after the layout check made before the process group started):
pipeline split -> tensor/sequence parallel -> activation checkpointing -> torch.compile ->
FSDP2/HSDP/replicate -> materialise and initialise (each parameter's shard of its
layout-independent full value).
"""

from __future__ import annotations

import torch
from torch import nn

from models.errors import UserError
from parallel.config import ParallelConfig
from parallel.fsdp import apply_data_parallel
from parallel.head import make_fused_head, accept_stage_inputs
from parallel.init import is_meta, materialize
from parallel.pipeline import PipelineRunner
from parallel.runner import PlainRunner
from parallel.world import World


def apply_activation_checkpointing(model: nn.Module, mode: str, every: int) -> None:
    """Recompute sublayers in backward: all of them (``full``) or every n-th (``every_n``)."""
    if mode == "off":
        return
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for name, layer in list(model.layers.items()):
        if mode == "full" or int(name) % every == 0:
            model.layers[name] = checkpoint_wrapper(layer, preserve_rng_state=False)


def apply_compile(model: nn.Module) -> None:
    """Compile each sublayer separately (fast compiles, and composes with FSDP per block)."""
    for layer in model.layers.values():
        layer.compile(dynamic=False)  # in place: parameter names stay unprefixed


def check_layout(model: nn.Module, pcfg: ParallelConfig, world: World) -> None:
    """Reject a layout the model cannot be divided into (UserError naming the key)."""
    check_model_layout(model.cfg, pcfg, world)


def check_model_layout(cfg, pcfg: ParallelConfig, world: World) -> None:
    """``check_layout`` from the model's config alone (``world`` needs only its sizes)."""
    from parallel.pipeline import check_pp
    from parallel.tp_plans import check_tp

    check_tp(cfg, world.tp_size)
    if pcfg.ep > 1:  # expert parallel
        from parallel.expert_parallel import check_ep

        check_ep(cfg, pcfg.ep)
    check_pp(cfg, pcfg, world.pp_size)  # (context parallel's rules: Config.validate)
    from parallel.mtp import check_mtp

    check_mtp(cfg, pcfg, world)
    if world.pp_size > 1 and pcfg.pp_schedule == "zbv" and world.dp_size * world.cp_size > 1:
        # torch's split input/weight backward runs FSDP's gradient hooks before the weight
        # gradients exist: the reduced gradients come out wrong (checked on torch 2.14)
        raise UserError("parallel.pp_schedule: zbv does not compose with data parallelism yet; "
                        "use interleaved_1f1b with parallel.dp_shard/dp_replicate/cp > 1")
    if world.pp_size > 1 and world.tp_size > 1 and "moe" in cfg.sublayer_kinds:
        # torch's pipeline backward-metadata pass fails on the MoE tp plan's mix of DTensor and
        # local gradients (aten.mul got mixed torch.Tensor and DTensor; torch 2.14)
        raise UserError("parallel.tp: MoE sublayers under tp > 1 do not compose with parallel.pp > 1 "
                        "yet; use ep/dp_shard for the experts with pp")


def parallelize(model: nn.Module, pcfg: ParallelConfig, world: World, *, ac: str = "off",
                ac_every: int = 2, compile: bool = False, z_loss: float = 0.0,
                fused_loss: bool = False, autocast_dtype: torch.dtype | None = None,
                seed: int = 0, stage_costs: tuple[list[float], float, float] | None = None
                ) -> PlainRunner:
    """Apply ``pcfg``'s layout to ``model`` for this rank and return the PlainRunner.

    ``model`` should be on the meta device (``build_model(..., init=False)``); it is then
    materialised on ``world.device`` and initialised from ``seed`` after sharding. An
    already materialised model is kept as is (single process only).
    ``stage_costs`` = (per-sublayer costs, embedding cost, head cost) for automatic
    pipeline splits; default: parameter counts. The layout must have passed the one layout
    check (``pretrain.layout_check.check_run``; ``check_layout`` for the model's part).
    """
    meta = is_meta(model)
    if not meta and world.distributed:
        raise ValueError("parallelize: build the model on the meta device for multi-process runs "
                         "(build_model(..., init=False))")
    from parallel.context_parallel import make_cp_plan

    cp = make_cp_plan(world, pcfg.cp_mode, pcfg.sequence_parallel)
    runner_kwargs = dict(z_loss=z_loss, fused_loss=fused_loss, autocast_dtype=autocast_dtype,
                  sequence_parallel=pcfg.sequence_parallel, cp=cp)
    if world.pp_size > 1:
        parts, stage_ids, n_stages = _split(model, pcfg, world, stage_costs)
    else:
        parts, stage_ids, n_stages = [model], [0], 1
    for part in parts:
        _parallelize_part(part, pcfg, world, ac, ac_every, compile, z_loss, fused_loss, cp)
        if meta:
            materialize(part, world.device, seed)
    if world.pp_size > 1:
        return PipelineRunner(parts, world, stage_ids=stage_ids, n_stages=n_stages,
                             schedule=pcfg.pp_schedule, pp_microbatches=pcfg.pp_microbatches, **runner_kwargs)
    return PlainRunner(parts, world, **runner_kwargs)


def _split(model, pcfg, world, stage_costs):
    from parallel.pipeline import build_stage_model, param_costs, split_stages, stage_rank, stages_per_rank

    n_stages = world.pp_size * stages_per_rank(pcfg)
    costs, embed, head = stage_costs or param_costs(model)
    from parallel.mtp import stage_cost

    head += stage_cost(model)  # the MTP modules run on the last stage
    stages = split_stages(model.cfg, n_stages, list(costs), embed, head)
    mine = [s for s in range(n_stages)
            if stage_rank(s, n_stages, world.pp_size, pcfg.pp_schedule) == world.pp_rank]
    parts = [build_stage_model(model, stages[s], s == 0, s == n_stages - 1) for s in mine]
    return parts, mine, n_stages


def _parallelize_part(part, pcfg, world, ac, ac_every, compile, z_loss, fused_loss, cp=None) -> None:
    if world.ep_size > 1:  # expert parallel: experts become Shard(0) DTensors over ep first
        from parallel.expert_parallel import apply_ep

        apply_ep(part, world)
    if world.tp_size > 1:
        from parallel.ladder import apply_ladder, plan_ladder
        from parallel.tp import TPContext
        from parallel.tp_plans import TP_PLANS, apply_tp

        # ladder residual: which reductions overlap (compiled sublayers schedule their own
        # collectives: no deferred input gradients there)
        deferrable = set() if compile else {k for k, plan in TP_PLANS.items() if plan.ladder_deferrable}
        ladder = plan_ladder(part, deferrable)
        apply_tp(part, TPContext(world.mesh["tp"], part.cfg, pcfg.sequence_parallel),
                 fused_head=fused_loss, ladder=ladder)
        if ladder is not None:
            apply_ladder(part, ladder, world.mesh["tp"], pcfg.sequence_parallel)
    if cp is not None:  # context parallel: per-forward RoPE positions and attention
        from parallel.context_parallel import install_cp

        install_cp(part, cp)
    if fused_loss:
        make_fused_head(part, z_loss)
    from parallel.mtp import install_head_loss

    install_head_loss(part, z_loss, fused_loss)  # multi-token prediction's head loss
    apply_activation_checkpointing(part, ac, ac_every)
    if compile:
        apply_compile(part)
    if world.dp_size * world.cp_size > 1:
        from parallel.expert_parallel import expert_fsdp_options

        # expert parallel: experts FSDP-sharded over edp (and dp_replicate), not dp
        apply_data_parallel(part, world, pcfg, **expert_fsdp_options(part, world))
    accept_stage_inputs(part)
