"""One ring-attention block, forward + backward: the pure-torch tiles vs the fused SDPA
kernel with its log-sum-exp (kernels/attention_block.py), both in this process; prints the
median times and their ratio per block length.

    .venv/bin/python bench/bench_ring_block.py [--lengths 512 1024 2048] [--iters 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kernels import attention_block  # noqa: E402
from parallel import ring_attention as ra  # noqa: E402


def _time(fn, iters: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(n: int, iters: int, heads: int, kv_heads: int, dim: int) -> tuple[float, float]:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, kv_heads, heads // kv_heads, n, dim, generator=g)
    k, v = (torch.randn(1, kv_heads, 1, n, dim, generator=g) for _ in range(2))
    dout = torch.randn(q.shape, generator=g)
    scale = dim ** -0.5
    mask = ra._tile_mask("causal", None, None, 0, n, n, q.device)

    def torch_block():
        out, lse = ra.block_forward(q, k, v, "causal", None, None, scale)
        ra.block_backward(q, k, v, dout, (dout * out).sum(-1), lse, "causal", None, None, scale)

    def fused_block():
        out, lse = attention_block.block_forward(q, k, v, mask, scale)
        attention_block.block_backward(q, k, v, dout, out, lse, mask, scale)

    return _time(torch_block, iters), _time(fused_block, iters)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048])
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--dim", type=int, default=64)
    a = ap.parse_args()
    print(f"causal block fwd+bwd, {a.heads} heads ({a.kv_heads} KV) x {a.dim}, {torch.get_num_threads()} threads")
    print(f"{'tokens':>7} {'torch s':>9} {'fused s':>9} {'torch/fused':>12}")
    for n in a.lengths:
        t, f = run(n, a.iters, a.heads, a.kv_heads, a.dim)
        print(f"{n:>7} {t:>9.4f} {f:>9.4f} {t / f:>12.2f}", flush=True)


if __name__ == "__main__":
    main()
