"""Peak memory of the chunked LM head + cross-entropy against plain ``lm_head`` +
``cross_entropy``, forward + backward, on CPU.

    python bench/bench_fused_loss.py [--tokens 8192] [--dim 1024] [--vocab 32768 131072]

Each side runs in a fresh subprocess. Peak = the process's peak resident set during
forward + backward minus its resident set just before (inputs and weight already
allocated): the peak counter is reset through /proc/self/clear_refs when the kernel
allows it, otherwise a 1 ms RSS sampler is used. fp32 throughout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def _hwm_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("no VmHWM")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _hwm_kb() <= _rss_kb() + 1024
    except OSError:
        return False


def worker(side: str, tokens: int, dim: int, vocab: int, threads: int) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    from kernels import reference

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, dim, generator=g).requires_grad_()
    w = (torch.randn(vocab, dim, generator=g) * 0.02).requires_grad_()
    y = torch.randint(0, vocab, (tokens,), generator=g)

    def step(hh, ww, yy):
        if side == "plain":
            loss = torch.nn.functional.cross_entropy(hh @ ww.t(), yy)
        else:
            loss = reference.linear_cross_entropy(hh, ww, yy)
        loss.backward()
        return loss

    step(h[:64].detach().requires_grad_(), w[:128].detach().requires_grad_(), y[:64] % 128)  # warm-up
    h.grad = w.grad = None
    base = _rss_kb()
    exact = _reset_peak()
    peak = [base]
    stop = threading.Event()
    if not exact:
        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], _rss_kb())
                time.sleep(0.001)
        t = threading.Thread(target=sample, daemon=True)
        t.start()
    t0 = time.perf_counter()
    loss = step(h, w, y)
    elapsed = time.perf_counter() - t0
    stop.set()
    top = _hwm_kb() if exact else peak[0]
    return {"side": side, "vocab": vocab, "loss": float(loss), "peak_mb": (top - base) / 1024,
            "seconds": elapsed, "exact_peak": exact,
            "grad_norms": [float(h.grad.norm()), float(w.grad.norm())]}


def run_side(side, tokens, dim, vocab, threads) -> dict:
    cmd = [sys.executable, __file__, "--worker", side, "--tokens", str(tokens), "--dim", str(dim),
           "--vocab", str(vocab), "--threads", str(threads)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        return {"side": side, "vocab": vocab, "error": (out.stderr.strip().splitlines() or ["killed"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--vocab", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--worker", choices=["plain", "fused"])
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, a.tokens, a.dim, a.vocab[0], a.threads)))
        return

    try:
        import psutil
        avail_gb = psutil.virtual_memory().available / 2**30
    except ImportError:
        avail_gb = float("nan")
    print(f"tokens={a.tokens} dim={a.dim} fp32, forward+backward, {a.threads} threads, "
          f"{avail_gb:.1f} GiB available")
    print(f"{'vocab':>7} | {'plain peak MB':>13} {'s':>6} | {'fused peak MB':>13} {'s':>6} | "
          f"{'mem ratio':>9} | {'|loss diff|':>11} {'max |grad-norm rel diff|':>24}")
    for v in a.vocab:
        p = run_side("plain", a.tokens, a.dim, v, a.threads)
        f = run_side("fused", a.tokens, a.dim, v, a.threads)
        if "error" in p or "error" in f:
            print(f"{v:>7} | failed: {p.get('error', '')} {f.get('error', '')}")
            continue
        rel = max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(f["grad_norms"], p["grad_norms"]))
        print(f"{v:>7} | {p['peak_mb']:>13.0f} {p['seconds']:>6.1f} | {f['peak_mb']:>13.0f} "
              f"{f['seconds']:>6.1f} | {p['peak_mb'] / max(f['peak_mb'], 1e-9):>8.1f}x | "
              f"{abs(p['loss'] - f['loss']):>11.2e} {rel:>24.2e}")
        if not (p["exact_peak"] and f["exact_peak"]):
            print("        (peak from a 1 ms RSS sampler: /proc/self/clear_refs unavailable)")


if __name__ == "__main__":
    main()
