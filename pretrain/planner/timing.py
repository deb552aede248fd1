"""Step time of a layout: compute from the project's FLOPs count at per-device efficiencies,
communication from a latency-bandwidth model per collective and link, the pipeline bubble
of each schedule, and overlap where the layout provides it (FSDP prefetch, gradient
reduction during the last backward, ladder residual, Megatron's TP overlap)."""

from __future__ import annotations

from dataclasses import dataclass, field

from models.config import ModelConfig
from models.kinds import KINDS
from pretrain.flops import train_flops_per_token
from pretrain.planner import hardware as hw
from pretrain.planner import model_stats as ms
from pretrain.planner.layout import Layout, Recipe, Workload
from pretrain.planner.memory import local_param_counts, split



@dataclass
class SublayerTime:
    fwd: float  # forward compute, one micro-batch
    bwd: float  # backward compute (incl. recomputation)
    tp_fwd: float  # tensor-parallel collectives (before overlap)
    tp_bwd: float
    ep: float  # expert-parallel all-to-alls, forward + backward
    cp: float = 0.0  # context-parallel attention communication left exposed, fwd + bwd


@dataclass
class StepEstimate:
    step_s: float
    tokens_per_s: float
    mfu: float  # the project's FLOPs count / (world * peak)
    parts: dict[str, float] = field(default_factory=dict)  # seconds on the critical rank

    @property
    def tflops_per_gpu(self) -> float:
        return self.mfu * self.peak / 1e12

    peak: float = 0.0


def _gemm_fwd_bwd(m: float, k: int, n: int, dev: hw.Device) -> tuple[float, float]:
    m = max(int(m), 1)
    fwd = hw.gemm_time(m, n, k, dev)
    bwd = hw.gemm_time(m, k, n, dev) + hw.gemm_time(k, n, m, dev)  # input grad + weight grad
    return fwd, bwd


def sublayer_time(kind: str, checkpointed: bool, cfg: ModelConfig, layout: Layout, wl: Workload,
                  dev: hw.Device, recipe: Recipe) -> SublayerTime:
    """Times of one ``kind`` sublayer for one micro-batch on one rank."""
    tokens = layout.micro_batch * wl.seq_len / layout.cp  # context parallel: local tokens
    tp = layout.tp
    gemm_f = gemm_b = 0.0
    for lin in ms.linears(kind, cfg, tp):
        if lin.split == "expert":
            n_local = cfg.moe.n_experts // layout.ep
            per_expert = tokens * lin.token_factor * layout.ep / cfg.moe.n_experts
            f, b = _gemm_fwd_bwd(per_expert, lin.d_in, lin.d_out, dev)
            gemm_f += n_local * f / tp  # experts' tokens split over the tp ranks
            gemm_b += n_local * b / tp
            continue
        k, n = ms.local_dims(lin, tp)
        f, b = _gemm_fwd_bwd(tokens * lin.token_factor, k, n, dev)
        gemm_f += f
        gemm_b += b
    fused = ms.fused_flops_per_token(kind, cfg, wl.seq_len) * tokens / tp
    if KINDS[kind].attention_heads is not None and dev.causal_skip:  # fused causal score matrix
        fused *= 0.5
    fused_f = fused / (dev.peak_flops * dev.attention_efficiency)
    elem = hw.memory_time(ms.elementwise_bytes_per_token(kind, cfg, tp, layout.sp, recipe.stream_bytes,
                                                          recipe.act_bytes) * tokens, dev)
    fwd = gemm_f + fused_f + elem / 3
    bwd = gemm_b + 2.5 * fused_f + 2 * elem / 3
    tp_f = tp_b = ep = 0.0
    if tp > 1:
        group = hw.group_for(layout.dims, 4, dev.gpus_per_node)
        nbytes = tokens * cfg.d_model * recipe.act_bytes
        tp_f = hw.all_reduce_time(nbytes, group, dev)  # = all-gather + reduce-scatter with sp
        tp_b = tp_f
    if kind == "moe" and layout.ep > 1:
        dims = [layout.pp, layout.dp_replicate, layout.dp_shard // layout.ep, layout.ep, layout.cp, tp]
        group = hw.group_for(dims, 3, dev.gpus_per_node)
        nbytes = tokens * cfg.moe.top_k * cfg.d_model * recipe.act_bytes / tp
        ep = 4 * hw.all_to_all_time(nbytes, group, dev)  # dispatch + combine, fwd + bwd
    from pretrain.planner.cp import cp_attention_comm

    cp = cp_attention_comm(kind, cfg, layout, wl, dev, recipe, fused_f)[1]
    if checkpointed:
        bwd += fwd
        tp_b += tp_f
        ep *= 1.5
        cp *= 1.5
    return SublayerTime(fwd, bwd, tp_f, tp_b, ep, cp)


def _checkpointed(i: int, layout: Layout) -> bool:
    return layout.ac == "full" or (layout.ac == "every_n" and i % layout.ac_every == 0)


def stage_time(layers: tuple[int, ...], first: bool, last: bool, cfg: ModelConfig, layout: Layout,
               wl: Workload, dev: hw.Device, recipe: Recipe, cache: dict) -> dict[str, float]:
    """Seconds of one micro-batch (forward + backward) through one stage."""
    kinds = cfg.sublayer_kinds
    times = []
    for i in layers:
        key = (kinds[i], _checkpointed(i, layout))
        if key not in cache:
            cache[key] = sublayer_time(kinds[i], key[1], cfg, layout, wl, dev, recipe)
        times.append((i, cache[key]))
    out = {"compute": 0.0, "tp_comm": 0.0, "ep_comm": 0.0, "cp_comm": 0.0}
    for j, (i, t) in enumerate(times):
        out["compute"] += t.fwd + t.bwd
        out["ep_comm"] += t.ep
        out["cp_comm"] += t.cp
        fwd_c, bwd_c = t.tp_fwd, t.tp_bwd
        if recipe.tp_overlap == "full":
            fwd_c, bwd_c = max(0.0, fwd_c - t.fwd), max(0.0, bwd_c - t.bwd)
        elif recipe.tp_overlap == "ladder" and i >= recipe.ladder_from and j + 1 < len(times):
            # the next sublayer computes while this one's reduction is in flight
            fwd_c = max(0.0, fwd_c - times[j + 1][1].fwd)
        out["tp_comm"] += fwd_c + bwd_c
    tokens = layout.micro_batch * wl.seq_len / layout.cp
    d, tp = cfg.d_model, layout.tp
    group = hw.group_for(layout.dims, 4, dev.gpus_per_node)
    if first:
        out["compute"] += hw.memory_time(3 * d * recipe.stream_bytes * tokens, dev)
        out["tp_comm"] += hw.all_reduce_time(tokens * d * recipe.act_bytes, group, dev)
    if last:
        v_local = cfg.vocab_size // tp
        f, b = _gemm_fwd_bwd(tokens, d, v_local, dev)
        out["compute"] += f + b + hw.memory_time(recipe.ce_bytes * v_local * tokens, dev)
        if tp > 1:  # loss-parallel max/sum reductions + the input gradient
            out["tp_comm"] += hw.all_reduce_time(tokens * d * recipe.act_bytes, group, dev) \
                + 3 * hw.all_reduce_time(tokens * 4.0, group, dev)
    return out


def _bubble(layout: Layout) -> float:
    """Idle time of a pipeline step, in micro-batch (forward + backward) units."""
    p = layout.pp
    if p == 1:
        return 0.0
    if layout.schedule == "interleaved_1f1b":
        return (p - 1) / layout.vpp
    if layout.schedule == "zbv":
        return (p - 1) / 6  # weight-gradient passes fill most of it (about 1/3 of interleaved v=2)
    return float(p - 1)  # gpipe, 1f1b


def _per_chunk_exposed(grad: float, param: float, mb: float, n_micro: int, units: int,
                       layout: Layout, pp_rank: int) -> float:
    """Exposed seconds of the gradient reduce-scatter and parameter all-gather when each of
    a rank's ``v`` model chunks reduces as soon as its last backward is done and gathers
    just before its first forward of the next step (Megatron-LM's overlap options).

    Interleaved 1F1B runs micro-batches in groups of ``pp``: the last group's backward goes
    through the chunks in reverse, so chunk ``j``'s gradients are final ``j * pp`` chunk
    backwards before the end, and chunk ``j``'s first forward comes ``j * pp`` chunk
    forwards into the step. One link carries the chunks' collectives one after another;
    within a chunk they are bucketed (``units / v`` buckets, the last one always exposed).
    Rank ``r`` ends its backward ``r`` chunk backwards before rank 0 (pipeline drain).
    """
    v, g = layout.vpp, min(layout.pp, n_micro)
    cb, cf = 2 * mb / (3 * v), mb / (3 * v)  # one chunk's backward / forward, one micro-batch
    per_chunk = max(units / v, 1.0)
    net = -float("inf")
    for j in range(v - 1, -1, -1):
        net = max(net, -(j * g + 1) * cb) + grad / v
        net = max(net, -(j * g) * cb + grad / (v * per_chunk))
    exposed = max(0.0, net - pp_rank * cb)
    shift = param / (v * per_chunk)  # the first bucket precedes any compute
    net = 0.0
    for j in range(v):
        net += param / v
        shift += max(0.0, net - (j * g * cf + shift + cf * (1 - 1 / per_chunk)))
    return exposed + (shift if param > 0 else 0.0)


def dp_comm(full_params: int, layout: Layout, dev: hw.Device, recipe: Recipe) -> dict[str, float]:
    """Data-parallel collectives of one rank per step (before overlap): ``per_micro`` (FSDP
    parameter all-gathers, every micro-batch), ``grad`` (reduction, once per step), ``param``
    (ZeRO-1/2 parameter all-gather after the optimizer)."""
    dims = [layout.pp, layout.dp, layout.cp, layout.tp]
    dp_group = hw.group_for(dims, 1, dev.gpus_per_node)
    out = {"per_micro": 0.0, "grad": 0.0, "param": 0.0}
    if layout.dp * layout.cp == 1:
        return out
    grads = full_params * recipe.grad_bytes
    params = full_params * recipe.compute_param_bytes
    if layout.zero == 3 and layout.dp_shard * layout.cp > 1:
        # FSDP over dp_shard x cp (adjacent mesh dims: one group of their product)
        flat = [layout.pp, layout.dp_replicate, layout.dp_shard * layout.cp, layout.tp]
        shard = hw.group_for(flat, 2, dev.gpus_per_node)
        out["per_micro"] = 2 * hw.all_gather_time(params, shard, dev)
        out["grad"] = hw.reduce_scatter_time(grads, shard, dev)
        if layout.dp_replicate > 1:
            rep = hw.group_for(layout.dims, 1, dev.gpus_per_node)
            out["grad"] += hw.all_reduce_time(grads / layout.dp_shard, rep, dev)
    elif layout.zero == 0 or layout.zero == 3:
        out["grad"] = hw.all_reduce_time(grads, dp_group, dev)
    else:
        out["grad"] = hw.reduce_scatter_time(grads, dp_group, dev)
        out["param"] = hw.all_gather_time(params, dp_group, dev)
    return out


def estimate(cfg: ModelConfig, layout: Layout, wl: Workload, dev: hw.Device,
             recipe: Recipe) -> StepEstimate:
    """Predicted seconds per optimizer step and what they are made of."""
    n_micro = wl.micro_batches(layout)
    if n_micro < 1:
        raise ValueError(f"global batch {wl.global_batch} does not split into dp={layout.dp} x "
                         f"micro_batch={layout.micro_batch}")
    cache: dict = {}
    ranks = split(cfg, layout)
    counts = local_param_counts(cfg, layout)
    per_rank = []
    for stages in ranks:
        t = {"compute": 0.0, "tp_comm": 0.0, "ep_comm": 0.0, "cp_comm": 0.0}
        for st in stages:
            for k, v in stage_time(st.layers, st.first, st.last, cfg, layout, wl, dev, recipe, cache).items():
                t[k] += v
        per_rank.append(t)
    mb_time = [sum(t.values()) for t in per_rank]
    t_max = max(mb_time)
    critical = per_rank[mb_time.index(t_max)]
    tokens = layout.micro_batch * wl.seq_len / layout.cp
    p2p = 0.0
    if layout.pp > 1 and not recipe.p2p_overlap:
        cross = layout.world // layout.pp >= dev.gpus_per_node
        nbytes = tokens * cfg.d_model * recipe.stream_bytes / (layout.tp if layout.sp else 1)
        p2p = 2 * layout.vpp * hw.p2p_time(nbytes, cross, dev)
    bubble = _bubble(layout)
    pipeline = (n_micro + bubble) * (t_max + p2p)
    exposed, opt = [], []
    for stages, t, c in zip(ranks, per_rank, counts):
        comm = dp_comm(c["full"], layout, dev, recipe)
        units = max(len(cfg.sublayer_kinds) // layout.pp, 1) + 1
        mb = sum(t.values())
        e = n_micro * (max(0.0, comm["per_micro"] - mb) + comm["per_micro"] / units)
        if recipe.dp_overlap == "per_chunk":
            e += _per_chunk_exposed(comm["grad"], comm["param"], mb, n_micro, units, layout, len(exposed))
        else:
            bwd_window = 2 * mb / 3  # backward of the last micro-batch
            e += max(0.0, comm["grad"] - bwd_window) + comm["grad"] / units
            e += max(0.0, comm["param"] - mb / 3) + comm["param"] / units
        exposed.append(e)
        sharded = c["sharded"] if layout.zero == 3 else c["full"] / (layout.dp if layout.zero >= 1 else 1)
        opt.append(hw.memory_time(sharded * (32 + recipe.param_bytes), dev))
        if wl.optimizer == "muon":
            from pretrain.planner.muon import muon_step_time

            opt[-1] += muon_step_time(cfg, layout, [i for st in stages for i in st.layers], dev)
    step = pipeline + max(exposed) + max(opt)
    tokens_step = wl.global_batch * wl.seq_len
    mfu = train_flops_per_token(cfg, wl.seq_len) * tokens_step / step / (layout.world * dev.peak_flops)
    parts = {"compute": n_micro * critical["compute"], "tp_comm": n_micro * critical["tp_comm"],
             "ep_comm": n_micro * critical["ep_comm"], "cp_comm": n_micro * critical["cp_comm"],
             "p2p": n_micro * p2p,
             "bubble": bubble * (t_max + p2p), "dp_comm": max(exposed), "optimizer": max(opt)}
    return StepEstimate(step, tokens_step / step, mfu, parts, dev.peak_flops)


def model_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Megatron's convention: 3 x forward with the full S x S score matrix (no recompute)."""
    from pretrain.flops import forward_flops_per_token

    return 3.0 * forward_flops_per_token(cfg, seq_len)
