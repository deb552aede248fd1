"""Gated DeltaNet vs Mamba-2 vs attention, one mixer sublayer each, on CPU.

Forward+backward time and peak memory of one sublayer (input norm + mixer) at batch 1 for
each sequence length, all at the same d_model with comparable state/head sizes; the torch
references throughout (kernels/gdn.py chunked form, kernels/ssd.py, SDPA). Time is the
process CPU time of one single-threaded step (best of ``--repeats``), which a shared machine
disturbs less than wall time (printed too). Each (mixer, length) runs in a fresh subprocess
so the peak resident set size is its own. Not run by CI::

    .venv/bin/python bench/bench_gdn.py [--seqs 512,1024,2048,4096,8192] [--d-model 128]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KINDS = {"gdn": "G", "mamba": "M", "attention": "*"}


def _config(kind: str, seq: int, d: int):
    from models.config import GDNConfig, MambaConfig, ModelConfig

    # 4 heads of d/4 everywhere: GDN 4 q/k and 4 value heads (state 4 x 32 x 32 at d=128),
    # Mamba-2 expand 1 (4 heads of 32, d_state 32), attention 4 heads of 32; chunk 64
    hd = d // 4
    return ModelConfig(vocab_size=256, d_model=d, n_heads=4, max_seq_len=seq, pattern=KINDS[kind], n_layers=1,
                       gdn=GDNConfig(n_heads=4, head_k_dim=hd, head_v_dim=hd, chunk_size=64),
                       mamba=MambaConfig(d_state=hd, head_dim=hd, expand=1, chunk_size=64))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(kind: str, seq: int, d: int, repeats: int) -> dict:
    import torch

    from models.transformer import build_model

    model = build_model(_config(kind, seq, d), seed=0)
    sub = model.layers["0"]
    ctx = model.make_context(seq, "cpu", None)
    x = torch.randn(1, seq, d, generator=torch.Generator().manual_seed(0), requires_grad=True)

    def step():
        sub(x, ctx).square().mean().backward()
        sub.zero_grad(set_to_none=True)
        x.grad = None

    base = _rss_bytes()
    step()  # also the warm-up
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    cpu, wall = [], []
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        step()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    n = sum(p.numel() for p in sub.parameters())
    return {"kind": kind, "seq": seq, "params": n, "time_s": min(cpu), "wall_s": min(wall),
            "peak_mb": max(peak, 0) / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", default="512,1024,2048,4096,8192")
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--worker", nargs=2, metavar=("KIND", "SEQ"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        import torch

        torch.set_num_threads(1)
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.d_model, args.repeats)))
        return
    seqs, kinds = [int(s) for s in args.seqs.split(",")], args.kinds.split(",")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    res = {}
    for kind in kinds:
        for seq in seqs:
            out = subprocess.run([sys.executable, __file__, "--worker", kind, str(seq), "--d-model",
                                  str(args.d_model), "--repeats", str(args.repeats)],
                                 env=env, capture_output=True, text=True, check=True)
            res[kind, seq] = r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"  {kind:9s} {seq:6d}: {r['time_s']:.3f}s cpu, {r['wall_s']:.3f}s wall, "
                  f"{r['peak_mb']:.0f} MB", file=sys.stderr, flush=True)
    print(f"\none sublayer, d_model {args.d_model}, batch 1, fwd+bwd, 1 thread (CPU seconds | peak MB)")
    print(f"{'tokens':>7} " + " ".join(f"{k + ' s':>12} {k + ' MB':>14}" for k in kinds))
    for seq in seqs:
        print(f"{seq:7d} " + " ".join(f"{res[k, seq]['time_s']:12.3f} {res[k, seq]['peak_mb']:14.0f}"
                                      for k in kinds))
    print("params: " + ", ".join(f"{k} {res[k, seqs[0]]['params']}" for k in kinds))


if __name__ == "__main__":
    main()
