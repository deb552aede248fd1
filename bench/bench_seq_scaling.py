"""Sequence-length scaling on CPU: all-attention vs Mamba-2 hybrid vs all-Mamba-2.

Forward+backward time and peak memory at each length for three models of about equal
parameter count, then the growth ratios (value at the longest / value at the shortest)
side by side. Time is the process CPU time of one single-threaded step (best of
``--repeats``), which other jobs on a shared machine disturb far less than wall time;
wall time is printed too. Each (model, length) runs in a fresh subprocess so the peak
resident set size is its own. Not run by CI::

    .venv/bin/python bench/bench_seq_scaling.py [--seqs 512,1024,2048,4096,8192] [--threads 1]
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

# chunk 64: the fastest for the torch SSD reference on CPU at this width
MAMBA = dict(d_state=64, head_dim=32, n_groups=1, d_conv=4, expand=2, chunk_size=64)
MODELS = {  # name -> ModelConfig overrides (d_model 128, ~0.9-1.0M parameters each)
    "attention": dict(pattern="*-", n_layers=4),
    "hybrid": dict(pattern="M-*-", n_layers=2),
    "mamba2": dict(pattern="M", n_layers=8),
}


def _config(name: str, seq: int):
    from models.config import MambaConfig, ModelConfig

    return ModelConfig(vocab_size=256, d_model=128, n_heads=4, max_seq_len=seq,
                       mamba=MambaConfig(**MAMBA), **MODELS[name])


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(name: str, seq: int, repeats: int) -> dict:
    """Build one model, run fwd+bwd ``repeats`` times at batch 1; report time and memory."""
    import torch

    import kernels
    from models.transformer import build_model

    model = build_model(_config(name, seq), seed=0)
    tokens = torch.randint(0, 256, (1, seq + 1), generator=torch.Generator().manual_seed(0))

    def step():
        loss = kernels.cross_entropy(model(tokens[:, :-1]), tokens[:, 1:])
        loss.backward()
        model.zero_grad(set_to_none=True)

    base = _rss_bytes()
    step()  # also the warm-up
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    cpu, wall = [], []
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        step()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    return {"model": name, "seq": seq, "params": model.num_params(), "time_s": min(cpu),
            "wall_s": min(wall), "peak_mb": max(peak, 0) / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", default="512,1024,2048,4096,8192")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads per run")
    ap.add_argument("--worker", nargs=2, metavar=("MODEL", "SEQ"), help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.repeats)))
        return

    seqs = [int(s) for s in args.seqs.split(",")]
    names = args.models.split(",")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
    res: dict[tuple[str, int], dict] = {}
    for name in names:
        for seq in seqs:
            out = subprocess.run([sys.executable, __file__, "--worker", name, str(seq),
                                  "--repeats", str(args.repeats), "--threads", str(args.threads)],
                                 env=env, capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            res[name, seq] = r
            print(f"  {name:9s} seq {seq:5d}: cpu {r['time_s']:8.3f} s  wall {r['wall_s']:8.3f} s  "
                  f"peak {r['peak_mb']:8.1f} MB", flush=True)

    print(f"\nfwd+bwd, batch 1, d_model 128, CPU time with {args.threads} thread(s)")
    print("params: " + ", ".join(f"{n} {res[n, seqs[0]]['params'] / 1e6:.2f}M" for n in names))
    head = f"{'seq':>6s} | " + " | ".join(f"{n + ' s':>12s} {n + ' MB':>12s}" for n in names)
    print(head)
    print("-" * len(head))
    for seq in seqs:
        print(f"{seq:6d} | " + " | ".join(f"{res[n, seq]['time_s']:12.3f} {res[n, seq]['peak_mb']:12.1f}"
                                          for n in names))
    lo, hi = seqs[0], seqs[-1]
    print(f"\ngrowth {hi}/{lo} (length x{hi // lo}):")
    for n in names:
        t = res[n, hi]["time_s"] / res[n, lo]["time_s"]
        m = res[n, hi]["peak_mb"] / max(res[n, lo]["peak_mb"], 1e-9)
        print(f"  {n:9s} time x{t:7.1f}   peak memory x{m:7.1f}")


if __name__ == "__main__":
    main()
