"""DeepSpeed ZeRO as the data-parallel engine (``parallel.dp_engine: deepspeed``).

The same single-device model is wrapped by a DeepSpeed engine with ZeRO stage 1, 2 or 3
(``parallel.zero_stage``; ``parallel.offload_optimizer`` keeps the optimizer state in CPU
memory) instead of FSDP2. The trainer sees a :class:`DeepSpeedRunner`, a runner
(``parallel.runner.Runner``) whose ``forward_backward`` runs the micro-batches through
``engine.backward`` (gradient accumulation and the ZeRO reduction are the engine's) and
whose ``optimizer_step`` is ``engine.step`` (global-norm clipping to ``optim.grad_clip``,
the AdamW update, and a skipped update when the gradients are not finite).

The optimizer is the trainer's own ``torch.optim.AdamW``, handed to DeepSpeed as a client
optimizer: ZeRO re-points its parameter groups at the flat fp32 partitions, so the
trainer's lr scheduler keeps driving it, and no DeepSpeed C++ op is ever compiled.

Checkpoints (``checkpoints/step_N/``, written atomically like every checkpoint):
- ``model.*`` in torch.distributed.checkpoint format, the full weights, as in any other
  run, so ``pretrain eval|generate|export`` and ``checkpoint.init_from`` read them (ZeRO-3
  gathers each parameter for the save);
- ``deepspeed/state/``: DeepSpeed's own checkpoint (ZeRO-partitioned fp32 master weights and
  optimizer state, one file per rank), which resuming loads. ZeRO partitions depend on
  the number of processes, so a DeepSpeed run resumes with the same world size.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch import nn

from models.config import UserError
from parallel.apply import apply_activation_checkpointing, apply_compile
from parallel.config import ParallelConfig
from parallel.head import make_fused_head, accept_stage_inputs
from parallel.init import is_meta, materialize
from parallel.runner import PlainRunner, ReadCheckpoint, WriteCheckpoint, aux_losses
from parallel.world import World

STATE_DIR = "deepspeed"
STATE_TAG = "state"


def check_layout(pcfg: ParallelConfig, world: World) -> None:
    """DeepSpeed here is pure data parallelism over all ranks (UserError otherwise)."""
    if not world.distributed:
        raise UserError("parallel.dp_engine=deepspeed: needs at least 2 processes (ZeRO partitions "
                          "over data-parallel ranks); start them with `pretrain launch local --nproc N`")
    for key in ("tp", "pp", "cp", "ep", "dp_replicate"):
        if getattr(pcfg, key) != 1:
            raise UserError(f"parallel.{key}: must be 1 with parallel.dp_engine=deepspeed "
                              f"(DeepSpeed ZeRO shards over all ranks; use dp_engine=fsdp for "
                              f"tensor/pipeline/hybrid layouts)")
    if pcfg.mixed_precision != "fp32":
        raise UserError("parallel.mixed_precision: only fp32 with parallel.dp_engine=deepspeed "
                          "(use train.dtype=bf16 for bf16 autocast compute)")


MISSING = "parallel.dp_engine=deepspeed needs the deepspeed package (pip install 'pretrain[deepspeed]')"


def _import_deepspeed():
    try:
        import deepspeed
    except ImportError:
        raise UserError(MISSING) from None
    from deepspeed.accelerator import get_accelerator
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    if get_accelerator().device_name() == "cpu":
        import deepspeed.ops

        # DeepSpeed's CPU backend JIT-compiles an optional shared-memory all-reduce (minutes
        # of C++ on first use); gloo does the same job here.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def deepspeed_parallelize(model: nn.Module, pcfg: ParallelConfig, world: World, *, micro_batch: int,
                          accumulation: int, grad_clip: float, ac: str = "off", ac_every: int = 2,
                          compile: bool = False, z_loss: float = 0.0, fused_loss: bool = False,
                          autocast_dtype: torch.dtype | None = None, seed: int = 0) -> "DeepSpeedRunner":
    """Prepare ``model`` as ``parallel.parallelize`` would (minus tp/pp/FSDP) for a DeepSpeed
    engine: the full model on every rank, identical initial weights from ``seed``. The layout
    passed ``check_layout`` before the process group started (``pretrain.layout_check``)."""
    if fused_loss:
        make_fused_head(model, z_loss)
    apply_activation_checkpointing(model, ac, ac_every)
    if compile:
        apply_compile(model)
    if is_meta(model):
        materialize(model, world.device, seed)
    accept_stage_inputs(model)
    return DeepSpeedRunner(model, pcfg, world, micro_batch=micro_batch, accumulation=accumulation,
                          grad_clip=grad_clip, z_loss=z_loss, fused_loss=fused_loss,
                          autocast_dtype=autocast_dtype)


class DeepSpeedRunner(PlainRunner):
    """One model wrapped by a DeepSpeed ZeRO engine (created by :meth:`attach_optimizer`)."""

    def __init__(self, model: nn.Module, pcfg: ParallelConfig, world: World, *, micro_batch: int,
                 accumulation: int, grad_clip: float, z_loss: float = 0.0, fused_loss: bool = False,
                 autocast_dtype: torch.dtype | None = None):
        super().__init__([model], world, z_loss=z_loss, fused_loss=fused_loss,
                         autocast_dtype=autocast_dtype)
        self.pcfg = pcfg
        self.micro_batch = micro_batch
        self.accumulation = accumulation
        self.grad_clip = grad_clip
        self.engine = None

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Create the engine around the model and ``optimizer`` (the trainer's AdamW).

        Returns the optimizer whose ``param_groups`` the lr scheduler must drive.
        """
        deepspeed = _import_deepspeed()
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())  # wraps our group
        # DeepSpeed's default buckets hold 5e8 elements (2 GB in fp32), allocated even for a
        # model a thousandth of that size: no bucket needs to exceed the model
        numel = sum(p.numel() for p in self.model.parameters())
        bucket = int(min(5e8, max(numel, 1 << 20)))
        zero = {"stage": self.pcfg.zero_stage, "contiguous_gradients": True,
                "reduce_bucket_size": bucket, "allgather_bucket_size": bucket}
        if self.pcfg.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": self.world.device.type == "cuda"}
        config = {
            "train_micro_batch_size_per_gpu": self.micro_batch,
            "gradient_accumulation_steps": self.accumulation,
            "train_batch_size": self.micro_batch * self.accumulation * self.world.world_size,
            "gradient_clipping": self.grad_clip,
            "zero_optimization": zero,
            # the client optimizer is torch's AdamW; DeepSpeed would otherwise insist on its
            # compiled CPU Adam for offload
            "zero_allow_untested_optimizer": True,
            "zero_force_ds_cpu_optimizer": False,
            "steps_per_print": 2**62,
            "wall_clock_breakdown": False,
        }
        self.engine, _, _, _ = deepspeed.initialize(model=self.model, optimizer=optimizer,
                                                    config=config)
        self.optimizer = optimizer
        return optimizer

    # ---- the step ----------------------------------------------------------------------

    def _micro_loss(self, mb: dict, with_aux: bool = True) -> torch.Tensor:
        from parallel import tp as tp_mod

        call = self.engine if self.engine is not None else self.model
        kwargs = {"doc_ids": mb["doc_ids"]} if mb.get("doc_ids") is not None else {}
        if self.fused_loss:  # (ZeRO-3's module hooks hand the scalar back with shape [1])
            loss = call(mb["input_ids"], labels=mb["labels"], **kwargs).reshape(())
        else:
            logits = call(mb["input_ids"], **kwargs)
            loss = tp_mod.cross_entropy(logits, mb["labels"], z_loss=self.z_loss if with_aux else 0.0)
        return loss + aux_losses(self.model) if with_aux else loss

    def forward_backward(self, micro_batches: list[dict]) -> torch.Tensor:
        """Backward of every micro-batch through the engine; the last one is the accumulation
        boundary, whose reduction leaves the gradients ready for :meth:`optimizer_step`."""
        n = len(micro_batches)
        if n != self.accumulation:
            raise UserError(f"train.micro_batch: {n} micro-batches per step, but the DeepSpeed "
                              f"engine was built for {self.accumulation}")
        total = torch.zeros((), device=self.world.device)
        for i, mb in enumerate(micro_batches):
            with self.autocast():
                loss = self._micro_loss(self._to_device(mb))
            self.engine.backward(loss)  # scales by 1/accumulation itself
            if i < n - 1:
                self.engine.step()  # not a boundary: only advances the engine's micro-step count
            total += loss.detach().float() / n
        return total

    def optimizer_step(self, max_norm: float, skip: bool) -> tuple[float, bool]:
        """Clip and apply the update (``engine.step``); returns (grad norm, whether applied).

        ``skip`` discards this step's gradients (a non-finite loss): they are replaced by NaN
        so that the engine's own overflow check drops the update and clears its buffers.
        """
        del max_norm  # the engine clips to the gradient_clipping it was configured with
        if skip:
            from deepspeed.utils import safe_set_full_grad

            for p in self.model.parameters():
                shape = tuple(getattr(p, "ds_shape", p.shape))
                safe_set_full_grad(p, torch.full(shape, float("nan"), device=p.device,
                                                 dtype=torch.float32))
        self.engine.step()  # (clears the gradients, also of a skipped update)
        norm = self.engine.get_global_grad_norm()
        norm = float("nan") if norm is None else float(norm)
        applied = bool(self.engine.was_step_applied())
        if applied:
            self.after_optimizer_step()
        return norm, applied

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        raise RuntimeError("DeepSpeedRunner clips inside optimizer_step()")

    @torch.no_grad()
    def eval_loss(self, batch: dict) -> tuple[torch.Tensor, int]:
        batch = self._to_device(batch)
        with self.autocast():
            loss = self._micro_loss(batch, with_aux=False)
        n = int((batch["labels"] != -100).sum())
        return loss.float() * n, n

    def train(self, mode: bool = True) -> None:
        (self.engine if self.engine is not None else self.model).train(mode)

    # ---- checkpoints -------------------------------------------------------------------

    @contextmanager
    def checkpoint_parts(self):
        """The model part(s) with full (gathered) parameters, for the weights in DCP format."""
        if self.pcfg.zero_stage == 3:
            import deepspeed

            ctx = deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=None)
        else:
            ctx = nullcontext()
        with ctx:
            yield self.parts

    def save_checkpoint(self, write: WriteCheckpoint) -> Path:
        """The full weights in the trainer's format, the optimizer state in DeepSpeed's."""
        with self.checkpoint_parts() as parts:
            return write(parts, None, self._save_state)

    def load_checkpoint(self, read: ReadCheckpoint, ckpt_dir: Path, saved_world_size: int | None) -> dict:
        """Trainer state and RNG from the trainer's format; weights and optimizer state from
        DeepSpeed's (its fp32 master copy is what the update continues from)."""
        state = read([], None)
        self._load_state(ckpt_dir, saved_world_size)
        return state

    def _save_state(self, ckpt_dir: Path) -> None:
        """Write DeepSpeed's own checkpoint (all ranks) into ``ckpt_dir/deepspeed``."""
        self.engine.save_checkpoint(str(Path(ckpt_dir) / STATE_DIR), tag=STATE_TAG, save_latest=False)

    def _load_state(self, ckpt_dir: Path, saved_world_size: int | None) -> None:
        """Restore weights and optimizer state written by :meth:`_save_state`."""
        path = Path(ckpt_dir) / STATE_DIR / STATE_TAG
        if not path.is_dir():
            raise UserError(f"checkpoint {ckpt_dir} has no DeepSpeed state ({STATE_DIR}/{STATE_TAG}); "
                            f"it was not written with parallel.dp_engine=deepspeed (use "
                            f"checkpoint.init_from to start from its weights)")
        if saved_world_size is not None and saved_world_size != self.world.world_size:
            raise UserError(f"checkpoint {ckpt_dir}: DeepSpeed ZeRO state was saved by "
                            f"{saved_world_size} processes; resume it with the same number "
                            f"(this run has {self.world.world_size}), or start from its weights "
                            f"with checkpoint.init_from")
        loaded, _ = self.engine.load_checkpoint(str(Path(ckpt_dir) / STATE_DIR), tag=STATE_TAG,
                                                load_optimizer_states=True,
                                                load_lr_scheduler_states=False)
        if loaded is None:
            raise UserError(f"checkpoint {ckpt_dir}: DeepSpeed could not load {path}")
