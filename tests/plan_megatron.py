"""Megatron-LM's published H100 GPT table as planner predictions (shared by the tests).

``tests/data/megatron_h100_weak_scaling.csv`` holds the table (its header says where from).
Each row is predicted at its published TP/PP/DP, GPU count and global batch with the
Megatron recipe (bf16 weights, fp32 gradients, distributed optimizer = ZeRO-1 over DP,
sequence parallel with TP, overlapped TP/DP/PP communication). What the table does not say
is taken as the fastest of the candidates the planner itself enumerates for that mesh:
micro-batch 1/2/4, 1F1B or interleaved 1F1B (2 stages per rank), recomputation off or
full, among those that fit in memory. Megatron's GPT uses a 4h GeLU MLP; here it is a
SwiGLU MLP of width 8h/3, which has the same parameters and FLOPs.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, replace
from pathlib import Path

from models.config import ModelConfig
from pretrain.planner import hardware as hw
from pretrain.planner.layout import Layout, Workload, megatron_recipe
from pretrain.planner.memory import rank_memory
from pretrain.planner.timing import estimate, model_flops_per_token

CSV = Path(__file__).parent / "data" / "megatron_h100_weak_scaling.csv"
VOCAB, SEQ = 131072, 4096  # the table's header: every row


@dataclass(frozen=True)
class Row:
    name: str
    hidden: int
    heads: int
    layers: int
    tp: int
    pp: int
    dp: int
    gpus: int
    global_batch: int
    tflops: float  # published per-GPU TFLOP/s (Megatron's FLOPs convention)


def load_rows() -> list[Row]:
    lines = [line for line in CSV.read_text().splitlines() if line and not line.startswith("#")]
    out = []
    for r in csv.DictReader(lines):
        row = Row(r["model_size"], int(r["hidden"]), int(r["heads"]), int(r["layers"]), int(r["tp"]),
                  int(r["pp"]), int(r["dp"]), int(r["gpus"]), int(r["global_batch"]),
                  float(r["tflops_per_gpu"]))
        assert row.tp * row.pp * row.dp == row.gpus, row
        out.append(row)
    return out


def gpt(row: Row) -> ModelConfig:
    h = row.hidden
    ffn = 8 * round(8 * h / 3 / 8)  # SwiGLU with the parameters/FLOPs of a 4h two-matrix MLP
    return ModelConfig(vocab_size=VOCAB, d_model=h, n_layers=row.layers, pattern="*-",
                       n_heads=row.heads, ffn_hidden=ffn, max_seq_len=SEQ)


def candidates(row: Row) -> list[Layout]:
    scheds = [("1f1b", 1)] + ([("interleaved_1f1b", 2)] if row.pp > 1 else [])
    return [Layout(tp=row.tp, pp=row.pp, dp_shard=row.dp, zero=1, sp=row.tp > 1, micro_batch=mb,
                   schedule=s, vpp=v, ac=ac)
            for mb in (1, 2, 4) for s, v in scheds for ac in ("off", "full")
            if (row.global_batch // row.dp) % mb == 0]


def tflops(row: Row, layout: Layout, dev: hw.Device) -> float:
    """Predicted per-GPU TFLOP/s of ``row`` under ``layout`` (Megatron's FLOPs convention)."""
    cfg = gpt(row)
    step = estimate(cfg, layout, Workload(SEQ, row.global_batch), dev, megatron_recipe()).step_s
    return model_flops_per_token(cfg, SEQ) * row.global_batch * SEQ / step / row.gpus / 1e12


def best_layout(row: Row, dev: hw.Device) -> Layout:
    """The fastest candidate that fits in ``dev``'s memory."""
    cfg, wl, rec = gpt(row), Workload(SEQ, row.global_batch), megatron_recipe()
    fits = [lay for lay in candidates(row)
            if max(b.total for b in rank_memory(cfg, lay, wl, rec)) <= dev.usable_bytes]
    assert fits, f"{row.name}: no candidate layout fits"
    return max(fits, key=lambda lay: tflops(row, lay, dev))


def with_efficiency(e: float) -> hw.Device:
    return replace(hw.DEVICES["h100"], gemm_efficiency=e)


GRID = [0.50 + 0.01 * i for i in range(26)]  # candidate H100 GEMM efficiencies, 0.50-0.75


@dataclass
class Curve:
    """One row's predicted log TFLOP/s over ``GRID`` at a fixed layout (linear in between)."""

    row: Row
    layout: Layout
    log_tflops: list[float]

    def at(self, e: float) -> float:
        i = min(max(int((e - GRID[0]) / (GRID[1] - GRID[0])), 0), len(GRID) - 2)
        w = (e - GRID[i]) / (GRID[i + 1] - GRID[i])
        return math.exp((1 - w) * self.log_tflops[i] + w * self.log_tflops[i + 1])

    def error(self, e: float) -> float:
        return self.at(e) / self.row.tflops - 1


def curves(rows: list[Row], e: float) -> list[Curve]:
    """Each row at its best layout for efficiency ``e``, predicted over the whole grid."""
    out = []
    for r in rows:
        lay = best_layout(r, with_efficiency(e))
        out.append(Curve(r, lay, [math.log(tflops(r, lay, with_efficiency(x))) for x in GRID]))
    return out


def fit(cs: list[Curve], tol: float = 1e-4) -> float:
    """The efficiency minimising the squared log error of the rows ``cs`` (golden section)."""
    def loss(x: float) -> float:
        return sum(math.log(c.at(x) / c.row.tflops) ** 2 for c in cs)

    g = (math.sqrt(5) - 1) / 2
    a, b = GRID[0], GRID[-1]
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = loss(c), loss(d)
    while b - a > tol:
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = loss(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = loss(d)
    return (a + b) / 2
