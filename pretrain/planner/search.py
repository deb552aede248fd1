"""Enumerate the layouts of a world size, keep the ones the trainer's own check accepts,
predict memory and step time for each and rank the ones that fit."""

from __future__ import annotations

from dataclasses import dataclass, field

from models.config import ModelConfig
from pretrain.errors import UserError
from pretrain.planner import hardware as hw
from pretrain.planner.cp import cp_choices
from pretrain.planner.layout import Layout, Recipe, Workload
from pretrain.planner.memory import rank_memory, state_bytes
from pretrain.planner.timing import StepEstimate, estimate


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def supported(cfg: ModelConfig, layout: Layout, wl: Workload, base=None) -> str | None:
    """Why the trainer would refuse to run ``layout`` (with the rest of ``base``, a Config),
    or None: the trainer's own start-up check (``pretrain.layout_check.check_run``), the
    planner's only notion of what is runnable."""
    from pretrain.layout_check import check_run

    try:
        check_run(layout_config(cfg, layout, wl, base), layout.world)
    except UserError as e:
        return str(e)
    return None


def layout_config(cfg: ModelConfig, layout: Layout, wl: Workload, base=None):
    """The run Config that selects ``layout`` for ``wl`` (other settings from ``base``)."""
    from dataclasses import replace as _replace

    from pretrain.config import Config

    base = base or Config()
    n_micro = wl.micro_batches(layout)
    train = _replace(base.train, global_batch=wl.global_batch, micro_batch=layout.micro_batch,
                     activation_checkpointing=layout.ac, ac_every=layout.ac_every)
    return _replace(base, model=cfg, train=train, data=_replace(base.data, seq_len=wl.seq_len),
                    parallel=_pcfg(layout, base.parallel, n_micro))


def _pcfg(layout: Layout, base=None, n_micro: int = 0):
    from dataclasses import replace as _replace

    from parallel.config import ParallelConfig

    engine = "deepspeed" if layout.zero in (1, 2) else "fsdp"
    dp_rep, dp_shard = (layout.dp, 1) if layout.zero == 0 else (layout.dp_replicate, layout.dp_shard)
    return _replace(base or ParallelConfig(), dp_replicate=dp_rep, dp_shard=dp_shard, tp=layout.tp, pp=layout.pp,
                          cp=layout.cp, cp_mode=layout.cp_mode, ep=layout.ep, sequence_parallel=layout.sp,
                          pp_schedule=layout.schedule, dp_engine=engine,
                          pp_virtual_stages=layout.vpp if layout.schedule == "interleaved_1f1b" else 1,
                          pp_microbatches=n_micro if layout.pp > 1 else 0,
                          zero_stage=layout.zero if layout.zero in (1, 2) else 2)


@dataclass
class Plan:
    layout: Layout
    memory: list  # Breakdown per pp rank
    estimate: StepEstimate | None
    fits: bool
    problem: str | None = None  # refused by the trainer's check, or does not fit in memory
    unsupported: str | None = None  # the trainer's refusal (pretrain.layout_check.check_run)
    notes: list[str] = field(default_factory=list)
    n_micro: int = 0  # micro-batches per rank per step

    @property
    def peak_bytes(self) -> float:
        return max((b.total for b in self.memory), default=0.0)

    @property
    def state_bytes(self) -> float:
        return max((state_bytes(b) for b in self.memory), default=0.0)


def evaluate(cfg: ModelConfig, layout: Layout, wl: Workload, dev: hw.Device, recipe: Recipe,
             base=None) -> Plan:
    """Memory and step time of ``layout`` (``base``: the run Config, for its other settings);
    a layout the trainer refuses gets no estimate, only the trainer's message."""
    refused = supported(cfg, layout, wl, base)
    if refused:
        return Plan(layout, [], None, False, refused, unsupported=refused)
    mem = rank_memory(cfg, layout, wl, recipe)
    est = estimate(cfg, layout, wl, dev, recipe)
    plan = Plan(layout, mem, est, True, n_micro=wl.micro_batches(layout))
    if plan.peak_bytes > dev.usable_bytes:
        plan.fits = False
        plan.problem = (f"needs {plan.peak_bytes / 2**30:.1f} GiB per rank, "
                        f"{dev.usable_bytes / 2**30:.1f} GiB usable")
    for b in mem:
        plan.notes += [n for n in b.notes if n not in plan.notes]
    return plan


def enumerate_layouts(cfg: ModelConfig, world: int, wl: Workload, dev: hw.Device,
                      zero_stages=(0, 1, 2, 3), micro_batches=(1, 2, 4, 8),
                      recompute=("off", "full"), schedules=("1f1b", "interleaved_1f1b", "zbv"),
                      max_ep: int = 64) -> list[Layout]:
    """Candidate layouts of ``world`` ranks (tp inside a node; sequence parallel with tp)."""
    out = []
    n_sub = cfg.n_sublayers
    has_moe = "moe" in cfg.sublayer_kinds
    for tp in divisors(world):
        if tp > dev.gpus_per_node:
            continue
        for pp in divisors(world // tp):
            if pp > n_sub:
                continue
            for cp in cp_choices(cfg, wl, world // (tp * pp)):  # long sequences only
                for mode in (("ring", "alltoall") if cp > 1 else ("ring",)):
                    out += _layouts(cfg, world // (tp * pp * cp), tp, pp, cp, mode, dev, zero_stages,
                                    micro_batches, recompute, schedules, max_ep, n_sub, has_moe)
    return out


def _layouts(cfg, dp, tp, pp, cp, cp_mode, dev, zero_stages, micro_batches, recompute, schedules,
             max_ep, n_sub, has_moe) -> list[Layout]:
    """The candidates of one (tp, pp, cp) with ``dp`` data-parallel ranks."""
    out = []
    dp_splits = [(1, dp, z) for z in zero_stages if dp > 1 or z == 3] if dp > 1 else [(1, 1, 3)]
    if dp > 1 and 3 in zero_stages:
        nodes_span = max(1, dp * tp // dev.gpus_per_node)
        inner = dp // nodes_span
        if 1 < inner < dp and dp % inner == 0:
            dp_splits.append((dp // inner, inner, 3))  # HSDP: shard inside a node
    if cp > 1:  # the trainer shards over dp_shard x cp (FSDP) whenever cp > 1
        dp_splits = [d for d in dp_splits if d[2] == 3] or [(1, dp, 3)]
    scheds = [("1f1b", 1)] if pp == 1 else \
        [(s, v) for s in schedules for v in ((2,) if s != "1f1b" else (1,))
         if pp * v <= n_sub]
    eps = [e for e in divisors(dp) if e <= max_ep and has_moe
           and cfg.moe.n_experts % e == 0] or [1]
    for rep, shard, zero in dp_splits:
        for sched, vpp in scheds:
            for mb in micro_batches:
                for ac in recompute:
                    for ep in eps:
                        if ep > 1 and (zero != 3 or (shard * cp) % ep):
                            continue
                        out.append(Layout(tp=tp, pp=pp, dp_replicate=rep, dp_shard=shard,
                                          ep=ep, cp=cp, cp_mode=cp_mode, zero=zero, schedule=sched, vpp=vpp,
                                          micro_batch=mb, sp=tp > 1, ac=ac))
    return out


def rank(cfg: ModelConfig, world: int, wl: Workload, dev: hw.Device, recipe: Recipe,
         layouts: list[Layout] | None = None, base=None, **kw) -> list[Plan]:
    """Every candidate evaluated; the ones that fit first, fastest first."""
    layouts = layouts if layouts is not None else enumerate_layouts(cfg, world, wl, dev, **kw)
    plans = [evaluate(cfg, lay, wl, dev, recipe, base) for lay in layouts]
    plans.sort(key=lambda p: (not p.fits, p.estimate.step_s if p.estimate else float("inf"),
                              p.peak_bytes))
    return plans
