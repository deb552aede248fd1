"""Parallel layouts, workloads and software recipes the planner evaluates."""

from __future__ import annotations

from dataclasses import dataclass, field

from pretrain.config import Config


@dataclass(frozen=True)
class Layout:
    """One way to lay a run out: mesh sizes, data-parallel sharding, pipeline schedule,
    micro-batch and recomputation. ``zero``: 0 replicated (DDP), 1/2 ZeRO stages (optimizer
    / +gradients sharded over dp), 3 fully sharded (FSDP over ``dp_shard``; HSDP when
    ``dp_replicate`` > 1 as well)."""

    tp: int = 1
    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int = 1
    ep: int = 1
    cp: int = 1
    cp_mode: str = "ring"  # ring | alltoall (context parallel attention)
    zero: int = 3
    schedule: str = "1f1b"
    vpp: int = 1  # stages per pp rank
    micro_batch: int = 1  # sequences per forward on one rank
    sp: bool = False
    ac: str = "off"  # off | full | every_n
    ac_every: int = 2

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def world(self) -> int:
        return self.pp * self.dp * self.cp * self.tp

    @property
    def dims(self) -> list[int]:
        """Mesh sizes in ``parallel.MESH_DIMS`` order (pp, dp_replicate, dp_shard, cp, tp)."""
        return [self.pp, self.dp_replicate, self.dp_shard, self.cp, self.tp]

    @property
    def dp_kind(self) -> str:
        if self.dp == 1:
            return "-"
        if self.zero == 3:
            return "hsdp" if self.dp_replicate > 1 and self.dp_shard > 1 else "fsdp"
        return "ddp" if self.zero == 0 else f"zero{self.zero}"

    @property
    def name(self) -> str:
        parts = [f"tp{self.tp}" + ("+sp" if self.sp else ""), f"pp{self.pp}"]
        if self.pp > 1:
            parts[-1] += f"({self.schedule}" + (f",v{self.vpp}" if self.vpp > 1 else "") + ")"
        dp = f"dp{self.dp}"
        if self.dp > 1:
            dp += f"({self.dp_kind}" + (f" {self.dp_replicate}x{self.dp_shard}"
                                        if self.dp_kind == "hsdp" else "") + ")"
        parts.append(dp)
        if self.ep > 1:
            parts.append(f"ep{self.ep}")
        if self.cp > 1:
            parts.append(f"cp{self.cp}" + ("(a2a)" if self.cp_mode == "alltoall" else ""))
        parts.append(f"mb{self.micro_batch}")
        if self.ac != "off":
            parts.append("ac" + ("" if self.ac == "full" else f"/{self.ac_every}"))
        return " ".join(parts)

    def overrides(self, n_micro: int = 0) -> list[str]:
        """The config overrides that select this layout (``n_micro``: pipeline micro-batches
        per step, pinned with pp > 1 so the trainer runs the micro-batches planned)."""
        ov = {"parallel.tp": self.tp, "parallel.pp": self.pp, "train.micro_batch": self.micro_batch,
              "train.activation_checkpointing": self.ac}
        if self.ep > 1:
            ov["parallel.ep"] = self.ep
        if self.cp > 1:
            ov["parallel.cp"] = self.cp
            ov["parallel.cp_mode"] = self.cp_mode
        if self.tp > 1:
            ov["parallel.sequence_parallel"] = str(self.sp).lower()
        if self.zero in (1, 2):
            ov.update({"parallel.dp_engine": "deepspeed", "parallel.zero_stage": self.zero,
                       "parallel.dp_replicate": 1, "parallel.dp_shard": self.dp})
        elif self.zero == 0:
            ov.update({"parallel.dp_replicate": self.dp, "parallel.dp_shard": 1})
        else:
            ov.update({"parallel.dp_replicate": self.dp_replicate, "parallel.dp_shard": self.dp_shard})
        if self.pp > 1:
            ov.update({"parallel.pp_schedule": self.schedule, "parallel.pp_virtual_stages": self.vpp})
            if n_micro:
                ov["parallel.pp_microbatches"] = n_micro
        if self.ac == "every_n":
            ov["train.ac_every"] = self.ac_every
        return [f"--{k}={v}" for k, v in ov.items()]


@dataclass(frozen=True)
class Workload:
    seq_len: int
    global_batch: int  # sequences per optimizer step
    fused_loss: bool = False
    optimizer: str = "adamw"  # optim.name (muon adds Newton-Schulz work and its exchange)

    def micro_batches(self, layout: Layout) -> int:
        """Micro-batches per rank per step (0 when the batch does not divide)."""
        per_replica, rem = divmod(self.global_batch, layout.dp)
        if rem or per_replica % layout.micro_batch:
            return 0
        return per_replica // layout.micro_batch


@dataclass(frozen=True)
class Recipe:
    """How the software stores and moves things (bytes per element, overlaps)."""

    name: str
    param_bytes: int = 4  # stored parameters
    compute_param_bytes: int = 4  # the gathered copy forward/backward use (FSDP mixed precision)
    grad_bytes: int = 4
    master_bytes: int = 0  # separate fp32 master weights (0: the parameters are fp32)
    zero_master_bytes: int = 4  # ZeRO-1/2 (DeepSpeed) keep an fp32 partition even of fp32 params
    optim_bytes: int = 8  # AdamW exp_avg + exp_avg_sq
    stream_bytes: int = 4  # residual stream dtype
    act_bytes: int = 4  # activations inside sublayers
    tp_overlap: str = "none"  # none | ladder (next sublayer hides the reduction) | full
    ladder_from: int = 0
    accumulate_unsharded: bool = True  # FSDP2 no-sync micro-batches keep unsharded grads
    p2p_overlap: bool = False  # pipeline sends/receives hidden behind compute
    ce_bytes: int = 48  # HBM bytes per logit of the (unfused) cross-entropy, fwd + bwd
    # With sequence parallel, a column-parallel linear saves its input sharded over tp and
    # all-gathers it again in backward (Megatron-LM); torch's SequenceParallel saves the
    # gathered input (this trainer).
    sp_sharded_input: bool = False
    # Data-parallel overlap: "last_backward" (gradient reduction hidden behind the last
    # micro-batch's backward only, parameter gathers before the step's first forward) or
    # "per_chunk" (Megatron's --overlap-grad-reduce / --overlap-param-gather: each model
    # chunk reduces once its last backward is done and gathers just before its first forward).
    dp_overlap: str = "last_backward"
    # The pure-torch reference kernels (CPU) keep more for backward than fused ones: the
    # norm's fp32 intermediate, SiLU's output, KV heads repeated to the query heads.
    reference_kernels: bool = False


def project_recipe(cfg: Config) -> Recipe:
    """This project's trainer: fp32 parameters, gradients and AdamW states; bf16 compute with
    ``train.dtype=bf16`` (autocast) or ``parallel.mixed_precision=bf16`` (FSDP param dtype)."""
    mp = cfg.parallel.mixed_precision == "bf16"
    low = mp or cfg.train.dtype == "bf16"
    return Recipe("project", param_bytes=4, compute_param_bytes=2 if mp else 4, grad_bytes=4,
                  stream_bytes=2 if mp else 4, act_bytes=2 if low else 4,
                  tp_overlap="ladder" if cfg.model.residual == "ladder" else "none",
                  ladder_from=cfg.model.ladder_from)


def megatron_recipe() -> Recipe:
    """Megatron-LM with bf16 weights, fp32 gradient buffer and the distributed optimizer
    (fp32 master + AdamW sharded over dp, i.e. ZeRO-1), TP communication overlapped with
    GEMMs (``--tp-comm-overlap``)."""
    return Recipe("megatron", param_bytes=2, compute_param_bytes=2, grad_bytes=4, master_bytes=4,
                  stream_bytes=2, act_bytes=2, tp_overlap="full", accumulate_unsharded=False,
                  p2p_overlap=True, ce_bytes=64, sp_sharded_input=True, dp_overlap="per_chunk")


def config_layout(cfg: Config, world_size: int) -> Layout:
    """The layout a config asks for (``dp_shard=-1`` filled from ``world_size``)."""
    from parallel.world import resolve_layout

    p = cfg.parallel
    sizes = resolve_layout(p, world_size)  # the trainer's mesh sizes (UserError if they do not fit)
    zero = (p.zero_stage if p.dp_engine == "deepspeed" else (3 if sizes["dp_shard"] > 1 else 0))
    return Layout(tp=sizes["tp"], pp=sizes["pp"], dp_replicate=sizes["dp_replicate"],
                  dp_shard=sizes["dp_shard"], ep=p.ep, cp=p.cp, cp_mode=p.cp_mode, zero=zero,
                  schedule=p.pp_schedule, vpp=_vpp(p), micro_batch=_micro(cfg, sizes),
                  sp=p.sequence_parallel and p.tp > 1, ac=cfg.train.activation_checkpointing,
                  ac_every=cfg.train.ac_every)


def _vpp(p) -> int:
    if p.pp_schedule == "zbv":
        return 2
    return p.pp_virtual_stages if p.pp_schedule == "interleaved_1f1b" else 1


def _micro(cfg: Config, sizes: dict) -> int:
    """Sequences per forward as the trainer runs them (a pipeline re-splits the rank's rows
    into ``parallel.runner.pipeline_microbatches`` of them)."""
    from parallel.runner import pipeline_microbatches

    dp = sizes["dp_replicate"] * sizes["dp_shard"]
    rows = max(cfg.train.global_batch // max(dp, 1), 1)
    micro = cfg.train.micro_batch or rows
    if sizes["pp"] > 1:
        n = pipeline_microbatches(cfg.parallel.pp_microbatches, rows // max(micro, 1), sizes["pp"])
        micro = max(rows // n, 1)
    return micro


def workload(cfg: Config) -> Workload:
    return Workload(cfg.data.seq_len, cfg.train.global_batch, cfg.train.fused_loss, cfg.optim.name)


@dataclass
class Breakdown:
    """Named byte or second components plus notes; ``total`` sums the components."""

    parts: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(self.parts.values())
