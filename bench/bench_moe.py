"""MoE dispatch overhead: tokens/s of an MoE layer vs a dense SwiGLU MLP with the same
active parameters (hidden = top_k * expert width + shared width), same batch, on CPU.

    .venv/bin/python bench/bench_moe.py                  # Mixtral-like and fine-grained shapes
    .venv/bin/python bench/bench_moe.py --tokens 8192 --threads 2

Prints, per expert implementation, forward and forward+backward tokens/s and the
ratio MoE / dense (1.0 = routing, permutation and grouping cost nothing).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.config import MoEConfig, ModelConfig  # noqa: E402
from models.layers import MLP  # noqa: E402
from models.moe import MoE  # noqa: E402

SHAPES = {
    # name: (d_model, n_experts, top_k, expert width, shared experts)
    "mixtral-like": (512, 8, 2, 1024, 0),
    "fine-grained": (512, 64, 6, 128, 2),
}


def _paired_time(fa, fb, iters: int) -> tuple[float, float]:
    """Fastest of ``iters`` calls of each, alternating a and b so that load from other
    processes on a shared machine hits both sides alike."""
    fa(), fb()  # warm-up
    ta = tb = float("inf")
    for _ in range(iters):
        t0 = time.perf_counter()
        fa()
        t1 = time.perf_counter()
        fb()
        t2 = time.perf_counter()
        ta, tb = min(ta, t1 - t0), min(tb, t2 - t1)
    return ta, tb


def _run(mod, x, backward: bool) -> None:
    xi = x.detach().requires_grad_(backward)
    if backward:
        mod(xi).float().pow(2).mean().backward()
        mod.zero_grad(set_to_none=True)
    else:
        with torch.no_grad():
            mod(xi)


def bench_shape(name: str, d: int, E: int, k: int, h: int, shared: int, tokens: int, iters: int,
                impls: list[str]) -> None:
    torch.manual_seed(0)
    x = torch.randn(tokens, d)
    dense = MLP(d, (k + shared) * h)
    for p in dense.parameters():
        torch.nn.init.normal_(p, std=0.02)
    print(f"\n{name}: d={d} experts={E} top_k={k} width={h} shared={shared} tokens={tokens} "
          f"(dense hidden {(k + shared) * h})")
    print(f"  {'impl':<12}{'dense fwd':>11}{'moe fwd':>10}{'ratio':>7}{'dense f+b':>11}{'moe f+b':>10}{'ratio':>7}"
          "   (tokens/s)")
    for impl in impls:
        cfg = ModelConfig(d_model=d, n_heads=8, moe=MoEConfig(n_experts=E, top_k=k, ffn_hidden=h,
                                                             n_shared_experts=shared, expert_impl=impl))
        moe = MoE(cfg)
        for p in moe.parameters():
            torch.nn.init.normal_(p, std=0.02)
        moe.reset_buffers()
        moe.train()
        row = f"  {impl:<12}"
        for bw in (False, True):
            td, tm = _paired_time(lambda: _run(dense, x, bw), lambda: _run(moe, x, bw), iters)
            row += f"{tokens / td:>11.0f}{tokens / tm:>10.0f}{td / tm:>7.2f}"
        print(row, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--iters", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--impls", default="grouped_mm,loop,bmm")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, CPU, {args.threads} thread(s), fp32")
    for name in args.shapes.split(","):
        bench_shape(name, *SHAPES[name], args.tokens, args.iters, args.impls.split(","))


if __name__ == "__main__":
    main()
