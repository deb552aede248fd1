"""Devices, links and collectives: the hardware half of the planner's cost model.

Every number is a datasheet value or a physically meaningful efficiency, never a
per-model fudge. Where each tuned knob comes from:

- ``gemm_efficiency`` (H100 0.62): the one fitted number, the sustained fraction of the dense
  bf16 peak a large GEMM reaches inside a training step (clocks drop under sustained
  tensor-core load). Least-squares fit (log error) on 3 of the 9 rows of Megatron-LM's
  published H100 table (1.7B, 70B, 462B; tests/data/megatron_h100_weak_scaling.csv); the
  other 6 rows are predictions (tests/test_plan_published.py). Other devices inherit it.
- ``attention_efficiency`` 0.40 (fused flash/SSD kernels, forward + backward): assumed, not
  fitted; between FlashAttention-2 on H100 (about 35% of peak, as the FlashAttention-3 paper,
  Shah et al. 2024, reports) and FlashAttention-3's forward (about 75%).
- ``hbm_efficiency`` 0.80: assumed STREAM-like fraction of the datasheet HBM bandwidth.
- ``link_efficiency`` 0.80: assumed NCCL bus bandwidth / link rate (large messages).
- ``intra_latency`` / ``inter_latency`` (5 / 12 us per step): assumed NCCL small-message step
  latencies over NVLink / InfiniBand.
- ``k_overhead`` 512 and the 128 x 256 tile (``TILE_M``, ``TILE_N``): assumed, a typical
  Hopper bf16 GEMM tile and its fill/epilogue cost.
- ``usable_memory`` 0.92: assumed share of HBM the allocator can hand out.
Timing's fixed ratios (``timing.py``): attention backward = 2.5 x forward (FlashAttention's
backward does 5 of the forward's 2 matmuls); element-wise traffic 1/3 forward, 2/3 backward.
None of these was tuned against the Megatron table.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, replace

from pretrain.errors import UserError
from pretrain.flops import PEAK_FLOPS

GB = 1e9
GIB = 2**30


@dataclass(frozen=True)
class Device:
    name: str
    peak_flops: float  # dense bf16 FLOP/s (datasheet, no sparsity)
    memory_bytes: float  # HBM per device
    hbm_bw: float  # bytes/s (datasheet)
    intra_bw: float  # bytes/s per direction per device inside a node (NVLink)
    inter_bw: float  # bytes/s per device across nodes (its NIC)
    intra_latency: float = 5e-6  # s per collective step inside a node
    inter_latency: float = 12e-6  # s per collective step across nodes
    n_sm: int = 132  # streaming multiprocessors (GEMM wave quantisation)
    k_overhead: int = 512  # pipeline fill + epilogue of one GEMM output tile, in units of K
    gpus_per_node: int = 8
    # Sustained fractions of the datasheet rates (see module docstring).
    gemm_efficiency: float = 0.62  # fitted (module docstring)
    attention_efficiency: float = 0.40  # fused flash/SSD kernels, fwd+bwd (assumed)
    hbm_efficiency: float = 0.80  # STREAM-like fraction of HBM bandwidth
    link_efficiency: float = 0.80  # NCCL bus bandwidth / link rate
    causal_skip: bool = True  # flash kernels skip the masked half of the score matrix
    usable_memory: float = 0.92  # what the allocator can hand out (context, fragmentation)

    @property
    def usable_bytes(self) -> float:
        return self.memory_bytes * self.usable_memory


# Datasheet values: H100/H200 SXM5 (NVLink4 900 GB/s bidirectional, one 400 Gb/s NIC per
# GPU as in DGX H100), A100 SXM4 80GB (NVLink3 600 GB/s, 200 Gb/s HDR NIC per GPU),
# B200 (NVLink5 1.8 TB/s, 400 Gb/s NIC per GPU). The A100 keeps the H100's sustained GEMM
# fraction (uncalibrated: no published A100 table in this repo's test data); the same
# holds for the H200 and B200.
DEVICES: dict[str, Device] = {
    "h100": Device("h100", PEAK_FLOPS["h100"], 80 * GIB, 3.35e12, 450 * GB, 50 * GB, n_sm=132),
    "h200": Device("h200", PEAK_FLOPS["h200"], 141 * GB, 4.8e12, 450 * GB, 50 * GB, n_sm=132),
    "a100": Device("a100", PEAK_FLOPS["a100"], 80 * GIB, 2.039e12, 300 * GB, 25 * GB, n_sm=108),
    "b200": Device("b200", PEAK_FLOPS["b200"], 180 * GB, 8.0e12, 900 * GB, 50 * GB, n_sm=148),
}


def cpu_device(processes_per_node: int = 1) -> Device:
    """This machine as a 'device': a measured fp32 matmul rate shared by the processes,
    RAM as memory, gloo over shared memory as the link (rough)."""
    import torch

    n = 384
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t0, reps = time.perf_counter(), 0
    while time.perf_counter() - t0 < 0.05:
        a @ b
        reps += 1
    rate = 2 * n**3 * reps / (time.perf_counter() - t0)
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = 8 * GIB
    share = max(processes_per_node, 1)
    return Device("cpu", rate / share, ram / share, 10e9 / share, 4 * GB, 1 * GB,
                  intra_latency=50e-6, inter_latency=100e-6, n_sm=1, gpus_per_node=share,
                  gemm_efficiency=1.0, attention_efficiency=0.5, hbm_efficiency=1.0,
                  link_efficiency=1.0, causal_skip=False, usable_memory=0.8)


def get_device(name: str, gpus_per_node: int | None = None) -> Device:
    name = name.lower()
    if name == "cpu":
        return cpu_device(gpus_per_node or 1)
    if name not in DEVICES:
        raise UserError(f"--gpu-type: '{name}' is not one of {', '.join([*DEVICES, 'cpu'])}")
    dev = DEVICES[name]
    return replace(dev, gpus_per_node=gpus_per_node) if gpus_per_node else dev


# ---- collectives: latency-bandwidth model -----------------------------------------------

@dataclass(frozen=True)
class Group:
    """A process group: ``size`` ranks, ``per_node`` of them on each node they span."""

    size: int
    per_node: int

    @property
    def nodes(self) -> int:
        return max(1, self.size // max(self.per_node, 1))


def group_for(dim_sizes: list[int], index: int, gpus_per_node: int) -> Group:
    """The group of mesh dim ``index`` when ranks are laid out row-major over ``dim_sizes``
    (last dim fastest, as ``init_device_mesh`` does): it spans a contiguous block of
    ``size * inner`` ranks with stride ``inner``."""
    size = dim_sizes[index]
    inner = math.prod(dim_sizes[index + 1:])
    span = size * inner
    if span <= gpus_per_node:
        return Group(size, size)
    per_node = max(1, gpus_per_node // inner) if inner < gpus_per_node else 1
    return Group(size, min(size, per_node))


def _bandwidth(group: Group, dev: Device) -> tuple[float, float]:
    """(bytes/s each rank moves, latency per step) for a ring over ``group``.

    Inside one node the ring runs over NVLink. Across nodes NCCL runs one ring per
    channel, each crossing the node boundary on a different NIC, so the node-to-node
    rate is the NICs of the group's members on that node together (capped by NVLink).
    """
    if group.nodes <= 1:
        return dev.intra_bw * dev.link_efficiency, dev.intra_latency
    bw = min(dev.intra_bw, group.per_node * dev.inter_bw) * dev.link_efficiency
    return bw, dev.inter_latency


def _latency_steps(n: int) -> float:
    # NCCL picks trees for latency-bound sizes: ~log2(n) steps each way
    return 2 * math.ceil(math.log2(max(n, 2)))


def all_reduce_time(nbytes: float, group: Group, dev: Device) -> float:
    n = group.size
    if n <= 1 or nbytes <= 0:
        return 0.0
    bw, lat = _bandwidth(group, dev)
    return 2 * (n - 1) / n * nbytes / bw + lat * _latency_steps(n)


def all_gather_time(nbytes: float, group: Group, dev: Device) -> float:
    """``nbytes``: the gathered (full) size."""
    n = group.size
    if n <= 1 or nbytes <= 0:
        return 0.0
    bw, lat = _bandwidth(group, dev)
    return (n - 1) / n * nbytes / bw + lat * _latency_steps(n) / 2


reduce_scatter_time = all_gather_time


def all_to_all_time(nbytes: float, group: Group, dev: Device) -> float:
    """``nbytes``: what one rank sends in total (a 1/n share stays local)."""
    n = group.size
    if n <= 1 or nbytes <= 0:
        return 0.0
    bw, lat = _bandwidth(group, dev)
    return (n - 1) / n * nbytes / bw + lat * (n - 1) / max(group.per_node, 1)


def p2p_time(nbytes: float, cross_node: bool, dev: Device) -> float:
    if nbytes <= 0:
        return 0.0
    if cross_node:
        return nbytes / (dev.inter_bw * dev.link_efficiency) + dev.inter_latency
    return nbytes / (dev.intra_bw * dev.link_efficiency) + dev.intra_latency


# ---- compute ---------------------------------------------------------------------------

TILE_M, TILE_N = 128, 256  # a typical bf16 tensor-core GEMM tile


def gemm_efficiency(m: int, n: int, k: int, dev: Device) -> float:
    """Fraction of peak one ``[m,k] @ [k,n]`` GEMM reaches: the sustained large-GEMM rate,
    times the share of a tile's time spent in its K loop (fill and epilogue cost about
    ``k_overhead`` of K), times wave quantisation over the SMs."""
    if m <= 0 or n <= 0 or k <= 0:
        return dev.gemm_efficiency
    tiles = math.ceil(m / TILE_M) * math.ceil(n / TILE_N)
    waves = math.ceil(tiles / dev.n_sm)
    util = tiles / (waves * dev.n_sm)
    return dev.gemm_efficiency * k / (k + dev.k_overhead) * util


def gemm_time(m: int, n: int, k: int, dev: Device) -> float:
    """Seconds for one GEMM: compute at :func:`gemm_efficiency`, or streaming its operands
    through HBM, whichever is longer (a roofline)."""
    flops = 2.0 * m * n * k
    compute = flops / (dev.peak_flops * gemm_efficiency(m, n, k, dev))
    memory = 2.0 * (m * k + k * n + m * n) / (dev.hbm_bw * dev.hbm_efficiency)
    return max(compute, memory)


def memory_time(nbytes: float, dev: Device) -> float:
    """Seconds to stream ``nbytes`` through HBM (element-wise kernels, optimizer)."""
    return nbytes / (dev.hbm_bw * dev.hbm_efficiency)
