"""Multi-token prediction (models/mtp.py) under every layout, and its metrics.

- The depth losses are computed in the last stage's forward, given the main labels as
  ``mtp_labels`` (:func:`mtp_kwargs`); the runner adds :func:`take_mtp_loss` to the main
  loss of the same micro-batch (pipeline: in the schedule's loss function), so it is
  averaged, scaled and reduced exactly like the main loss.
- Pipeline parallel: the MTP modules live on the last stage, which needs Emb(t). Rather
  than a second copy of the embedding table (Megatron keeps one on the last stage and
  all-reduces its gradient with the first), every stage before the last passes the input
  embeddings on as one more output (:func:`route_mtp` takes them off the next stage's
  inputs), so their gradient flows back to the one embedding table through the pipeline's
  own backward: no duplicated weight, no extra gradient reduction, checkpoints unchanged.
  The cost is one more [B, S, d] activation per stage boundary.
- Tensor parallel: the block's sublayers get their kind's plan, the norms and the 2d -> d
  projection are replicated over tp; the head loss is the loss-parallel cross-entropy or
  the fused head (:func:`install_head_loss`).
- FSDP: each MTP module is its own FSDP unit (:func:`fsdp_units`).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch import nn

from models.config import ModelConfig, UserError


def check_mtp(cfg: ModelConfig, pcfg, world) -> None:
    """Layouts multi-token prediction does not support yet (UserError naming the key)."""
    if not cfg.mtp_depth:
        return
    if world.cp_size > 1:
        raise UserError("model.mtp_depth: not supported with parallel.cp > 1 yet (the shifted "
                          "targets cross the context-parallel chunks)")
    if pcfg.dp_engine == "deepspeed":
        raise UserError("model.mtp_depth: not supported with parallel.dp_engine=deepspeed yet")
    if world.tp_size > 1:
        if pcfg.sequence_parallel:
            raise UserError("model.mtp_depth: not supported with parallel.sequence_parallel yet "
                              "(the shifted embeddings cross the sequence shards)")
        from parallel.tp_plans import check_tp

        check_tp(dataclasses.replace(cfg, pattern=cfg.mtp_pattern, n_layers=1, mtp_depth=0), world.tp_size)


def mtp_kwargs(model: nn.Module, batch: dict) -> dict:
    """Extra forward keyword arguments: the labels the MTP depths shift."""
    return {"mtp_labels": batch["labels"]} if getattr(model.cfg, "mtp_depth", 0) else {}


def take_mtp_loss(parts: list[nn.Module]) -> torch.Tensor | float:
    """The weighted MTP loss of the last forward (0.0 without one), cleared; its per-depth
    values are summed for :func:`mtp_metrics`."""
    total = 0.0
    for part in parts:
        loss = getattr(part, "mtp_loss", None)
        if loss is None:
            continue
        part.mtp_loss = None
        stats = torch.stack([*part.mtp_depth_losses, torch.ones_like(part.mtp_depth_losses[0])])
        prev = part.__dict__.get("_mtp_stats")
        part.__dict__["_mtp_stats"] = stats if prev is None else prev + stats
        total = total + loss
    return total


def mtp_metrics(runner, rec: dict) -> dict:
    """``mtp_loss_k`` (mean over the step's micro-batches and data-parallel ranks) and the
    main loss: ``loss`` becomes the next-token loss alone (comparable with a run without
    MTP), ``loss_total`` the optimised objective. Collective: every rank calls it."""
    cfg = runner.parts[0].cfg
    d = cfg.mtp_depth
    if not d:
        return {}
    t = torch.zeros(d + 1, dtype=torch.float64, device=runner.world.device)
    for part in runner.parts:
        stats = part.__dict__.pop("_mtp_stats", None)
        if stats is not None:
            t += stats.to(t)
    if runner.world.distributed:
        dist.all_reduce(t)  # ranks without the last stage add zeros; tp copies cancel in the ratio
    depth = (t[:d] / t[d].clamp(min=1)).tolist()
    out = {f"mtp_loss_{k + 1}": v for k, v in enumerate(depth)}
    if "loss" in rec:
        out["loss_total"] = rec["loss"]
        out["loss"] = rec["loss"] - cfg.mtp_loss_weight / d * sum(depth)
    return out


def route_mtp(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """On a pipeline stage after the first, the previous stage's last output is the input
    embeddings (see the module docstring)."""
    cfg = getattr(module, "cfg", None)
    if cfg is not None and cfg.mtp_depth and module.tok_embeddings is None and len(args) >= 2 \
            and "mtp_embeds" not in kwargs:
        kwargs["mtp_embeds"] = args[-1]
        args = args[:-1]
    return args, kwargs


def install_head_loss(part: nn.Module, z_loss: float, fused: bool) -> None:
    """The MTP depths' head loss as the main loss computes it: loss-parallel cross-entropy
    (a plain one on one device) with the run's z-loss, or the fused loss head."""
    if getattr(part, "mtp", None) is None:
        return
    from parallel import tp as tp_mod

    def head_loss(h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if fused:
            part.output._labels = labels
            return part.output(h).reshape(())
        z = z_loss if torch.is_grad_enabled() else 0.0
        return tp_mod.cross_entropy(part.output(h), labels, z_loss=z)

    part.head_loss = head_loss


def stage_cost(model: nn.Module) -> float:
    """The MTP modules' matmul FLOPs per token (2 x their parameters, plus the shared head
    once per depth), added to the last stage's cost when pipeline stages are balanced."""
    if getattr(model, "mtp", None) is None:
        return 0.0
    cfg = model.cfg
    return 2.0 * sum(p.numel() for p in model.mtp.parameters()) + cfg.mtp_depth * 2.0 * cfg.d_model * cfg.vocab_size


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The MTP modules (each one FSDP unit), or none."""
    return list(model.mtp) if getattr(model, "mtp", None) is not None else []
