"""GPU micro-benchmark of every fused kernel: time and effective bandwidth (GB/s) of the
Triton kernel against eager torch (the reference) and ``torch.compile`` of the reference,
forward and forward+backward.

    python bench/bench_kernels_gpu.py [--tokens 8192] [--dim 4096] [--dtype bf16] [--no-compile]

Without CUDA it prints that it was skipped and exits 0. ``--dry-run`` runs the same code
on tiny CPU shapes in the Triton interpreter (checks the script, not the speed).
GB/s counts each kernel's compulsory traffic (inputs read once, outputs written once).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _timer(device: str, reps: int):
    import torch

    def run(fn) -> float:
        for _ in range(3):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3 / reps
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t) / reps
    return run


def _cases(tokens: int, dim: int, dtype, device: str):
    """(name, make_inputs() -> leaves, call(ops, *leaves) -> outputs, fwd bytes, bwd bytes)."""
    import torch

    from models.layers import rope_tables

    e = torch.tensor([], dtype=dtype).element_size()
    N, D = tokens, dim
    heads, kv_heads, hd = max(1, D // 128), max(1, D // 512), min(128, D)
    ffn = ((8 * D // 3 + 255) // 256) * 256
    vocab = 128256 if D >= 1024 else 1000
    gsize = min(1024, 2 * D)

    def r(*shape, dt=dtype, scale=1.0):
        return (torch.randn(*shape, device=device) * scale).to(dt).requires_grad_()

    cos, sin = rope_tables(hd, N // 4 if N >= 4 else 1, 10000.0, device)
    B = 4 if N >= 4 else 1
    S = N // B
    labels = torch.randint(0, vocab, (N,), device=device)
    rot = 2 * N * (heads + kv_heads) * hd * e
    doc_ids = (torch.arange(S, device=device) * 4 // max(S, 1)).expand(B, S)  # 4 documents per row
    att = (2 * N * heads * hd + 2 * N * kv_heads * hd) * e
    return [
        ("rms_norm", lambda: [r(N, D), r(D, dt=torch.float32)],
         lambda k, x, w: k.rms_norm(x, w, 1e-5), 2 * N * D * e, 3 * N * D * e),
        ("gated_rms_norm", lambda: [r(N, 2 * D), r(N, 2 * D), r(2 * D, dt=torch.float32)],
         lambda k, x, z, w: k.gated_rms_norm(x, z, w, 1e-5, gsize), 3 * N * 2 * D * e, 5 * N * 2 * D * e),
        ("apply_rotary", lambda: [r(B, S, heads, hd), r(B, S, kv_heads, hd)],
         lambda k, q, kk: k.apply_rotary(q, kk, cos[:S], sin[:S]), rot, rot),
        ("swiglu", lambda: [r(N, ffn), r(N, ffn)],
         lambda k, g, u: k.swiglu(g, u), 3 * N * ffn * e, 5 * N * ffn * e),
        ("cross_entropy", lambda: [r(N, vocab, scale=2.0)],
         lambda k, x: k.cross_entropy(x, labels, z_loss=1e-4), N * vocab * e, 2 * N * vocab * e),
        ("linear_cross_entropy", lambda: [r(N, D), r(vocab, D, scale=0.02)],
         lambda k, h, w: k.linear_cross_entropy(h, w, labels, z_loss=1e-4),
         (N * D + vocab * D) * e, 2 * (N * D + vocab * D) * e),
        ("attention+doc_mask", lambda: [r(B, S, heads, hd), r(B, S, kv_heads, hd), r(B, S, kv_heads, hd)],
         lambda k, q, kk, v: k.attention(q, kk, v, doc_ids), att, 2 * att),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU, Triton interpreter")
    a = ap.parse_args()

    if a.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
        a.tokens, a.dim, a.reps, a.no_compile = 8, 64, 1, True
    import torch

    if not a.dry_run and not torch.cuda.is_available():
        print("bench_kernels_gpu: SKIPPED - no CUDA device found (this benchmark needs a GPU; "
              "--dry-run checks the script on CPU)")
        return
    sys.path.insert(0, str(ROOT))
    import kernels
    from kernels import reference

    device = "cpu" if a.dry_run else "cuda"
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    kernels.configure(backend="triton")
    # global "triton": Triton kernels, and flash-attn for attention when installed
    fused_ops = {op: kernels.dispatch.resolve(op, device) for op in kernels.OPS}
    ns = type("ops", (), {})
    impls = {"eager": reference, "fused": ns()}
    for op, (backend, fn) in fused_ops.items():
        setattr(impls["fused"], op, fn)
    print("fused backends: " + ", ".join(f"{op}={b}" for op, (b, _) in fused_ops.items()))
    if not a.no_compile:
        comp = ns()
        for op in fused_ops:
            setattr(comp, op, torch.compile(getattr(reference, op), dynamic=False))
        impls["compile"] = comp
    timer = _timer(device, a.reps)

    print(f"tokens={a.tokens} dim={a.dim} dtype={a.dtype} device="
          f"{torch.cuda.get_device_name() if device == 'cuda' else 'cpu (dry run)'}")
    print(f"{'op':<22}{'impl':<9}{'fwd ms':>9}{'fwd GB/s':>10}{'f+b ms':>9}{'f+b GB/s':>10}{'vs eager':>10}")
    for name, make, call, fwd_bytes, bwd_bytes in _cases(a.tokens, a.dim, dtype, device):
        eager_fb = None
        for impl, ops in impls.items():
            leaves = make()

            def fwd():
                with torch.no_grad():
                    call(ops, *leaves)

            def fwd_bwd():
                out = call(ops, *leaves)
                outs = out if isinstance(out, tuple) else (out,)
                torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
                for t in leaves:
                    t.grad = None

            try:
                tf, tfb = timer(fwd), timer(fwd_bwd)
            except Exception as e:  # report and carry on with the other rows
                print(f"{name:<22}{impl:<9} failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}")
                continue
            eager_fb = tfb if impl == "eager" else eager_fb
            speed = f"{eager_fb / tfb:>9.2f}x" if eager_fb else ""
            print(f"{name:<22}{impl:<9}{tf * 1e3:>9.3f}{fwd_bytes / tf / 1e9:>10.1f}{tfb * 1e3:>9.3f}"
                  f"{(fwd_bytes + bwd_bytes) / tfb / 1e9:>10.1f}{speed:>10}")
            del leaves
    kernels.configure()


if __name__ == "__main__":
    main()
