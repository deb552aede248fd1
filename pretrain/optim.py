"""AdamW with decoupled weight decay, and learning-rate schedules."""

from __future__ import annotations

import math

import torch

from pretrain.config import OptimConfig


def build_optimizer(modules: list[torch.nn.Module], ocfg: OptimConfig, log=None) -> torch.optim.Optimizer:
    """AdamW (no weight decay on vectors or embeddings), or Muon for the weight matrices with
    AdamW for the rest (``optim.name``); ``log(str)`` receives Muon's parameter split."""
    if ocfg.name == "muon":
        from parallel.muon import build_muon

        optimizer, names = build_muon(modules, ocfg)
        if log is not None:
            log(muon_split_summary(names))
        return optimizer
    decay, no_decay, seen = [], [], set()
    for module in modules:
        for name, p in module.named_parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (no_decay if p.ndim < 2 or "tok_embeddings" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": ocfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=ocfg.lr, betas=(ocfg.beta1, ocfg.beta2), eps=ocfg.eps,
                             foreach=True)


def muon_split_summary(names: dict[str, list[str]]) -> str:
    """One start-up line per group: which parameters Muon updates and which AdamW does."""
    lines = [f"optimizer: muon on {len(names['muon'])} matrices, adamw on "
             f"{len(names['adamw_decay']) + len(names['adamw_no_decay'])} other parameters"]
    for group, members in names.items():
        lines.append(f"  {group}: " + (", ".join(members) if members else "-"))
    return "\n".join(lines)


def lr_factor(step: int, total_steps: int, ocfg: OptimConfig) -> float:
    """Multiplier on the peak lr for optimizer step ``step`` (0-based)."""
    warmup = min(ocfg.warmup_steps, total_steps)
    if warmup and step < warmup:
        return (step + 1) / warmup
    floor = ocfg.min_lr_ratio
    if ocfg.schedule == "constant":
        return 1.0
    if ocfg.schedule == "cosine":
        span = max(total_steps - warmup, 1)
        progress = min((step - warmup) / span, 1.0)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    # wsd: warmup, stable at peak, then linear decay over the last decay_fraction of steps
    decay_steps = max(int(round(total_steps * ocfg.decay_fraction)), 1)
    decay_start = total_steps - decay_steps
    if step < decay_start:
        return 1.0
    progress = min((step - decay_start + 1) / decay_steps, 1.0)
    return 1.0 - (1.0 - floor) * progress


def build_scheduler(optimizer, total_steps: int, ocfg: OptimConfig):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, ocfg))
