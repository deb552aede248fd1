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

from models.config import ModelConfig, MoEConfig  # noqa: E402
from models.layers import MLP  # noqa: E402
from models.moe import MoE  # noqa: E402

SHAPES = {
    # name: (d_model, n_experts, top_k, expert width, shared experts)
    "mixtral-like": (512, 8, 2, 1024, 0),
    "fine-grained": (512, 64, 6, 128, 2),
}


def _time(fn, iters: int, warmup: int = 1) -> float:
    """Fastest of ``iters`` calls: the machine may be shared, and the minimum is the least
    disturbed estimate of each side (both get the same treatment)."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bench_shape(name: str, d: int, E: int, k: int, h: int, shared: int, tokens: int, iters: int,
                impls: list[str]) -> None:
    torch.manual_seed(0)
    x = torch.randn(tokens, d)
    dense = MLP(d, (k + shared) * h)
    for p in dense.parameters():
        torch.nn.init.normal_(p, std=0.02)

    def run(mod, backward: bool):
        xi = x.detach().requires_grad_(backward)
        if backward:
            mod(xi).float().pow(2).mean().backward()
            mod.zero_grad(set_to_none=True)
        else:
            with torch.no_grad():
                mod(xi)

    base = {bw: _time(lambda: run(dense, bw), iters) for bw in (False, True)}
    print(f"\n{name}: d={d} experts={E} top_k={k} width={h} shared={shared} tokens={tokens} "
          f"(dense hidden {(k + shared) * h})")
    print(f"  {'impl':<12}{'fwd tok/s':>12}{'ratio':>8}{'fwd+bwd tok/s':>16}{'ratio':>8}")
    print(f"  {'dense':<12}{tokens / base[False]:>12.0f}{1.0:>8.2f}{tokens / base[True]:>16.0f}{1.0:>8.2f}")
    for impl in impls:
        cfg = ModelConfig(d_model=d, n_heads=8, moe=MoEConfig(n_experts=E, top_k=k, ffn_hidden=h,
                                                             n_shared_experts=shared, expert_impl=impl))
        moe = MoE(cfg)
        for p in moe.parameters():
            torch.nn.init.normal_(p, std=0.02)
        moe.reset_buffers()
        moe.train()
        t = {bw: _time(lambda: run(moe, bw), iters) for bw in (False, True)}
        print(f"  {impl:<12}{tokens / t[False]:>12.0f}{base[False] / t[False]:>8.2f}"
              f"{tokens / t[True]:>16.0f}{base[True] / t[True]:>8.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--iters", type=int, default=5)
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
