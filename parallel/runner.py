"""The forward/backward of one optimizer step, loss reduction and gradient clipping.

``ParallelModel`` is what the trainer sees: the model part(s) this rank holds and
how to run a step over micro-batches. ``PipelineModel`` runs the step through a
torch pipeline schedule instead. The trainer code is the same for every layout.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager, nullcontext

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.placement_types import _StridedShard

import kernels
from models.errors import UserError
from parallel import tp as tp_mod
from parallel.fsdp import set_gradient_sync
from parallel.world import World


def lm_loss(model: nn.Module, batch: dict, z_loss: float = 0.0, fused: bool = False) -> torch.Tensor:
    """Mean next-token cross-entropy of one micro-batch (+ MoE auxiliary losses), for an
    unwrapped single-device model."""
    if fused:
        h = model.hidden_states(batch["input_ids"], batch.get("doc_ids"))
        loss = kernels.linear_cross_entropy(h.flatten(0, 1), model.output.weight,
                                            batch["labels"].flatten(), z_loss=z_loss)
    else:
        logits = model(batch["input_ids"], batch.get("doc_ids"))
        loss = kernels.cross_entropy(logits, batch["labels"], z_loss=z_loss)
    return loss + aux_losses(model)


def aux_losses(model: nn.Module) -> torch.Tensor | float:
    """Auxiliary losses the model's sublayers collected during forward (MoE routing), as
    ``models.moe.collect_aux_losses``: modules in ``aux_loss_mode = "attach"`` inject theirs
    in backward themselves and are skipped."""
    total = 0.0
    for m in model.modules():
        aux = getattr(m, "aux_loss", None)
        if isinstance(aux, torch.Tensor) and getattr(m, "aux_loss_mode", "collect") != "attach":
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


class ParallelModel:
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
        if self.fused_loss:
            loss = model(mb["input_ids"], labels=mb["labels"], **kwargs).reshape(())
        else:
            logits = model(mb["input_ids"], **kwargs)
            loss = tp_mod.cross_entropy(logits, mb["labels"], z_loss=self.z_loss if with_aux else 0.0)
        if not with_aux:
            return loss
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
        dup = 1 if self.sequence_parallel else w.tp_size  # tp ranks without SP route the same tokens

        def all_reduce(t: torch.Tensor) -> torch.Tensor:
            if w.distributed:
                dist.all_reduce(t, group=self._load_group)
            return t / dup

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


class PipelineModel(ParallelModel):
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
        from parallel.pipeline import attach_aux_losses

        for part in parts:
            attach_aux_losses(part, self._aux, scale=self.cp.size if self.cp is not None else 1.0)

    def _loss_fn(self, out, labels):
        if self.fused_loss:
            loss = out.reshape(())  # the head already returned the loss
        else:
            z = self.z_loss if torch.is_grad_enabled() else 0.0  # held-out loss: no z-loss
            loss = tp_mod.cross_entropy(out, labels, z_loss=z)
        if self.cp is not None and torch.is_grad_enabled():  # context parallel: global mean
            loss = loss * self.cp.loss_scale(labels)
        return loss

    def _schedule(self, n_micro: int):
        from torch.distributed.pipelining import PipelineStage

        from parallel.pipeline import build_schedule

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

