"""Per-rank memory: parameters, gradients and optimizer state under each data-parallel
sharding, activations with and without recomputation, pipeline micro-batches in flight,
MoE expert placement, and the transient buffers of fully sharded data parallelism."""

from __future__ import annotations

from dataclasses import dataclass

from models.config import ModelConfig
from pretrain.planner import model_stats as ms
from pretrain.planner.layout import Breakdown, Layout, Recipe, Workload


@dataclass(frozen=True)
class Stage:
    index: int
    layers: tuple[int, ...]  # global sublayer indices
    first: bool
    last: bool


_SPLITS: dict[tuple, list[list[Stage]]] = {}


def split(cfg: ModelConfig, layout: Layout) -> list[list[Stage]]:
    """The stages each pp rank holds, cut exactly as ``parallel.pipeline`` cuts them
    (``|`` marks, else balanced by parameter count with the LM head on the last stage)."""
    n_stages = layout.pp * layout.vpp
    if n_stages == 1:
        return [[Stage(0, tuple(range(cfg.n_sublayers)), True, True)]]
    key = (repr(cfg), layout.pp, n_stages, layout.schedule)
    if key not in _SPLITS:
        _SPLITS[key] = _split(cfg, layout, n_stages)
    return _SPLITS[key]


def _split(cfg: ModelConfig, layout: Layout, n_stages: int) -> list[list[Stage]]:
    from parallel.pipeline import stage_rank

    sizes = {k: sum(ms.numel(p) for p in ms.sublayer_params(k, cfg)) for k in set(cfg.sublayer_kinds)}
    costs = [2.0 * sizes[k] for k in cfg.sublayer_kinds]
    head = 2.0 * cfg.d_model * cfg.vocab_size
    marks = sorted({b for b in cfg.stage_boundaries() if 0 < b < cfg.n_sublayers})
    if marks:
        cuts = [0, *marks, cfg.n_sublayers]
        groups = [list(range(a, b)) for a, b in zip(cuts, cuts[1:])]
    else:
        groups = balanced_split(costs, n_stages, 0.0, head)
    ranks: list[list[Stage]] = [[] for _ in range(layout.pp)]
    for s, layers in enumerate(groups):
        ranks[stage_rank(s, n_stages, layout.pp, layout.schedule)].append(
            Stage(s, tuple(layers), s == 0, s == n_stages - 1))
    return ranks


def balanced_split(costs: list[float], k: int, embed: float, head: float) -> list[list[int]]:
    """Contiguous split of ``costs`` into ``k`` stages minimising the largest stage cost (the
    embedding on the first, the head on the last): the dynamic programme of
    ``parallel.pipeline`` (same ties: the earliest cut), vectorised over the cut position."""
    import numpy as np

    n = len(costs)
    prefix = np.concatenate([[0.0], np.cumsum(np.asarray(costs, dtype=np.float64))])
    best = np.full((k + 1, n + 1), np.inf)
    arg = np.zeros((k + 1, n + 1), dtype=np.int64)
    best[0, 0] = 0.0
    for s in range(1, k + 1):
        extra = (embed if s == 1 else 0.0) + (head if s == k else 0.0)
        for b in range(s, n - (k - s) + 1):
            a = np.arange(s - 1, b)
            v = np.maximum(best[s - 1, a], prefix[b] - prefix[a] + extra)
            i = int(np.argmin(v))
            best[s, b], arg[s, b] = v[i], a[i]
    out, b = [], n
    for s in range(k, 0, -1):
        a = int(arg[s, b])
        out.append(list(range(a, b)))
        b = a
    return out[::-1]


def _numel(params: list[ms.Param], layout: Layout, shard: int, shard_rank: int = 0) -> int:
    """Local elements of ``params`` on one rank; experts are split over ep, then FSDP-sharded
    over the rest of dp_shard (as torchtitan does)."""
    total = 0
    for p in params:
        s = max(shard // layout.ep, 1) if p.ep_dim is not None else shard
        total += ms.local_numel(p, layout.tp, layout.ep, s, shard_rank if s > 1 else 0)
    return total


def local_param_counts(cfg: ModelConfig, layout: Layout, shard_rank: int = 0) -> list[dict]:
    """Per pp rank: ``full`` (this rank's tp/pp/ep share, unsharded over dp), ``sharded``
    (after FSDP, for ``shard_rank``), ``largest_unit`` (the biggest FSDP unit, unsharded)
    and ``root`` (embedding/head unit, unsharded)."""
    out = []
    shard = layout.dp_shard * layout.cp if layout.zero == 3 else 1  # FSDP over dp_shard x cp
    kinds = cfg.sublayer_kinds
    per_kind = {}
    for k in set(kinds):
        params = ms.sublayer_params(k, cfg, layout.tp)
        per_kind[k] = (_numel(params, layout, 1), _numel(params, layout, shard, shard_rank))
    for stages in split(cfg, layout):
        full = sharded = largest = root = 0
        for stage in stages:
            for i in stage.layers:
                n_full, n_shard = per_kind[kinds[i]]
                full, sharded, largest = full + n_full, sharded + n_shard, max(largest, n_full)
            top = ms.top_params(cfg, stage.first, stage.last, layout.tp)
            root += _numel(top, layout, 1)
            full += _numel(top, layout, 1)
            sharded += _numel(top, layout, shard, shard_rank)
        out.append({"full": full, "sharded": sharded, "largest_unit": largest, "root": root})
    return out


def _inflight(layout: Layout, n_micro: int, pp_rank: int) -> float:
    """Micro-batches whose activations a pp rank holds at its peak (in whole-rank units)."""
    p, m, v = layout.pp, n_micro, layout.vpp
    if p == 1:
        return 1.0
    if layout.schedule == "gpipe":
        return float(m)
    if layout.schedule == "interleaved_1f1b":
        chunks = 2 * (p - pp_rank - 1) + (v - 1) * p + 1  # Megatron's warm-up count + 1
        return min(m * v, chunks) / v
    if layout.schedule == "zbv":
        return min(m, p) * 1.0  # two chunks, V order: about p micro-batches of one chunk each
    return float(min(m, p - pp_rank))


def activation_bytes(cfg: ModelConfig, layout: Layout, wl: Workload, recipe: Recipe,
                     layers: tuple[int, ...]) -> tuple[float, float]:
    """(stored bytes of ``layers`` for one micro-batch, the extra peak of one sublayer's
    backward: its recomputed activations if checkpointed, plus the gradients of its widest
    intermediate and of that intermediate's input)."""
    tokens = layout.micro_batch * wl.seq_len / layout.cp  # context parallel: local tokens
    kinds = cfg.sublayer_kinds
    stored, extra = 0.0, 0.0
    for i in layers:
        full = ms.activation_bytes_per_token(kinds[i], cfg, layout.tp, layout.sp, recipe.stream_bytes,
                                             recipe.act_bytes, recipe.sp_sharded_input,
                                             recipe.reference_kernels) * tokens
        grads = 2 * ms.widest_per_token(kinds[i], cfg, layout.tp) * recipe.act_bytes * tokens
        if layout.ac == "full" or (layout.ac == "every_n" and i % layout.ac_every == 0):
            stored += cfg.d_model * recipe.stream_bytes * tokens / (layout.tp if layout.sp else 1)
            extra = max(extra, full + grads)
        else:
            stored += full
            extra = max(extra, grads)
    return stored, extra


def logits_bytes(cfg: ModelConfig, layout: Layout, wl: Workload, recipe: Recipe | None = None) -> float:
    """fp32 logits and their gradient on the last stage (the fused loss chunks them, ~1/8),
    plus what the final norm keeps for backward (its input and output)."""
    tokens = layout.micro_batch * wl.seq_len / layout.cp  # context parallel: local tokens
    # the reference cross-entropy's backward holds log-softmax and two gradients at once
    copies = 3 if recipe is not None and recipe.reference_kernels else 2
    b = copies * 4.0 * tokens * cfg.vocab_size / layout.tp
    b = b / 8 if wl.fused_loss else b
    if recipe is not None:
        shard = layout.tp if layout.sp else 1
        norm = cfg.d_model * (recipe.stream_bytes / shard + recipe.act_bytes)
        norm += cfg.d_model * 4 / shard if recipe.reference_kernels else 0
        b += norm * tokens
    return b


def rank_memory(cfg: ModelConfig, layout: Layout, wl: Workload, recipe: Recipe,
                shard_rank: int = 0) -> list[Breakdown]:
    """A memory breakdown (bytes) for each pp rank, at FSDP coordinate ``shard_rank`` (0:
    the largest shards)."""
    n_micro = max(wl.micro_batches(layout), 1)
    counts = local_param_counts(cfg, layout, shard_rank)
    out = []
    for r, (stages, c) in enumerate(zip(split(cfg, layout), counts)):
        b = Breakdown()
        dp = layout.dp
        if layout.zero == 3:
            b.parts["params"] = c["sharded"] * recipe.param_bytes
            grads = c["sharded"] * recipe.grad_bytes
            optim = c["sharded"] * (recipe.master_bytes + recipe.optim_bytes)
            gathered = (2 * c["largest_unit"] + c["root"]) * recipe.compute_param_bytes \
                + c["largest_unit"] * recipe.grad_bytes
            if layout.dp_shard * layout.cp > 1:
                b.parts["fsdp_buffers"] = gathered
            if n_micro > 1 and recipe.accumulate_unsharded and layout.dp_shard * layout.cp > 1:
                # no-sync micro-batches accumulate unsharded gradients (FSDP2)
                b.parts["grad_accumulation"] = (c["full"] - c["sharded"]) * recipe.grad_bytes
                b.notes.append("micro-batches accumulate unsharded grads")
        else:
            b.parts["params"] = c["full"] * recipe.param_bytes
            grads = c["full"] * recipe.grad_bytes / (dp if layout.zero >= 2 else 1)
            master = recipe.master_bytes or (recipe.zero_master_bytes if layout.zero in (1, 2) else 0)
            optim = c["full"] * (master + recipe.optim_bytes) / (dp if layout.zero >= 1 else 1)
        b.parts["grads"] = grads
        b.parts["optimizer"] = optim
        act, peak_extra = 0.0, 0.0
        for st in stages:
            stored, extra = activation_bytes(cfg, layout, wl, recipe, st.layers)
            act += stored
            peak_extra = max(peak_extra, extra)
        b.parts["activations"] = act * _inflight(layout, n_micro, r) + peak_extra
        if any(st.last for st in stages):
            # the loss's tensors are freed before the last sublayer is recomputed: the peak
            # holds one or the other
            b.parts["logits"] = max(0.0, logits_bytes(cfg, layout, wl, recipe) - peak_extra)
        if layout.cp > 1:  # K/V blocks in flight (ring) or head-sharded q/k/v/out (all-to-all)
            from pretrain.planner.cp import cp_memory_bytes

            b.parts["cp_buffers"] = cp_memory_bytes(cfg, layout, wl, recipe)
        out.append(b)
    return out


def state_bytes(b: Breakdown) -> float:
    """Parameters + gradients + optimizer state (what a finished step leaves allocated)."""
    return b.parts.get("params", 0) + b.parts.get("grads", 0) + b.parts.get("optimizer", 0)
