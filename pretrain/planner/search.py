"""Enumerate the layouts of a world size, check which ones the model can be divided into,
predict memory and step time for each and rank the ones that fit."""

from __future__ import annotations

from dataclasses import dataclass, field

from models.config import ConfigError, ModelConfig
from pretrain.planner import hardware as hw
from pretrain.planner.cp import cp_choices
from pretrain.planner.layout import Layout, Recipe, Workload
from pretrain.planner.memory import rank_memory, state_bytes
from pretrain.planner.timing import StepEstimate, estimate


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check(cfg: ModelConfig, layout: Layout, wl: Workload) -> str | None:
    """Why ``cfg`` cannot be laid out as ``layout`` (one line), or None."""
    from parallel.pipeline import check_pp, stages_per_rank
    from parallel.tp import check_tp

    try:
        check_tp(cfg, layout.tp)
        if layout.pp > 1:
            pcfg = _pcfg(layout)
            n_stages = layout.pp * stages_per_rank(pcfg)
            # check_pp fails only in these cases, before its (slow) balanced split
            if cfg.stage_boundaries() or n_stages > cfg.n_sublayers or cfg.tie_embeddings:
                check_pp(cfg, pcfg, layout.pp)
    except ValueError as e:  # ConfigError included
        return str(e)
    if layout.cp > 1:
        from pretrain.planner.cp import check_cp

        why = check_cp(cfg, layout, wl)
        if why:
            return why
    if layout.ep > 1:
        if "moe" not in cfg.sublayer_kinds:
            return "parallel.ep: the model has no MoE sublayers"
        if cfg.moe.n_experts % layout.ep:
            return f"parallel.ep: {layout.ep} does not divide model.moe.n_experts={cfg.moe.n_experts}"
        if (layout.dp_shard * layout.cp) % layout.ep:
            return f"parallel.ep: {layout.ep} must divide parallel.dp_shard*cp={layout.dp_shard * layout.cp}"
    if wl.global_batch % layout.dp:
        return f"train.global_batch: {wl.global_batch} is not divisible by the {layout.dp} data-parallel ranks"
    if wl.micro_batches(layout) < 1:
        return (f"train.micro_batch: {layout.micro_batch} does not divide the per-rank batch of "
                f"{wl.global_batch // layout.dp}")
    if layout.sp and wl.seq_len % layout.tp:
        return f"data.seq_len: {wl.seq_len} is not divisible by parallel.tp={layout.tp} (sequence parallel)"
    return None


def supported(layout: Layout, base=None) -> str | None:
    """Why this build's trainer cannot run ``layout`` (with the other ``parallel.*`` settings
    of ``base``, a ParallelConfig) yet; None: it can."""
    from parallel.world import resolve_layout

    p = _pcfg(layout, base)
    try:
        resolve_layout(p, layout.world)
        if p.dp_engine == "deepspeed":
            from parallel.deepspeed_engine import check_layout
            from parallel.world import World

            check_layout(p, World(world_size=layout.world))
    except ConfigError as e:
        return str(e)
    except ImportError:
        return "parallel.dp_engine=deepspeed is not available in this build"
    return None


def _pcfg(layout: Layout, base=None):
    from dataclasses import replace as _replace

    from parallel.config import ParallelConfig

    engine = "deepspeed" if layout.zero in (1, 2) else "fsdp"
    dp_rep, dp_shard = (layout.dp, 1) if layout.zero == 0 else (layout.dp_replicate, layout.dp_shard)
    return _replace(base or ParallelConfig(), dp_replicate=dp_rep, dp_shard=dp_shard, tp=layout.tp, pp=layout.pp,
                          cp=layout.cp, cp_mode=layout.cp_mode, ep=layout.ep, sequence_parallel=layout.sp,
                          pp_schedule=layout.schedule, dp_engine=engine,
                          pp_virtual_stages=layout.vpp if layout.schedule == "interleaved_1f1b" else 1,
                          zero_stage=layout.zero if layout.zero in (1, 2) else 2)


@dataclass
class Plan:
    layout: Layout
    memory: list  # Breakdown per pp rank
    estimate: StepEstimate | None
    fits: bool
    problem: str | None = None  # cannot be divided / does not fit
    unsupported: str | None = None  # valid, but this build's trainer cannot run it
    notes: list[str] = field(default_factory=list)

    @property
    def peak_bytes(self) -> float:
        return max((b.total for b in self.memory), default=0.0)

    @property
    def state_bytes(self) -> float:
        return max((state_bytes(b) for b in self.memory), default=0.0)


def evaluate(cfg: ModelConfig, layout: Layout, wl: Workload, dev: hw.Device, recipe: Recipe,
             base_parallel=None) -> Plan:
    """Memory and step time of ``layout`` (``base_parallel``: the config's other parallel.* keys)."""
    problem = check(cfg, layout, wl)
    if problem:
        return Plan(layout, [], None, False, problem)
    mem = rank_memory(cfg, layout, wl, recipe)
    est = estimate(cfg, layout, wl, dev, recipe)
    plan = Plan(layout, mem, est, True, unsupported=supported(layout, base_parallel))
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
         layouts: list[Layout] | None = None, base_parallel=None, **kw) -> list[Plan]:
    """Every candidate evaluated; the ones that fit first, fastest first."""
    layouts = layouts if layouts is not None else enumerate_layouts(cfg, world, wl, dev, **kw)
    plans = [evaluate(cfg, lay, wl, dev, recipe, base_parallel) for lay in layouts]
    plans.sort(key=lambda p: (not p.fits, p.estimate.step_s if p.estimate else float("inf"),
                              p.peak_bytes))
    return plans
