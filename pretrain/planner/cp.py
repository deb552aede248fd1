"""Context parallelism in the planner: what ``parallel.cp`` adds to a rank's memory and step.

Activations and the LM head already scale with the local tokens (``seq_len / cp``) in
memory.py and timing.py; this module adds the attention-specific parts:

- memory: the K/V blocks in flight (ring: the block being computed and the one arriving,
  and in backward the dK/dV accumulators in fp32) or the head-sharded q/k/v/out of the
  whole sequence (all-to-all), for one attention sublayer at a time;
- time: the ring's ``cp - 1`` K/V transfers per forward each overlap one block's compute,
  so only the part of a transfer longer than its block is exposed (short blocks: small
  sequences or many ranks); backward also sends dK/dV. All-to-all: four exchanges forward
  and four backward, not overlapped.
"""

from __future__ import annotations

from models.config import ModelConfig
from models.kinds import KINDS, present
from pretrain.planner import hardware as hw
from pretrain.planner.layout import Layout, Recipe, Workload



def local_tokens(layout: Layout, wl: Workload) -> float:
    return layout.micro_batch * wl.seq_len / layout.cp


def _heads(kind: str, cfg: ModelConfig, tp: int) -> tuple[float, float]:
    """(query heads, KV heads) of one tp rank (KV heads replicated when tp exceeds them)."""
    _, h, kv = KINDS[kind].attention_heads(cfg)
    return h / tp, max(kv / tp, 1.0)


def kv_block_bytes(kind: str, cfg: ModelConfig, layout: Layout, wl: Workload, act_bytes: float) -> float:
    """Bytes of one rank's K and V (what one ring step sends)."""
    _, kv = _heads(kind, cfg, layout.tp)
    return 2 * local_tokens(layout, wl) * kv * cfg.head_dim_resolved * act_bytes


def cp_memory_bytes(cfg: ModelConfig, layout: Layout, wl: Workload, recipe: Recipe) -> float:
    """Transient attention buffers of context parallelism (0 without cp or attention)."""
    kinds = [k for k in set(cfg.sublayer_kinds) if KINDS[k].attention_heads is not None]
    if layout.cp == 1 or not kinds:
        return 0.0
    best = 0.0
    for kind in kinds:
        if layout.cp_mode == "alltoall":
            h, kv = _heads(kind, cfg, layout.tp)
            b = 2 * (2 * h + 2 * kv) * local_tokens(layout, wl) * cfg.head_dim_resolved * recipe.act_bytes
        else:  # two K/V blocks (computing, arriving) + two fp32 dK/dV accumulators
            b = 2 * kv_block_bytes(kind, cfg, layout, wl, recipe.act_bytes) \
                + 2 * kv_block_bytes(kind, cfg, layout, wl, 4.0)
        best = max(best, b)
    return best


def cp_attention_comm(kind: str, cfg: ModelConfig, layout: Layout, wl: Workload, dev: hw.Device,
                      recipe: Recipe, fused_fwd: float) -> tuple[float, float]:
    """(total, exposed) seconds of one attention sublayer's cp communication, forward +
    backward, for one micro-batch; ``fused_fwd``: its attention-kernel forward time."""
    n = layout.cp
    if n == 1 or KINDS[kind].attention_heads is None:
        return 0.0, 0.0
    group = hw.group_for(layout.dims, 3, dev.gpus_per_node)
    if layout.cp_mode == "alltoall":
        h, kv = _heads(kind, cfg, layout.tp)
        per = local_tokens(layout, wl) * cfg.head_dim_resolved * recipe.act_bytes
        t = 2 * sum(hw.all_to_all_time(per * x, group, dev) for x in (h, kv, kv, h))
        return t, t
    cross = group.nodes > 1
    kv = kv_block_bytes(kind, cfg, layout, wl, recipe.act_bytes)
    fwd_x = hw.p2p_time(kv, cross, dev)
    bwd_x = hw.p2p_time(kv, cross, dev) + hw.p2p_time(kv_block_bytes(kind, cfg, layout, wl, 4.0), cross, dev)
    blk_f, blk_b = fused_fwd / n, 2.5 * fused_fwd / n  # one block's share of the kernel time
    total = (n - 1) * fwd_x + n * bwd_x
    exposed = (n - 1) * max(0.0, fwd_x - blk_f) + (n - 1) * max(0.0, bwd_x - blk_b) \
        + hw.p2p_time(kv_block_bytes(kind, cfg, layout, wl, 4.0), cross, dev)  # last dK/dV hop
    return total, exposed


def cp_choices(cfg: ModelConfig, wl: Workload, rest: int, long_seq: int = 16384) -> list[int]:
    """cp sizes the layout search tries: only for long sequences (>= ``long_seq`` tokens),
    powers of two dividing the remaining ranks and half the sequence, up to 8."""
    if wl.seq_len < long_seq or not any(k.attention_heads is not None for k in present(cfg)):
        return [1]
    return [c for c in (1, 2, 4, 8) if rest % c == 0 and wl.seq_len % (2 * c) == 0]
