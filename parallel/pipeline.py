"""Pipeline parallelism: split the sublayer stack into stages and run a torch schedule.

Stages are cut at ``|`` in the model pattern, or automatically so that the largest
stage cost is minimal (per-sublayer costs, usually FLOPs; the embedding counts on
the first stage and the LM head on the last). Each stage is a deep copy of the meta
model with the other sublayers deleted, so parameter names (the global sublayer
index) match the unsplit model and checkpoints move between layouts.

Schedules: ``gpipe``, ``1f1b`` (one stage per rank), ``interleaved_1f1b``
(``pp_virtual_stages`` stages per rank, looped placement) and ``zbv``
(torch's ``ScheduleZBVZeroBubble``: two stages per rank in a V, backward split into
input- and weight-gradient passes). :class:`PipelineRunner` is the runner that steps
through them.
"""

from __future__ import annotations

import copy
from contextlib import ExitStack

import torch
import torch.distributed as dist
from torch import nn

from models.config import ModelConfig, UserError
from parallel import tp as tp_mod
from parallel.mtp import mtp_kwargs, take_mtp_loss
from parallel.runner import PlainRunner, _local, aux_losses, check_pipeline_rows, pipeline_microbatches


def stages_per_rank(pcfg) -> int:
    """Virtual stages per pp rank for the configured schedule (UserError if inconsistent)."""
    name, v = pcfg.pp_schedule, pcfg.pp_virtual_stages
    if name in ("gpipe", "1f1b"):
        if v != 1:
            raise UserError(f"parallel.pp_virtual_stages: {v} needs pp_schedule=interleaved_1f1b "
                              f"or zbv ({name} runs one stage per rank)")
        return 1
    if name == "zbv":
        if v not in (1, 2):
            raise UserError(f"parallel.pp_virtual_stages: zbv runs exactly 2 stages per rank, got {v}")
        return 2
    if v < 2:
        raise UserError("parallel.pp_virtual_stages: interleaved_1f1b needs >= 2 stages per rank")
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
    """The ways ``split_stages`` can fail (UserError); returns the ``|`` marks."""
    n = cfg.n_sublayers
    if n_stages > n:
        raise UserError(f"parallel.pp: {n_stages} pipeline stages but the model has only {n} "
                          f"sublayers (lower parallel.pp or parallel.pp_virtual_stages)")
    marks = sorted({b for b in cfg.stage_boundaries() if 0 < b < n})
    if marks and len(marks) + 1 != n_stages:
        raise UserError(f"model.pattern: its '|' marks cut {len(marks) + 1} pipeline stages, but "
                          f"parallel.pp * pp_virtual_stages = {n_stages}")
    return marks


def split_stages(cfg: ModelConfig, n_stages: int, costs: list[float], embed_cost: float,
                 head_cost: float) -> list[list[int]]:
    """Global sublayer indices of each stage (UserError if the model cannot be split)."""
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
        part.mtp = None  # multi-token prediction runs on the last stage (parallel/mtp.py)
    return part


def check_pp(cfg: ModelConfig, pcfg, pp: int) -> None:
    if pp == 1:
        return
    n_stages = pp * stages_per_rank(pcfg)
    if cfg.tie_embeddings:
        raise UserError("model.tie_embeddings: not supported with parallel.pp > 1 (embedding and "
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
    """The micro-batch counts torch's schedule constructors refuse (UserError), checked
    before anything is built (torch 2.14: 1F1B needs at least one micro-batch per stage;
    interleaved 1F1B a whole number of micro-batches per round of ``pp``)."""
    if n_micro < 1:
        raise UserError(f"parallel.pp_microbatches: must be >= 1, got {n_micro}")
    if name == "1f1b" and n_micro < pp:
        raise UserError(f"parallel.pp_microbatches: {n_micro} micro-batches do not fit the 1f1b "
                          f"schedule: it needs at least pp={pp}")
    if name == "interleaved_1f1b":
        rounds = max(1, n_micro // pp)
        if n_micro % rounds:
            raise UserError(f"parallel.pp_microbatches: {n_micro} micro-batches do not fit the "
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
        raise UserError(f"parallel.pp_microbatches: {n_micro} micro-batches do not fit the "
                          f"{name} schedule: {e}") from None


def as_one_module(parts: list[nn.Module]) -> nn.Module:
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
    union.mtp = next((p.mtp for p in parts if getattr(p, "mtp", None) is not None), None)
    return union


class PipelineRunner(PlainRunner):
    """Runs each step through a torch.distributed.pipelining schedule over this rank's stages.

    The trainer's micro-batches become the pipeline's micro-batches (or
    ``parallel.pp_microbatches`` of them); the loss lives on the last stage and
    ``reduce_loss`` shares it with every rank.
    """

    def __init__(self, parts, world, *, stage_ids: list[int], n_stages: int, schedule: str,
                 pp_microbatches: int = 0, **kw):
        super().__init__(parts, world, **kw)
        self.stage_ids, self.n_stages = stage_ids, n_stages
        self.schedule_name = schedule
        self.pp_microbatches = pp_microbatches
        self.has_first = 0 in stage_ids
        self.has_last = n_stages - 1 in stage_ids
        self._stages = None
        self._schedules: dict[int, object] = {}
        self._aux: list[torch.Tensor] = []
        self._last_n_micro = 0
        for part in parts:
            attach_aux_losses(part, self._aux, scale=self.cp.size if self.cp is not None else 1.0)

    def _loss_fn(self, out, labels):
        if self.fused_loss:
            loss = out.reshape(())  # the head already returned the loss
        else:
            z = self.z_loss if torch.is_grad_enabled() else 0.0  # held-out loss: no z-loss
            loss = tp_mod.cross_entropy(out, labels, z_loss=z)
        loss = loss + take_mtp_loss(self.parts)  # this micro-batch's MTP loss (last stage)
        if self.cp is not None and torch.is_grad_enabled():  # context parallel: global mean
            loss = loss * self.cp.loss_scale(labels)
        return loss

    def _schedule(self, n_micro: int):
        from torch.distributed.pipelining import PipelineStage

        if self._stages is None:
            group = self.world.mesh.get_group("pp")
            self._stages = [PipelineStage(part, s, self.n_stages, self.world.device, group=group)
                            for part, s in zip(self.parts, self.stage_ids)]
        if n_micro not in self._schedules:
            self._schedules[n_micro] = build_schedule(self.schedule_name, self._stages, n_micro,
                                                      self._loss_fn)
        return self._schedules[n_micro]

    def _run(self, batch: dict, n_micro: int, train: bool) -> list[torch.Tensor]:
        check_pipeline_rows(batch["input_ids"].shape[0], n_micro)
        sched = self._schedule(n_micro)
        args = (batch["input_ids"],) if self.has_first else ()
        kwargs = {"doc_ids": batch["doc_ids"]} if batch.get("doc_ids") is not None else {}
        if self.fused_loss:
            kwargs["labels"] = batch["labels"]
        kwargs.update(mtp_kwargs(self.model, batch))
        target = batch["labels"] if self.has_last else None
        losses: list[torch.Tensor] = []
        with ExitStack() as stack:
            stack.enter_context(self.loss_context())
            stack.enter_context(self.autocast())
            if train:
                sched.step(*args, target=target, losses=losses, return_outputs=False, **kwargs)
            else:
                sched.eval(*args, target=target, losses=losses, **kwargs)
        return losses

    def forward_backward(self, micro_batches: list[dict]) -> torch.Tensor:
        batch = {k: torch.cat([mb[k] for mb in micro_batches]) for k in micro_batches[0]}
        batch = self._to_device(batch)
        n_micro = pipeline_microbatches(self.pp_microbatches, len(micro_batches), self.world.pp_size)
        self._last_n_micro = n_micro
        self._aux.clear()
        losses = self._run(batch, n_micro, train=True)
        total = torch.zeros((), device=self.world.device)
        if losses:
            total += torch.stack([_local(x).detach().float() for x in losses]).mean()
        # MoE: keep the aux losses of the real forwards (one per micro-batch and stage with
        # MoE layers); torch's first-step metadata inference forward records one too
        n_aux = n_micro * sum(any(hasattr(m, "aux_loss") for m in p.modules()) for p in self.parts)
        aux = self._aux[len(self._aux) - n_aux:] if n_aux else []
        if aux:
            total += torch.stack(aux).sum() / n_micro
        self._aux.clear()
        self.finalize_grads()
        return total

    @torch.no_grad()
    def eval_loss(self, batch: dict) -> tuple[torch.Tensor, int]:
        batch = self._to_device(batch)
        # the training schedule's micro-batch count, so its stage buffers are reused
        n_micro = self._last_n_micro or self.pp_microbatches or self.world.pp_size
        if batch["input_ids"].shape[0] % n_micro:
            n_micro = 1
        with self._eval_heads():
            losses = self._run(batch, n_micro, train=False)
        self._aux.clear()
        valid = (batch["labels"] != -100).reshape(n_micro, -1).sum(-1).float()
        t = torch.zeros((), device=self.world.device)
        if losses:
            t += (torch.stack([_local(x).float() for x in losses]) * valid).sum()
        dist.all_reduce(t, group=self.world.mesh.get_group("pp"))  # only the last stage had it
        return t, int(valid.sum())

