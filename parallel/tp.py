"""Tensor parallel (+ sequence parallel) plans, one per sublayer kind.

The residual stream between sublayers is a plain local tensor: the full sequence
``[B, S, D]`` (replicated over tp) without sequence parallel, or this rank's
sequence shard ``[B, S/tp, D]`` with it. Inside a sublayer, the mixer input is
made a Replicate DTensor once (all-gathered along the sequence with SP), the
column-parallel linears yield local head/feature shards, and the row-parallel
output projection is reduced by :func:`reduce_sublayer_output` (all-reduce, or
reduce-scatter along the sequence with SP).

Each sublayer kind has one :class:`TPPlan` (attention and MLP here, the others in
``parallel/tp_<kind>.py``), listed by kind name in ``parallel/tp_plans.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from typing import Callable

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from torch.distributed.tensor.parallel.style import ParallelStyle

import kernels
from models.config import ModelConfig, UserError
from parallel.ladder import async_reduce


@dataclass
class TPContext:
    """What a per-kind plan needs to shard one sublayer."""

    mesh: object  # 1-D tp DeviceMesh
    cfg: ModelConfig
    sequence_parallel: bool
    # ladder residual (parallel/ladder.py's LadderPlan sets both per sublayer): this
    # sublayer's output reduction stays pending until ``join`` uses it ...
    async_output: bool = False
    # ... and its input is a boundary whose input-gradient reduction waits one sublayer:
    # the norm and mixer get a Replicate DTensor
    input_boundary: bool = False

    @property
    def size(self) -> int:
        return self.mesh.size()

    @property
    def rank(self) -> int:
        return self.mesh.get_local_rank()

    @property
    def stream_layout(self):
        """Layout of the residual stream between sublayers."""
        return Shard(1) if self.sequence_parallel else Replicate()


@dataclass(frozen=True)
class TPPlan:
    """How one sublayer kind is split over tp."""

    apply: Callable[[nn.Module, TPContext], None]  # (sublayer, ctx): shard that Sublayer in place
    check: Callable[[ModelConfig, int], None] | None = None  # (cfg, tp): UserError if it cannot split
    # ladder may defer the input-gradient reduction (the plan reads a replicated input)
    ladder_deferrable: bool = True


# ---- the one place a row-parallel sublayer output is reduced --------------------------

def reduce_sublayer_output(out: DTensor, layout, use_local_output: bool = True,
                           async_op: bool = False):
    """Sum a row-parallel output (Partial over tp) into the stream's layout.

    All-reduce to Replicate, or reduce-scatter along the sequence with SP. Synchronous,
    unless ``async_op`` (ladder residual: see parallel/ladder.py) leaves it pending.
    """
    if out.placements != (layout,):
        if async_op:
            return async_reduce(out, layout, use_local_output)
        out = out.redistribute(placements=(layout,))
    return _owned(out.to_local()) if use_local_output else out


def _owned(t: torch.Tensor) -> torch.Tensor:
    # to_local() returns a view; a sublayer output that is a view makes FSDP2 warn that an
    # in-place op on it would drop its pre-backward hook. One [B, S, d] copy per sublayer.
    return t.clone() if t._base is not None else t


class RowwiseSublayerOutput(RowwiseParallel):
    """RowwiseParallel whose output reduction goes through :func:`reduce_sublayer_output`."""

    @staticmethod
    def _prepare_output_fn(output_layouts, use_local_output, mod, outputs, device_mesh):
        return reduce_sublayer_output(outputs, output_layouts[0], use_local_output)


class PendingRowwiseSublayerOutput(RowwiseSublayerOutput):
    """The same, with the reduction left pending until first use (a ladder sublayer)."""

    @staticmethod
    def _prepare_output_fn(output_layouts, use_local_output, mod, outputs, device_mesh):
        return reduce_sublayer_output(outputs, output_layouts[0], use_local_output, async_op=True)


def sublayer_output(ctx: TPContext) -> RowwiseSublayerOutput:
    """The style of a sublayer's row-parallel output projection (pending with
    ``ctx.async_output``)."""
    style = PendingRowwiseSublayerOutput if ctx.async_output else RowwiseSublayerOutput
    return style(output_layouts=ctx.stream_layout)


class ReplicatedKVHeads(ParallelStyle):
    """K or V projection when tp > n_kv_heads: the weight is replicated over tp, and each
    rank keeps only the KV head its local query heads attend to.

    The kept slice differs per rank, so the local gradient is a partial sum: it is marked
    ``Partial`` and DTensor reduces it (input grad) and FSDP or ``finalize_grads`` (weight).
    """

    def __init__(self, kv_head: int, head_dim: int):
        super().__init__()
        self.kv_head, self.head_dim = kv_head, head_dim

    def _partition(self, name, module, mesh):
        for pname, p in list(module.named_parameters(recurse=False)):
            module.register_parameter(pname, nn.Parameter(
                distribute_tensor(p, mesh, [Replicate()], src_data_rank=None), p.requires_grad))

    @staticmethod
    def _input(mod, inputs, mesh):
        x = inputs[0]
        if not isinstance(x, DTensor):
            x = DTensor.from_local(x, mesh, (Replicate(),), run_check=False)
        return x

    def _output(self, mod, out, mesh):
        lo = self.kv_head * self.head_dim
        return out[..., lo:lo + self.head_dim].to_local(grad_placements=(Partial(),))

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        return distribute_module(module, device_mesh, self._partition, self._input,
                                 partial(ReplicatedKVHeads._output, self))


class ReplicateOverTP(ParallelStyle):
    """Parameters replicated over tp as DTensors, computing on the replicated local stream.

    Every parameter of a tp model is then a DTensor on the tp mesh, which FSDP (2-D
    sharding) and the foreach optimizers need; gradients are identical on all tp ranks.
    ``keep_dtensor`` returns the output as a DTensor (a ladder input boundary, whose
    gradients stay partial sums until the boundary reduces them).
    """

    def __init__(self, keep_dtensor: bool = False):
        super().__init__()
        self.keep_dtensor = keep_dtensor

    @staticmethod
    def _partition(name, module, mesh):
        for pname, p in list(module.named_parameters(recurse=False)):
            module.register_parameter(pname, nn.Parameter(
                distribute_tensor(p, mesh, [Replicate()], src_data_rank=None), p.requires_grad))

    @staticmethod
    def _input(mod, inputs, mesh):
        return tuple(DTensor.from_local(x, mesh, (Replicate(),), run_check=False)
                     if isinstance(x, torch.Tensor) and not isinstance(x, DTensor) else x
                     for x in inputs)

    def _output(self, mod, out, mesh):
        return _owned(out.to_local()) if isinstance(out, DTensor) and not self.keep_dtensor else out

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        return distribute_module(module, device_mesh, self._partition, self._input, self._output)


# ---- plans -----------------------------------------------------------------------------

def _mixer_input(ctx: TPContext) -> PrepareModuleInput:
    # (x, ctx): x becomes one Replicate DTensor shared by all column-parallel linears, so
    # their input gradients are summed as DTensors and reduced once at this boundary.
    # ForwardContext (rope tables, doc_ids) is per-sequence and already full on every rank.
    if ctx.input_boundary:  # already a Replicate DTensor (parallel/ladder.py)
        return PrepareModuleInput(input_layouts=(Replicate(), None),
                                  desired_input_layouts=(Replicate(), None), use_local_output=False)
    return PrepareModuleInput(input_layouts=(ctx.stream_layout, None),
                              desired_input_layouts=(Replicate(), None), use_local_output=False)


def norm_style(ctx: TPContext) -> ParallelStyle:
    """Norms over the stream: sequence-sharded with SP, else replicated."""
    if ctx.input_boundary:
        return ReplicateOverTP(keep_dtensor=True)
    return SequenceParallel(use_local_output=True) if ctx.sequence_parallel else ReplicateOverTP()


def _norms(sub: nn.Module, ctx: TPContext) -> dict:
    plan = {"norm": norm_style(ctx)}
    if getattr(sub, "out_norm", None) is not None:
        plan["out_norm"] = norm_style(replace(ctx, input_boundary=False))
    return plan


def mha_plan(sub: nn.Module, ctx: TPContext) -> None:
    """The standard attention (MHA/GQA/MQA) split by heads (its qk_norm weights are left to
    the caller: parallel/tp_plans.py)."""
    cfg, tp = ctx.cfg, ctx.size
    plan = _norms(sub, ctx)
    plan["mixer"] = _mixer_input(ctx)
    plan["mixer.wq"] = ColwiseParallel(use_local_output=True)
    if cfg.n_kv_heads_resolved % tp == 0:
        plan["mixer.wk"] = ColwiseParallel(use_local_output=True)
        plan["mixer.wv"] = ColwiseParallel(use_local_output=True)
    else:  # tp > n_kv_heads: each rank's query heads share one KV head
        local_q = cfg.n_heads // tp
        kv_head = (ctx.rank * local_q) // (cfg.n_heads // cfg.n_kv_heads_resolved)
        plan["mixer.wk"] = ReplicatedKVHeads(kv_head, cfg.head_dim_resolved)
        plan["mixer.wv"] = ReplicatedKVHeads(kv_head, cfg.head_dim_resolved)
    plan["mixer.wo"] = sublayer_output(ctx)
    parallelize_module(sub, ctx.mesh, plan)


def mha_check(cfg: ModelConfig, tp: int) -> None:
    if cfg.n_heads % tp:
        raise UserError(f"parallel.tp: {tp} does not divide model.n_heads={cfg.n_heads}")
    kv = cfg.n_kv_heads_resolved
    if kv % tp and tp % kv:
        raise UserError(f"parallel.tp: {tp} and model.n_kv_heads={kv} must divide one another")


def _mlp_plan(sub: nn.Module, ctx: TPContext) -> None:
    plan = _norms(sub, ctx)
    plan["mixer"] = _mixer_input(ctx)
    plan["mixer.w_gate"] = ColwiseParallel(use_local_output=True)
    plan["mixer.w_up"] = ColwiseParallel(use_local_output=True)
    plan["mixer.w_down"] = sublayer_output(ctx)
    parallelize_module(sub, ctx.mesh, plan)


def _mlp_check(cfg: ModelConfig, tp: int) -> None:
    if cfg.ffn_hidden_resolved % tp:
        raise UserError(f"parallel.tp: {tp} does not divide the MLP hidden size {cfg.ffn_hidden_resolved} "
                          f"(model.ffn_hidden)")


MLP_PLAN = TPPlan(_mlp_plan, _mlp_check)


# ---- loss over vocab-sharded logits ------------------------------------------------------

def cross_entropy(logits, labels: torch.Tensor, z_loss: float = 0.0, ignore_index: int = -100,
                  reduction: str = "mean") -> torch.Tensor:
    """Token cross-entropy; vocab-sharded DTensor logits never get gathered.

    For DTensor logits the caller must hold ``torch.distributed.tensor.parallel.loss_parallel()``
    around both this call and the backward (the runner does).
    """
    if not isinstance(logits, DTensor):
        return kernels.cross_entropy(logits, labels, ignore_index=ignore_index, z_loss=z_loss,
                                     reduction=reduction)
    logits = logits.float().flatten(0, -2)
    labels = labels.reshape(-1)
    valid = labels != ignore_index
    total = torch.nn.functional.cross_entropy(logits, labels, ignore_index=ignore_index,
                                              reduction="sum")
    total = total.to_local() if isinstance(total, DTensor) else total
    if z_loss:
        # logsumexp over the sharded vocab: max and sum reduce across tp as DTensor partials
        m = logits.detach().amax(-1, keepdim=True).redistribute(placements=[Replicate()])
        s = (logits - m).exp().sum(-1).redistribute(placements=[Replicate()])
        lse = (s.to_local().log() + m.to_local().squeeze(-1))
        total = total + z_loss * (lse.pow(2) * valid).sum()
    if reduction == "sum":
        return total
    return total / valid.sum().clamp(min=1)
