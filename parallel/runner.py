"""The runner interface every engine implements, and the plain (FSDP2/TP) runner.

A runner is what the trainer sees: the model part(s) this rank holds, how to run one
optimizer step over micro-batches, and what a checkpoint of it holds. :class:`Runner`
lists the methods; ``PlainRunner`` implements them for ``parallel.parallelize``,
``parallel.pipeline.PipelineRunner`` runs its step through a pipeline schedule and
``parallel.deepspeed_engine.DeepSpeedRunner`` through a DeepSpeed engine. The trainer code
is the same for every engine and layout.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.placement_types import _StridedShard

from models.errors import UserError
from parallel import tp as tp_mod
from parallel.fsdp import set_gradient_sync
from parallel.mtp import mtp_kwargs, take_mtp_loss
from parallel.world import World

# write(parts, optimizer, extra) -> checkpoint path; read(parts, optimizer) -> trainer state
WriteCheckpoint = Callable[[list, torch.optim.Optimizer | None, Callable[[Path], None] | None], Path]
ReadCheckpoint = Callable[[list, torch.optim.Optimizer | None], dict]


def aux_losses(model: nn.Module) -> torch.Tensor | float:
    """Sum of the auxiliary losses ``model``'s sublayers set in their last forward (the
    ``aux_loss`` attribute MoE declares); 0.0 without any. Added to each micro-batch's loss,
    or injected through each pipeline stage's output (``parallel.pipeline``)."""
    total = 0.0
    for m in model.modules():
        aux = getattr(m, "aux_loss", None)
        if isinstance(aux, torch.Tensor):
            total = total + aux
    return total


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _replicas(p: torch.Tensor, ranks_per_stage: int) -> int:
    """How many ranks of this pipeline stage hold the same values as this rank's shard of ``p``."""
    if not isinstance(p, DTensor):
        return ranks_per_stage
    shards = 1
    for size, pl in zip(p.device_mesh.shape, p.placements):
        if pl.is_shard() or isinstance(pl, _StridedShard):  # FSDP over tp uses strided shards
            shards *= size
    return ranks_per_stage // shards


def _stage_group(world: World, parts: list[nn.Module]):
    """Process group of the ranks holding this rank's pipeline stage (None: the whole world),
    created only for MoE models under pipeline parallel (every rank must call this)."""
    if world.pp_size == 1 or not world.distributed:
        return None
    if "moe" not in getattr(parts[0].cfg, "sublayer_kinds", ()):
        return None
    ranks = [world.mesh.mesh[i].flatten().tolist() for i in range(world.pp_size)]
    group, _ = dist.new_subgroups_by_enumeration(ranks)
    return group


class Runner(ABC):
    """What the trainer calls on every engine (so it never asks which engine it has).

    Order per run: build -> :meth:`attach_optimizer` -> (:meth:`load_checkpoint`) -> per
    step :meth:`forward_backward`, :meth:`reduce_loss`, :meth:`optimizer_step`,
    :meth:`step_metrics`; :meth:`save_checkpoint` and :meth:`eval_loss` between steps.
    """

    parts: list[nn.Module]  # this rank's model part(s): one per pipeline stage it holds
    world: World

    @abstractmethod
    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Take the trainer's optimizer (built over ``parts``); returns the optimizer whose
        ``param_groups`` the lr scheduler drives."""

    @abstractmethod
    def forward_backward(self, micro_batches: list[dict]) -> torch.Tensor:
        """Accumulate one step's gradients; returns this rank's mean loss (detached)."""

    @abstractmethod
    def reduce_loss(self, loss: torch.Tensor) -> float:
        """The step's loss as every rank reports it."""

    @abstractmethod
    def optimizer_step(self, max_norm: float, skip: bool) -> tuple[float, bool]:
        """Clip the gradients to global norm ``max_norm`` and apply the update unless ``skip``
        or the norm is not finite; clear the gradients; run the after-step hooks of an
        applied update. Returns (grad norm before clipping, whether the update was applied)."""

    @abstractmethod
    def eval_loss(self, batch: dict) -> tuple[torch.Tensor, int]:
        """Summed token loss and token count of one held-out batch (no auxiliary losses)."""

    @abstractmethod
    def train(self, mode: bool = True) -> None:
        """Training (dropout, MoE load counts) or evaluation mode."""

    @abstractmethod
    def step_metrics(self) -> dict:
        """Extra per-step metrics (e.g. MoE expert load)."""

    @abstractmethod
    def checkpoint_parts(self):
        """Context manager: the parts with the parameters a checkpoint or weight export
        holds (gathered where the engine partitions them)."""

    @abstractmethod
    def save_checkpoint(self, write: WriteCheckpoint) -> Path:
        """Save through ``write(parts, optimizer, extra)`` (the trainer's checkpoint format):
        which parts and optimizer state go into it, and ``extra(ckpt_dir)`` for files of the
        engine's own (None: none)."""

    @abstractmethod
    def load_checkpoint(self, read: ReadCheckpoint, ckpt_dir: Path, saved_world_size: int | None) -> dict:
        """Restore what :meth:`save_checkpoint` saved, reading the trainer's format through
        ``read(parts, optimizer)``; returns the trainer state ``read`` returned."""


class PlainRunner(Runner):
    """This rank's model part(s) and how to run one optimizer step over micro-batches."""

    def __init__(self, parts: list[nn.Module], world: World, *, z_loss: float = 0.0,
                 fused_loss: bool = False, autocast_dtype: torch.dtype | None = None,
                 sequence_parallel: bool = False, cp=None):
        self.parts = parts
        self.cp = cp  # parallel.context_parallel.CPPlan (None: no context parallelism)
        self.world = world
        self.z_loss = z_loss
        self.fused_loss = fused_loss
        self.autocast_dtype = autocast_dtype
        self.sequence_parallel = sequence_parallel and world.tp_size > 1
        self._load_group = _stage_group(world, parts)  # MoE: where expert loads are summed
        self.optimizer: torch.optim.Optimizer | None = None

    @property
    def model(self) -> nn.Module:
        return self.parts[0]

    def autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.world.device.type, dtype=self.autocast_dtype)

    def loss_context(self):
        """Forward and backward run inside this (loss-parallel cross-entropy under tp)."""
        if self.world.tp_size > 1 and not self.fused_loss:
            from torch.distributed.tensor.parallel import loss_parallel

            return loss_parallel()
        return nullcontext()

    @contextmanager
    def _eval_heads(self):
        """Held-out loss is plain cross-entropy: no z-loss in the fused heads meanwhile."""
        from parallel.head import FusedLossHead

        heads = [m for part in self.parts for m in part.modules() if isinstance(m, FusedLossHead)]
        saved = [h.z_loss for h in heads]
        for h in heads:
            h.z_loss = 0.0
        try:
            yield
        finally:
            for h, z in zip(heads, saved):
                h.z_loss = z

    def _to_device(self, batch: dict) -> dict:
        if self.cp is not None:  # context parallel: this rank's two chunks of every row
            batch = self.cp.split(batch)
        return {k: v.to(self.world.device, non_blocking=True) for k, v in batch.items()}

    def _micro_loss(self, mb: dict, with_aux: bool = True) -> torch.Tensor:
        model = self.model
        kwargs = {"doc_ids": mb["doc_ids"]} if mb.get("doc_ids") is not None else {}
        kwargs.update(mtp_kwargs(model, mb))  # multi-token prediction: its targets
        if self.fused_loss:
            loss = model(mb["input_ids"], labels=mb["labels"], **kwargs).reshape(())
        else:
            logits = model(mb["input_ids"], **kwargs)
            loss = tp_mod.cross_entropy(logits, mb["labels"], z_loss=self.z_loss if with_aux else 0.0)
        if not with_aux:
            return loss
        loss = loss + take_mtp_loss(self.parts)  # the MTP depths' weighted loss (parallel/mtp.py)
        if self.cp is not None:  # the global batch's mean (see parallel/context_parallel.py)
            return loss * self.cp.loss_scale(mb["labels"]) + self.cp.scale_aux(aux_losses(model))
        return loss + aux_losses(model)

    def forward_backward(self, micro_batches: list[dict]) -> torch.Tensor:
        """Accumulate gradients over ``micro_batches``; returns this rank's mean loss (detached).

        Data-parallel gradients are reduced once, in the last micro-batch's backward.
        """
        n = len(micro_batches)
        total = torch.zeros((), device=self.world.device)
        for i, mb in enumerate(micro_batches):
            mb = self._to_device(mb)
            set_gradient_sync(self.parts, i == n - 1)
            with self.loss_context():
                with self.autocast():
                    loss = self._micro_loss(mb)
                (loss / n).backward()
            total += loss.detach().float() / n
        self.finalize_grads()
        return total

    def finalize_grads(self) -> None:
        """Give every DTensor gradient its parameter's layout where no FSDP did: sums the
        partial tp gradients (sequence-parallel norms, replicated KV projections) and
        shards replicated ones (vocab-parallel embedding)."""
        from parallel.expert_parallel import reduce_expert_grads

        reduce_expert_grads(self.parts, self.world)  # expert parallel: tp sum (SP) and 1/ep
        for part in self.parts:
            for p in part.parameters():
                g = p.grad
                if isinstance(g, DTensor) and g.placements != p.placements:
                    p.grad = g.redistribute(placements=p.placements)

    @torch.no_grad()
    def eval_loss(self, batch: dict) -> tuple[torch.Tensor, int]:
        """Summed token loss and (non-ignored) token count of one batch (no auxiliary losses)."""
        batch = self._to_device(batch)
        with self.loss_context(), self.autocast(), self._eval_heads():
            loss = self._micro_loss(batch, with_aux=False)
        n = int((batch["labels"] != -100).sum())
        return loss.float() * n, n

    def reduce_loss(self, loss: torch.Tensor) -> float:
        """The step's loss as every rank reports it: mean over data-parallel ranks (summed
        over pipeline stages, which each hold part of it)."""
        w = self.world
        if not w.distributed:
            return float(loss)
        t = loss.detach().float().reshape(1) * (w.pp_size / w.world_size)
        dist.all_reduce(t)
        return float(t)

    def after_optimizer_step(self) -> None:
        """Hooks that run after each optimizer step: MoE aux-loss-free bias balancing from
        the expert loads summed over every rank of this pipeline stage that routed
        different tokens (dp ranks; tp ranks only with sequence parallel)."""
        from models.moe import update_expert_biases

        w = self.world
        token_copies = 1 if self.sequence_parallel else w.tp_size  # tp ranks without SP route the same tokens

        def all_reduce(t: torch.Tensor) -> torch.Tensor:
            if w.distributed:
                dist.all_reduce(t, group=self._load_group)
            return t / token_copies

        for part in self.parts:
            update_expert_biases(part, all_reduce)

    def step_metrics(self) -> dict:
        """Extra per-step metrics from the model (e.g. MoE expert load)."""
        try:
            from models.moe import moe_metrics
        except ImportError:
            return {}
        out = {}
        for part in self.parts:
            out.update(moe_metrics(part))
        if self.world.ep_size > 1:
            from parallel.expert_parallel import all_to_all_bytes

            out["moe/a2a_bytes_last_micro"] = float(sum(all_to_all_bytes(p) for p in self.parts))
        if self._load_group is not None:  # MoE under pp: rank 0 reports every stage's layers
            stages = [None] * self.world.pp_size
            dist.all_gather_object(stages, out, group=self.world.mesh.get_group("pp"))
            out = {k: v for d in stages for k, v in d.items()}
        return out

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Global L2 norm of all gradients (every shard, stage and replica counted once);
        scales them to ``max_norm`` if larger. Returns the norm before clipping."""
        w = self.world
        per_stage = max(w.world_size // w.pp_size, 1)
        grads, sq = [], torch.zeros((), dtype=torch.float32, device=w.device)
        for part in self.parts:
            for p in part.parameters():
                if p.grad is None:
                    continue
                g = _local(p.grad)
                grads.append(g)
                norm = torch.linalg.vector_norm(g, dtype=torch.float32)
                sq += norm * norm / _replicas(p.grad, per_stage)
        if w.distributed:
            dist.all_reduce(sq)
        total = sq.sqrt()
        if max_norm > 0 and grads:
            coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
            torch._foreach_mul_(grads, coef.to(grads[0].dtype))
        return total

    def train(self, mode: bool = True) -> None:
        for p in self.parts:
            p.train(mode)

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        self.optimizer = optimizer
        return optimizer

    def optimizer_step(self, max_norm: float, skip: bool) -> tuple[float, bool]:
        grad_norm = float(self.clip_grad_norm_(max_norm))
        stepped = not skip and math.isfinite(grad_norm)
        if stepped:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if stepped:
            self.after_optimizer_step()
        return grad_norm, stepped

    def checkpoint_parts(self):
        return nullcontext(self.parts)

    def save_checkpoint(self, write: WriteCheckpoint) -> Path:
        return write(self.parts, self.optimizer, None)

    def load_checkpoint(self, read: ReadCheckpoint, ckpt_dir: Path, saved_world_size: int | None) -> dict:
        return read(self.parts, self.optimizer)


def check_sequence_split(seq: int, tp: int, sequence_parallel: bool) -> None:
    """Sequence parallel slices each rank's tokens over tp (checked once, from ``data.seq_len``)."""
    if sequence_parallel and seq % tp:
        raise UserError(f"data.seq_len: {seq} must be divisible by parallel.tp={tp} "
                        f"with parallel.sequence_parallel")


def check_pipeline_rows(rows: int, n_micro: int) -> None:
    if rows % n_micro:
        raise UserError(f"parallel.pp_microbatches: {n_micro} micro-batches do not divide the "
                        f"{rows} rows per data-parallel rank")


def pipeline_microbatches(pp_microbatches: int, n_given: int, pp: int) -> int:
    """Pipeline micro-batches per step: ``parallel.pp_microbatches``, else the trainer's
    ``train.micro_batch`` slices, else (one slice) ``pp``."""
    return pp_microbatches or (n_given if n_given > 1 else pp)
