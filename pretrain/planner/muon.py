"""The planner's cost of Muon's optimizer step (``optim.name: muon``; parallel/muon.py).

Muon orthogonalises each whole weight matrix with 5 Newton-Schulz iterations. The matrices a
rank's layout shards (FSDP over ``dp_shard x cp``, tensor parallel) are spread over those ranks
by owner, so each rank computes about 1/n of the stage's Newton-Schulz work; experts, sharded
along the expert dim, are orthogonalised where they live. Each rank sends its shard of every
matrix to the owner and receives its slices back: per direction about ``F (n-1) / n^2`` bytes,
``F`` the stage's Muon matrices in fp32 (an all-to-all of one shard's worth).
"""

from __future__ import annotations

from models.config import ModelConfig
from pretrain.planner import hardware as hw
from pretrain.planner import model_stats as ms
from pretrain.planner.layout import Layout

NS_STEPS = 5


def muon_matrices(kind: str, cfg: ModelConfig, ep: int = 1) -> list[tuple[int, int, int]]:
    """(count, rows, cols) of the whole matrices Muon updates in one ``kind`` sublayer (the
    same rule as ``parallel.muon.uses_muon``); experts: this ep rank's share."""
    out = []
    for p in ms.sublayer_params(kind, cfg, 1):
        leaf = p.name.rsplit(".", 1)[-1]
        if "router" in p.name or "norm" in p.name or "conv" in p.name:
            continue
        if len(p.shape) == 2 and leaf == "weight":
            out.append((1, *p.shape))
        elif len(p.shape) == 3 and p.ep_dim == 0:
            out.append((p.shape[0] // max(ep, 1), *p.shape[1:]))
    return out


def _ns_time(m: int, n: int, dev: hw.Device) -> float:
    s, l = min(m, n), max(m, n)
    per_iter = hw.gemm_time(s, s, l, dev) + hw.gemm_time(s, s, s, dev) + hw.gemm_time(s, l, s, dev)
    return NS_STEPS * per_iter


def muon_step_time(cfg: ModelConfig, layout: Layout, layers: list[int], dev: hw.Device) -> float:
    """Seconds one rank spends in Muon's orthogonalisation for the sublayers ``layers``."""
    shard = (layout.dp_shard * layout.cp if layout.zero == 3 else 1) * layout.tp
    kinds = cfg.sublayer_kinds
    compute, dense_bytes = 0.0, 0.0
    for i in layers:
        for count, m, n in muon_matrices(kinds[i], cfg, layout.ep):
            t = count * _ns_time(m, n, dev)
            if kinds[i] == "moe" and count > 1:  # whole experts per rank: no exchange
                edp = max(layout.dp_shard * layout.cp // layout.ep, 1) if layout.zero == 3 else 1
                compute += t / edp
            else:
                compute += t / shard
                dense_bytes += 4.0 * count * m * n
    comm = 0.0
    if shard > 1 and dense_bytes:
        group = hw.group_for(layout.dims, 2, dev.gpus_per_node) if layout.tp == 1 else \
            hw.group_for(layout.dims, len(layout.dims) - 1, dev.gpus_per_node)
        comm = 2 * hw.all_gather_time(dense_bytes / shard, group, dev)
    return compute + comm
