"""Pipeline parallelism: split the sublayer stack into stages and run a torch schedule.

Stages are cut at ``|`` in the model pattern, or automatically so that the largest
stage cost is minimal (per-sublayer costs, usually FLOPs; the embedding counts on
the first stage and the LM head on the last). Each stage is a deep copy of the meta
model with the other sublayers deleted, so parameter names (the global sublayer
index) match the unsplit model and checkpoints move between layouts.

Schedules: ``gpipe``, ``1f1b`` (one stage per rank), ``interleaved_1f1b``
(``pp_virtual_stages`` stages per rank, looped placement) and ``zbv``
(torch's ``ScheduleZBVZeroBubble``: two stages per rank in a V, backward split into
input- and weight-gradient passes).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from models.config import ConfigError, ModelConfig


def stages_per_rank(pcfg) -> int:
    """Virtual stages per pp rank for the configured schedule (ConfigError if inconsistent)."""
    name, v = pcfg.pp_schedule, pcfg.pp_virtual_stages
    if name in ("gpipe", "1f1b"):
        if v != 1:
            raise ConfigError(f"parallel.pp_virtual_stages: {v} needs pp_schedule=interleaved_1f1b "
                              f"or zbv ({name} runs one stage per rank)")
        return 1
    if name == "zbv":
        if v not in (1, 2):
            raise ConfigError(f"parallel.pp_virtual_stages: zbv runs exactly 2 stages per rank, got {v}")
        return 2
    if v < 2:
        raise ConfigError("parallel.pp_virtual_stages: interleaved_1f1b needs >= 2 stages per rank")
    return v


def stage_rank(stage: int, n_stages: int, pp: int, schedule: str) -> int:
    """pp rank holding ``stage``: looped (s mod pp), or V-shaped for zbv."""
    if schedule == "zbv":
        return stage if stage < pp else n_stages - 1 - stage
    return stage % pp


def param_costs(model: nn.Module) -> tuple[list[float], float, float]:
    """Fallback cost model: matmul FLOPs ~ 2 x parameters (no attention-score term)."""
    costs = [2.0 * sum(p.numel() for p in layer.parameters()) for layer in model.layers.values()]
    cfg = model.cfg
    return costs, 0.0, 2.0 * cfg.d_model * cfg.vocab_size


def check_split(cfg: ModelConfig, n_stages: int) -> list[int]:
    """The ways ``split_stages`` can fail (ConfigError); returns the ``|`` marks."""
    n = cfg.n_sublayers
    if n_stages > n:
        raise ConfigError(f"parallel.pp: {n_stages} pipeline stages but the model has only {n} "
                          f"sublayers (lower parallel.pp or parallel.pp_virtual_stages)")
    marks = sorted({b for b in cfg.stage_boundaries() if 0 < b < n})
    if marks and len(marks) + 1 != n_stages:
        raise ConfigError(f"model.pattern: its '|' marks cut {len(marks) + 1} pipeline stages, but "
                          f"parallel.pp * pp_virtual_stages = {n_stages}")
    return marks


def split_stages(cfg: ModelConfig, n_stages: int, costs: list[float], embed_cost: float,
                 head_cost: float) -> list[list[int]]:
    """Global sublayer indices of each stage (ConfigError if the model cannot be split)."""
    n = cfg.n_sublayers
    marks = check_split(cfg, n_stages)
    if marks:
        cuts = [0] + marks + [n]
        return [list(range(a, b)) for a, b in zip(cuts, cuts[1:])]
    return _balanced(costs, n_stages, embed_cost, head_cost)


def _balanced(costs: list[float], k: int, embed: float, head: float) -> list[list[int]]:
    # min over contiguous splits of the max stage cost (dynamic programming, n and k are small)
    n = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def cost(s: int, a: int, b: int) -> float:
        return prefix[b] - prefix[a] + (embed if s == 0 else 0.0) + (head if s == k - 1 else 0.0)

    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(k + 1)]
    arg = [[0] * (n + 1) for _ in range(k + 1)]
    best[0][0] = 0.0
    for s in range(1, k + 1):
        for b in range(s, n - (k - s) + 1):
            for a in range(s - 1, b):
                v = max(best[s - 1][a], cost(s - 1, a, b))
                if v < best[s][b] - 1e-9 * abs(v):
                    best[s][b], arg[s][b] = v, a
    out, b = [], n
    for s in range(k, 0, -1):
        a = arg[s][b]
        out.append(list(range(a, b)))
        b = a
    return out[::-1]


def build_stage_model(model: nn.Module, keep: list[int], first: bool, last: bool) -> nn.Module:
    """A copy of the (meta) model holding only sublayers ``keep`` (global names kept)."""
    part = copy.deepcopy(model)
    for name in list(part.layers.keys()):
        if int(name) not in keep:
            del part.layers[name]
    if not first:
        part.tok_embeddings = None
    if not last:
        part.norm = None
        part.output = None
    return part


def check_pp(cfg: ModelConfig, pcfg, pp: int) -> None:
    if pp == 1:
        return
    n_stages = pp * stages_per_rank(pcfg)
    if cfg.tie_embeddings:
        raise ConfigError("model.tie_embeddings: not supported with parallel.pp > 1 (embedding and "
                          "head live on different stages)")
    check_split(cfg, n_stages)


class _AuxLossGrad(torch.autograd.Function):
    """Identity on the stage output that backpropagates ``aux`` with gradient 1 (so a
    stage's MoE auxiliary loss trains without reaching the loss on the last stage)."""

    @staticmethod
    def forward(ctx, out, aux, scale=1.0):
        ctx.aux_shape, ctx.scale = aux.shape, scale
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        return grad, grad.new_full(ctx.aux_shape, ctx.scale), None


def attach_aux_losses(part: nn.Module, record: list, scale: float = 1.0) -> None:
    """Forward hook: fold the stage's auxiliary losses into its output's backward (with
    gradient ``scale``: the cp size under context parallelism)."""
    from parallel.runner import aux_losses

    def hook(module, args, out):
        aux = aux_losses(module)
        if not isinstance(aux, torch.Tensor):
            return out
        record.append(aux.detach().float())
        if isinstance(out, tuple):
            return (_AuxLossGrad.apply(out[0], aux, scale),) + tuple(out[1:])
        return _AuxLossGrad.apply(out, aux, scale)

    part.register_forward_hook(hook)


def check_schedule(name: str, n_micro: int, pp: int) -> None:
    """The micro-batch counts torch's schedule constructors refuse (ConfigError), checked
    before anything is built (torch 2.14: 1F1B needs at least one micro-batch per stage;
    interleaved 1F1B a whole number of micro-batches per round of ``pp``)."""
    if n_micro < 1:
        raise ConfigError(f"parallel.pp_microbatches: must be >= 1, got {n_micro}")
    if name == "1f1b" and n_micro < pp:
        raise ConfigError(f"parallel.pp_microbatches: {n_micro} micro-batches do not fit the 1f1b "
                          f"schedule: it needs at least pp={pp}")
    if name == "interleaved_1f1b":
        rounds = max(1, n_micro // pp)
        if n_micro % rounds:
            raise ConfigError(f"parallel.pp_microbatches: {n_micro} micro-batches do not fit the "
                              f"interleaved_1f1b schedule: not a multiple of its {rounds} rounds")


def build_schedule(name: str, stages: list, n_micro: int, loss_fn):
    """The torch schedule object for ``name`` over this rank's ``stages``."""
    from torch.distributed.pipelining import schedules as S

    check_schedule(name, n_micro, stages[0].group_size)

    if name in ("gpipe", "1f1b"):
        cls = S.ScheduleGPipe if name == "gpipe" else S.Schedule1F1B
        return cls(stages[0], n_microbatches=n_micro, loss_fn=loss_fn, scale_grads=True)
    cls = S.ScheduleInterleaved1F1B if name == "interleaved_1f1b" else S.ScheduleZBVZeroBubble
    try:
        return cls(stages, n_microbatches=n_micro, loss_fn=loss_fn, scale_grads=True)
    except ValueError as e:
        raise ConfigError(f"parallel.pp_microbatches: {n_micro} micro-batches do not fit the "
                          f"{name} schedule: {e}") from None


def stage_union(parts: list[nn.Module]) -> nn.Module:
    """One module over this rank's pipeline stages, with the whole model's parameter names
    (for APIs that take a single module, e.g. DCP's optimizer state dict)."""
    if len(parts) == 1:
        return parts[0]
    union = nn.Module()
    union.tok_embeddings = next((p.tok_embeddings for p in parts if p.tok_embeddings is not None), None)
    layers = {k: v for p in parts for k, v in p.layers.items()}
    union.layers = nn.ModuleDict({k: layers[k] for k in sorted(layers, key=int)})
    union.norm = next((p.norm for p in parts if p.norm is not None), None)
    union.output = next((p.output for p in parts if p.output is not None), None)
    return union
